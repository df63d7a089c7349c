"""The decoding loop: one encoder call, KV-cache reuse, Whisper's prompt and suppression, and scoring."""
import pytest
import torch

from fastem import sampling
from tiny_whisper import EOS, LANGS, NO_TS, SOT, SUPPRESS, TRANSCRIBE, random_features, tiny_whisper


@pytest.fixture(scope="module")
def model():
    return tiny_whisper()


@pytest.fixture(scope="module")
def feats():
    return random_features()


def count_encoder_calls(model):
    calls = []
    handle = model.get_encoder().register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_prompt_follows_whisper(model, feats):
    enc = sampling.encode(model, feats)
    p = sampling.build_prompt(model, enc, "english")
    assert p.ids == [SOT, LANGS["<|en|>"], TRANSCRIBE, NO_TS]
    assert p.language == "en" and p.eos_id == EOS
    detected = sampling.build_prompt(model, enc, None)
    assert detected.ids[1] in LANGS.values() and detected.language in {"en", "zh", "de", "cs", "nl"}
    # Detection is what generate() does: argmax over language tokens at the first step.
    assert detected.ids[1] == int(model.detect_language(input_features=feats)[0])
    with pytest.raises(ValueError, match="language"):
        sampling.build_prompt(model, enc, "klingon")


def test_samples_share_one_encoder_call_and_end_at_eos(model, feats):
    calls, handle = count_encoder_calls(model)
    try:
        enc = sampling.encode(model, feats)
        prompt = sampling.build_prompt(model, enc, "en")
        g = torch.Generator().manual_seed(1)
        hyps = sampling.decode(model, enc, prompt, num_samples=6, max_new_tokens=12, generator=g)
    finally:
        handle.remove()
    assert len(calls) == 1
    k, t = hyps.tokens.shape
    assert k == 6 and t == int(hyps.lengths.max()) <= 12
    assert len({tuple(hyps.row(i)) for i in range(k)}) > 1, "samples should differ"
    for i in range(k):
        row = hyps.row(i)
        n = len(row)
        # Each row ends at its first EOS (or at the token limit); padding after it is EOS, logp 0.
        assert EOS not in row[:-1]
        assert row[-1] == EOS or n == 12
        assert (hyps.tokens[i, n:] == EOS).all() and (hyps.logp[i, n:] == 0).all()
        assert not set(row) & set(SUPPRESS)
        assert row[0] not in (220, EOS)  # begin_suppress_tokens
    assert sum(hyps.row(i)[-1] == EOS for i in range(k)) >= 1


def test_sampling_is_reproducible_with_a_seed(model, feats):
    enc = sampling.encode(model, feats)
    prompt = sampling.build_prompt(model, enc, "en")
    a = sampling.decode(model, enc, prompt, num_samples=3, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    b = sampling.decode(model, enc, prompt, num_samples=3, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_generate(seed):
    model = tiny_whisper(seed=seed, eos_strength=3.0)
    feats = random_features(seed)
    enc = sampling.encode(model, feats)
    prompt = sampling.build_prompt(model, enc, "en")
    hyps = sampling.decode(model, enc, prompt, greedy=True, max_new_tokens=15)
    ref = model.generate(feats, language="en", task="transcribe", max_new_tokens=15, do_sample=False)
    ref = [t for t in ref[0].tolist() if t not in prompt.ids]
    assert hyps.row(0, eos_id=EOS) == [t for t in ref if t != EOS]


def test_score_matches_the_sampling_distribution(model, feats):
    """Teacher forcing over the drawn tokens reproduces the log-probs the sampler used."""
    enc = sampling.encode(model, feats)
    prompt = sampling.build_prompt(model, enc, "en")
    for temperature in (1.0, 0.7):
        hyps = sampling.decode(model, enc, prompt, num_samples=4, max_new_tokens=10, temperature=temperature,
                               generator=torch.Generator().manual_seed(3))
        entropy, logp, mask = sampling.score(model, enc, prompt, hyps, temperature=temperature, backend="torch")
        assert torch.equal(mask, hyps.mask)
        torch.testing.assert_close(logp, hyps.logp, atol=2e-4, rtol=0)
        assert torch.isfinite(entropy).all() and (entropy[mask] > 0).all() and (entropy[~mask] == 0).all()


def test_score_gradients_reach_encoder_and_decoder(model, feats):
    for p in model.parameters():
        p.requires_grad_(True)
    try:
        enc = sampling.encode(model, feats)
        prompt = sampling.build_prompt(model, enc.detach(), "en")
        hyps = sampling.decode(model, enc.detach(), prompt, num_samples=2, max_new_tokens=6,
                               generator=torch.Generator().manual_seed(0))
        entropy, logp, mask = sampling.score(model, enc, prompt, hyps, backend="torch")
        (entropy.sum() + logp.sum()).backward()
        enc_grad = model.model.encoder.layer_norm.weight.grad
        dec_grad = model.model.decoder.layers[0].self_attn_layer_norm.weight.grad
        assert enc_grad is not None and enc_grad.abs().sum() > 0
        assert dec_grad is not None and dec_grad.abs().sum() > 0
    finally:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_decode_rejects_batched_encoder_output(model, feats):
    enc = sampling.encode(model, feats)
    prompt = sampling.build_prompt(model, enc, "en")
    with pytest.raises(ValueError, match="one utterance"):
        sampling.decode(model, enc.expand(2, -1, -1), prompt)
