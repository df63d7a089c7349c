"""fastem.loop: the encoder split, and the steps on the clips' own length (encoder_context="clip")."""
import importlib

import pytest
import torch

import fastem
from fastem.whisper import clip_frames, encoder_embed, encoder_layers
from tiny_whisper import random_features, tiny_whisper

loop_module = importlib.import_module("fastem.loop")


def test_the_short_embedding_is_the_full_one_on_the_first_positions():
    """Convolutions and positions on the first F frames equal the full input's first F/2 positions (all but the
    last, whose convolution sees one frame past the cut)."""
    model = tiny_whisper(encoder_layers=2).double()  # float64: only the cut may differ, not the rounding
    feats = random_features(seed=3).double()
    with torch.no_grad():
        full = encoder_embed(model, feats)
        for frames in (200, 700, 2000):
            short = encoder_embed(model, feats[..., :frames], shorter=True)
            assert short.shape[1] == frames // 2
            torch.testing.assert_close(short[:, :-1], full[:, :frames // 2 - 1], rtol=0, atol=1e-12)
            assert not torch.equal(short[:, -1], full[:, frames // 2 - 1])  # the cut is seen: the test can fail
            layers = encoder_layers(model, short)  # the layers run on any length
            assert layers.shape == short.shape and torch.isfinite(layers).all()
    with pytest.raises(ValueError, match="3000 mel frames"):
        encoder_embed(model, feats[..., :700])  # only when asked for
    with pytest.raises(ValueError, match="3000 mel frames"):
        encoder_embed(model, feats[..., :701], shorter=True)


def test_clip_frames_round_up_to_whole_seconds_with_a_margin():
    assert clip_frames([5.4]) == 700 and clip_frames([0.3]) == 200 and clip_frames([3.0, 7.2]) == 900
    assert clip_frames([29.5]) == 3000 and clip_frames([10.0], margin_seconds=0.0) == 1000


@pytest.mark.parametrize("params", ["layernorm", "all"])
def test_clip_context_steps_run_short_and_transcripts_full(processor, monkeypatch, params):
    """With encoder_context="clip" every step's cross-attention keys/values cover the clip's frames only, and
    the source and the adapted transcripts are decoded from the full 30-s input; "full" keeps 1500."""
    model = tiny_whisper()
    audio = torch.randn(24000, generator=torch.Generator().manual_seed(0)) * 0.1  # 1.5 s: 300 frames, 150 positions
    widths = []
    real = loop_module.cross_kv
    monkeypatch.setattr(loop_module, "cross_kv", lambda m, enc: widths.append(enc.shape[1]) or real(m, enc))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=1e-2, max_new_tokens=6, min_entropy=0.0,
              guards=(), params=params)
    short = fastem.adapt(model, audio, encoder_context="clip", **kw)
    assert widths == [1500, 150, 150, 150, 1500]  # source, three steps, the adapted transcript
    assert len(short.history) == 3 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    widths.clear()
    fastem.adapt(model, audio, **kw)
    assert widths == [1500] * 5
    with pytest.raises(ValueError, match="encoder_context"):
        fastem.AdaptConfig(encoder_context="short")


def test_head_logits_stay_float32_under_autocast():
    """The output projection turns autocast off: under bfloat16 autocast its logits equal the float32 ones."""
    from fastem.sampling import Head

    model = tiny_whisper()
    head = Head(model)
    h = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    want = head.logits(h)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = head.logits(h)
        unguarded = torch.nn.functional.linear(h, head.weight)  # what autocast alone would give
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert unguarded.dtype == torch.bfloat16  # autocast is on: the guard is what keeps the head float32


@pytest.mark.parametrize("params", ["layernorm", "all"])
def test_bfloat16_steps_run_the_encoder_in_bfloat16_and_the_rest_in_float32(processor, monkeypatch, params):
    """step_precision="bfloat16": the encoder layers of every step run in bfloat16; sampling, scoring, the
    cross-attention keys/values, the source and adapted transcripts in float32; the loss is finite, the
    adapted parameters stay float32 and the model is restored exactly."""
    model = tiny_whisper()
    audio = torch.randn(24000, generator=torch.Generator().manual_seed(0)) * 0.1
    seen = []  # dtype of the first encoder layer's fc1 output and of the decoder's fc1 output, in call order
    model.model.encoder.layers[0].fc1.register_forward_hook(lambda m, i, o: seen.append(("enc", o.dtype)))
    model.model.decoder.layers[0].fc1.register_forward_hook(lambda m, i, o: seen.append(("dec", o.dtype)))
    kv_dtypes = []
    real = loop_module.cross_kv
    monkeypatch.setattr(loop_module, "cross_kv", lambda m, enc: kv_dtypes.append(enc.dtype) or real(m, enc))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=1e-2, max_new_tokens=6, min_entropy=0.0,
              guards=(), params=params)
    res = fastem.adapt(model, audio, step_precision="bfloat16", **kw)
    assert len(res.history) == 3 and all(not h["skipped"] and h["loss"] == h["loss"] for h in res.history)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert kv_dtypes == [torch.float32] * 5  # source, three steps (projected back to float32), the adapted transcript
    enc = [d for w, d in seen if w == "enc"]
    assert enc == [torch.float32] + [torch.bfloat16] * 3 + [torch.float32]
    assert {d for w, d in seen if w == "dec"} == {torch.float32}
    seen.clear()
    fastem.adapt(model, audio, **kw)  # the default: the model's own dtype throughout
    assert {d for _, d in seen} == {torch.float32}
    with pytest.raises(ValueError, match="step_precision"):
        fastem.AdaptConfig(step_precision="fp8")
    fastem.AdaptConfig(step_precision="auto")  # a value it takes


def test_importance_weights_are_the_likelihood_ratios_normalized_per_utterance():
    from fastem.sampling import Hypotheses

    tokens = torch.zeros(5, 3, dtype=torch.long)
    lengths = torch.tensor([3, 2, 3, 1, 2])
    then = -torch.rand(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hyps = Hypotheses(tokens=tokens, lengths=lengths, logp=then, groups=[2, 3])
    same = loop_module.importance_weights(then.clone(), hyps)
    assert all(torch.allclose(w, torch.ones_like(w), atol=1e-12, rtol=0) for w in same)
    now = then.clone()
    now[1, 0] += float(torch.log(torch.tensor(3.0, dtype=torch.float64)))  # row 1: now 3x likelier than when drawn
    now[0, 2] += 5.0    # row 0's third (real) token: e^5 times likelier
    now[3, 2] += 50.0   # padding of row 3 (one real token): does not count
    w = loop_module.importance_weights(now, hyps)
    e5 = torch.exp(torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(w[0], 2 * torch.stack([e5, torch.tensor(3.0, dtype=torch.float64)]) / (e5 + 3),
                               atol=1e-12, rtol=0)
    torch.testing.assert_close(w[1], torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_sample_every_reuses_the_drawn_hypotheses_weighted(processor, monkeypatch):
    """sample_every=2 over four steps: hypotheses are drawn at steps 0 and 2 and scored again, weighted, at steps 1
    and 3 (the same tokens); the history says which steps reused them and their effective sample size; the model
    is restored.  sample_every=1 draws at every step."""
    model = tiny_whisper()
    audio = torch.randn(24000, generator=torch.Generator().manual_seed(0)) * 0.1
    draws, scored = [], []
    real_decode, real_score = loop_module.decode, loop_module.score
    monkeypatch.setattr(loop_module, "decode", lambda *a, **k: draws.append(k.get("greedy", False)) or real_decode(*a, **k))
    monkeypatch.setattr(loop_module, "score", lambda m, c, p, hyps, **k: scored.append(hyps.tokens.clone())
                        or real_score(m, c, p, hyps, **k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(processor=processor, language="en", steps=4, num_samples=3, lr=1e-2, max_new_tokens=6, min_entropy=0.0,
              guards=())
    res = fastem.adapt(model, audio, sample_every=2, **kw)
    assert draws == [False, False] and len(scored) == 4
    assert torch.equal(scored[0], scored[1]) and torch.equal(scored[2], scored[3])
    assert not torch.equal(scored[0], scored[2])  # fresh samples at step 2 (the test can fail)
    assert [h["reused"] for h in res.history] == [False, True, False, True]
    assert all(0 < h["ess"] <= 3 + 1e-9 for h in res.history if h["reused"])
    assert not any("ess" in h for h in res.history if not h["reused"])
    assert res.sample_tokens == res.history[0]["tokens"] + res.history[2]["tokens"]  # drawn, not scored again
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    draws.clear()
    res = fastem.adapt(model, audio, **kw)
    assert draws == [False] * 4 and not any(h["reused"] for h in res.history)
    # with the parameters barely moved, the weights are 1: the sampler's log-probs are the scorer's (same temperature,
    # same suppressed tokens), so the ratios measure the update and nothing else
    still = fastem.adapt(model, audio, sample_every=4, **{**kw, "lr": 1e-12})
    assert all(abs(h["ess"] - 3) < 1e-3 for h in still.history if h["reused"]) and still.history[1]["reused"]
    # a watched step that reuses its hypotheses decodes the greedy rows alone
    draws.clear()
    fastem.adapt(model, audio, sample_every=2, stop_when_settled=3, **kw)
    assert draws[:2] == [False, True]
    with pytest.raises(ValueError, match="sample_every"):
        fastem.AdaptConfig(sample_every=0)
    with pytest.raises(ValueError, match="sample_every"):
        fastem.AdaptConfig(sample_every=2, objective="suta")


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_an_utterance_whose_gradient_is_not_finite_does_not_step_and_leaves_no_trace(optimizer):
    """``update``: an utterance whose gradient holds an inf keeps its values and its optimizer state (Adam's
    moments, SGD's momentum) exactly; the others step as they would alone; nothing non-finite is left behind."""
    from fastem.config import AdaptConfig
    from fastem.params import Binding, select_parameters

    model = tiny_whisper()
    binding = Binding(model, select_parameters(model, "layernorm"), 3)
    opt = loop_module.make_optimizer(AdaptConfig(lr=1e-2, optimizer=optimizer, weight_decay=0.1), binding.tensors)
    if optimizer == "sgd":
        opt.param_groups[0]["momentum"] = 0.9
    gen = torch.Generator().manual_seed(0)

    def grads(bad=None):
        for t in binding.tensors:
            t.grad = torch.randn(t.shape, generator=gen)
            if bad is not None:
                t.grad[bad, 0] = float("inf")

    grads()
    loop_module.update(opt, binding, torch.ones(3, dtype=torch.bool))  # a first step: the optimizer has state
    values, states = binding.rows(), binding.optimizer_rows(opt)
    assert all(states), "the optimizer has per-element state to keep"
    grads(bad=1)
    finite = binding.grad_finite(3)
    assert finite.tolist() == [True, False, True]
    loop_module.update(opt, binding, finite)
    for t, v, st in zip(binding.tensors, values, states):
        assert torch.equal(t[1], v[1]) and not torch.equal(t[0], v[0]) and not torch.equal(t[2], v[2])
        for k, s in st.items():
            assert torch.equal(opt.state[t][k][1], s[1]) and torch.isfinite(opt.state[t][k]).all()
    grads()
    loop_module.update(opt, binding, torch.ones(3, dtype=torch.bool))
    assert all(torch.isfinite(t).all() for t in binding.tensors)


def test_the_speech_context_with_the_source_parameters_is_the_full_encoder():
    """``encoder_context="speech"``: the first positions alone, attending over the padding's fixed keys/values,
    give the whole input's encoder output (the padding's joined) when the parameters are the source model's."""
    from fastem.whisper import padding_context

    model = tiny_whisper(encoder_layers=2).double()
    feats = random_features(seed=3).double()
    with torch.no_grad():
        h = encoder_embed(model, feats)
        full = encoder_layers(model, h)
        for start in (0, 1):
            below = encoder_layers(model, h, 0, start, final_norm=False) if start else h
            for positions in (50, 351, full.shape[1] - 1):
                pad = padding_context(model, below, start, positions)
                out = encoder_layers(model, below[:, :positions], start, padding=pad)
                torch.testing.assert_close(out, full, rtol=0, atol=1e-10)
                alone = encoder_layers(model, below[:, :positions], start)  # without the padding: not the same
                assert not torch.allclose(alone, full[:, :positions], atol=1e-6)
        with pytest.raises(ValueError, match="padding context"):
            encoder_layers(model, h[:, :50], 0, 1, padding=padding_context(model, h, 0, 50))


def test_speech_context_steps_run_the_clip_positions_over_the_whole_input(processor, monkeypatch):
    """With encoder_context="speech" each step's encoder layers run on the clip's positions (150 for 1.5 s with
    the margin) attending over all 1500, the cross-attention keys/values cover the whole input, and the model is
    restored; "auto" parameter sets whose convolutions adapt fall back to the full context."""
    whisper_module = importlib.import_module("fastem.whisper")
    model = tiny_whisper()
    audio = torch.randn(24000, generator=torch.Generator().manual_seed(0)) * 0.1
    seen, widths = [], []
    real_attend, real_kv = whisper_module._attend_with_padding, loop_module.cross_kv
    monkeypatch.setattr(whisper_module, "_attend_with_padding",
                        lambda a, x, k, v: seen.append((x.shape[1], x.shape[1] + k.shape[2])) or real_attend(a, x, k, v))
    monkeypatch.setattr(loop_module, "cross_kv", lambda m, enc: widths.append(enc.shape[1]) or real_kv(m, enc))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=1e-2, max_new_tokens=6, min_entropy=0.0,
              guards=(), draws=1)
    res = fastem.adapt(model, audio, encoder_context="speech", **kw)
    layers = len(model.get_encoder().layers)
    assert seen == [(150, 1500)] * (3 * layers) and widths == [1500] * 5
    assert len(res.history) == 3 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    seen.clear()
    fastem.adapt(model, audio, encoder_context="speech", params="encoder", **kw)
    assert seen == []


def test_speech_context_runs_each_utterance_on_its_own_positions_in_a_batch():
    """Each utterance's steps run its own positions (not the batch's longest), utterances of one length together:
    under adapted LayerNorms an utterance's encoder output in a batch equals its output alone, and differs from
    the output it would get with the batch's longest clip's positions (what the test can see)."""
    from fastem.params import Binding, select_parameters

    model = tiny_whisper(encoder_layers=2)
    feats = torch.cat([random_features(seed=s) for s in (1, 2, 3)])
    frames = [300, 500, 300]
    binding = Binding(model, select_parameters(model, "layernorm"), 3)
    with torch.no_grad():
        for t in binding.tensors:
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(t.numel())) * 0.3)
    encoder = loop_module.Encoder.build(model, feats, 0, False, False, speech_frames=frames)
    batched = encoder._speech_layers(model, binding.over, None)
    for b in range(3):
        alone = encoder.select([b])._speech_layers(model, binding.over, torch.tensor([b]))
        torch.testing.assert_close(batched[b:b + 1], alone, rtol=1e-5, atol=1e-5)
    longest = loop_module.Encoder.build(model, feats[:1], 0, False, False, speech_frames=[500])
    other = longest._speech_layers(model, binding.over, torch.tensor([0]))
    assert not torch.allclose(other, batched[:1], atol=1e-3)


def test_speech_context_steps_are_the_same_in_a_batch_as_alone(processor):
    """Each clip's steps run its own positions (not the batch's longest): adapt_batch equals adapt alone."""
    model = tiny_whisper()
    g = torch.Generator().manual_seed(1)
    audios = [torch.randn(24000, generator=g) * 0.1, torch.randn(52000, generator=g) * 0.1]  # 150 and 250 positions
    kw = dict(processor=processor, language="en", steps=3, num_samples=2, lr=0.3, max_new_tokens=6, min_entropy=0.0,
              guards=(), draws=1, encoder_context="speech")
    batched = fastem.adapt_batch(model, audios, **kw)
    for audio, b in zip(audios, batched):
        alone = fastem.adapt(model, audio, **kw)
        assert b.tokens_adapted == alone.tokens_adapted
        for hb, ha in zip(b.history, alone.history):
            assert hb["loss"] == pytest.approx(ha["loss"], rel=1e-5, abs=1e-6)
