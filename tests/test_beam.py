"""fastem.beam: beam search equals transformers' generate(num_beams=k); in the pipeline and the CLI."""
import pytest
import torch

import fastem
from fastem.beam import beam_search
from fastem.sampling import Head, build_prompts, decode
from fastem.whisper import cross_kv, encode
from tiny_whisper import EOS, tiny_whisper

PLAIN = dict(compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None)
PROMPT = [50258, 50259, 50359, 50363]  # <|startoftranscript|> <|en|> <|transcribe|> <|notimestamps|>


def _generate(model, processor, audio, beams, max_new_tokens):
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    ref = model.generate(feats, language="en", task="transcribe", max_new_tokens=max_new_tokens, num_beams=beams,
                         do_sample=False)[0].tolist()
    ref = ref[4:] if ref[:4] == PROMPT else ref
    return [t for t in ref if t != EOS]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("beams, max_new_tokens", [(2, 5), (4, 12), (3, 9)])
def test_beam_search_equals_generate(processor, seed, beams, max_new_tokens):
    model = tiny_whisper(seed=seed, eos_strength=3.0)  # hypotheses end at varied lengths: beams finish apart
    audio = torch.randn(24000, generator=torch.Generator().manual_seed(seed)) * 0.1
    ours = fastem.transcribe(model, audio, processor=processor, language="en", num_beams=beams,
                             max_new_tokens=max_new_tokens, **PLAIN)
    assert processor.tokenizer.encode(" " + ours, add_special_tokens=False) or ours == ""
    result = fastem.adapt(model, audio, processor=processor, language="en", steps=0, num_beams=beams,
                          max_new_tokens=max_new_tokens, **PLAIN)
    assert result.tokens_before == _generate(model, processor, audio, beams, max_new_tokens)
    assert result.text_before == ours


def test_one_beam_is_greedy_and_a_batch_equals_each_alone(processor):
    model = tiny_whisper(seed=3, eos_strength=3.0)
    g = torch.Generator().manual_seed(3)
    waves = [torch.randn(n, generator=g) * 0.1 for n in (16000, 28000, 20000)]
    feats = processor.feature_extractor([w.numpy() for w in waves], sampling_rate=16000,
                                        return_tensors="pt").input_features
    with torch.no_grad():
        cross = cross_kv(model, encode(model, feats))
    prompts = build_prompts(model, cross, ["en"] * 3)
    head = Head(model)
    one = beam_search(model, cross, prompts, num_beams=1, max_new_tokens=10, head=head)
    greedy = decode(model, cross, prompts, greedy=True, max_new_tokens=10, head=head)
    for b in range(3):
        assert one.row(b) == greedy.row(b)
        assert torch.allclose(one.logp[b, :int(one.lengths[b])], greedy.logp[b, :int(greedy.lengths[b])], atol=1e-5)
        assert torch.allclose(one.entropy[b, :int(one.lengths[b])], greedy.entropy[b, :int(greedy.lengths[b])],
                              atol=1e-5)
    batch = beam_search(model, cross, prompts, num_beams=3, max_new_tokens=[6, 10, 8], head=head)
    for b in range(3):
        alone = beam_search(model, cross.select([b]), [prompts[b]], num_beams=3, max_new_tokens=[6, 10, 8][b],
                            head=head)
        assert batch.row(b) == alone.row(0)
        n = int(batch.lengths[b])
        assert n <= [6, 10, 8][b] and torch.isfinite(batch.logp[b, :n]).all() and (batch.logp[b, :n] <= 0).all()
    with pytest.raises(ValueError, match="num_beams"):
        beam_search(model, cross, prompts, num_beams=0, max_new_tokens=4)


def test_adapt_with_beams_decodes_both_transcripts_by_beam_search(processor):
    """With num_beams > 1 the source transcript is the beam transcript, and adaptation still runs; bad
    values are named."""
    model = tiny_whisper(seed=1, eos_strength=3.0)
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(processor=processor, language="en", max_new_tokens=8, **PLAIN)
    res = fastem.adapt(model, audio, steps=2, num_samples=2, lr=1e-2, min_entropy=0.0, num_beams=3, **kw)
    assert res.tokens_before == _generate(model, processor, audio, 3, 8)
    assert len(res.history) == 2 and res.scores["entropy_before"] > 0
    for bad in (0, 1.5, "3"):
        with pytest.raises(ValueError, match="num_beams"):
            fastem.AdaptConfig(num_beams=bad)


def test_steps_are_five_of_eight_samples_whatever_the_decoding_unless_set(processor, monkeypatch):
    """``steps="auto"`` (the default): the loop takes 5 steps with greedy decoding and with beam search (one recipe),
    each drawing ``num_samples`` (8) hypotheses per draw; integers are taken as given; bad values are named."""
    import fastem.loop as loop

    drawn = []
    real = loop.decode

    def spy(*args, **kwargs):
        drawn.append(kwargs["num_samples"])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "decode", spy)
    model = tiny_whisper(seed=1, eos_strength=3.0)
    audio = torch.randn(32000, generator=torch.Generator().manual_seed(1)) * 0.1
    kw = dict(processor=processor, language="en", max_new_tokens=6, lr=1e-2, min_entropy=0.0, **PLAIN)
    for extra, k, n in ((dict(draws=1, num_beams=1), 8, 5), (dict(draws=1, num_beams=3), 8, 5),
                        (dict(draws=2), 8, 5),  # the default: two draws in one batch, 8 samples each
                        (dict(draws=1, num_beams=3, num_samples=3, steps=2), 3, 2),
                        (dict(draws=1, steps=1, num_samples=4), 4, 1)):
        drawn.clear()
        res = fastem.adapt(model, audio, **extra, **kw)
        assert drawn == [k] * n and len(res.history) == n, (extra, drawn)
    assert fastem.AdaptConfig().step_count == 5 and fastem.AdaptConfig(num_beams=1).step_count == 5
    assert fastem.AdaptConfig(steps=0).step_count == 0 and fastem.AdaptConfig().num_samples == 8
    for bad in (0, 2.5, True, "eight", "auto"):
        with pytest.raises(ValueError, match="num_samples"):
            fastem.AdaptConfig(num_samples=bad)
    for bad in (-1, 2.5, True, "ten"):
        with pytest.raises(ValueError, match="steps"):
            fastem.AdaptConfig(steps=bad)


def test_the_temperature_and_the_gate_are_one_recipe_whatever_the_decoding():
    """``temperature`` and ``min_entropy`` "auto": 0.7 and 1.4 nats, with greedy decoding and with beam search (the
    beam default was chosen on DEV with the greedy recipe); a number is used as given."""
    greedy, beams = fastem.AdaptConfig(num_beams=1), fastem.AdaptConfig(num_beams=5, draws=1)
    assert (greedy.sample_temperature, greedy.gate_entropy) == (0.7, 1.4)
    assert (beams.sample_temperature, beams.gate_entropy) == (0.7, 1.4)
    given = fastem.AdaptConfig(num_beams=5, temperature=2.5, min_entropy=0)
    assert (given.sample_temperature, given.gate_entropy) == (2.5, 0.0)
    for bad in ("hot", 0, -1.0, True):
        with pytest.raises(ValueError, match="temperature"):
            fastem.AdaptConfig(temperature=bad)
    for bad in ("high", -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="min_entropy"):
            fastem.AdaptConfig(min_entropy=bad)
