"""fastem.adapt on a tiny random Whisper: restoration, failure safety, entropy descent, configuration."""
import importlib
import math

import pytest
import torch

import fastem
from fastem import AdaptConfig
from tiny_whisper import tiny_whisper

adapt_module = importlib.import_module("fastem.adapt")  # the module; fastem.adapt is the function


@pytest.fixture
def model():
    return tiny_whisper()


def speechlike(seconds=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(int(16000 * seconds)) / 16000
    tone = 0.3 * torch.sin(2 * math.pi * 220 * t) * torch.sin(2 * math.pi * 3 * t).abs()
    return (tone + 0.05 * torch.randn(t.shape, generator=g)).float()


def full_state(model):
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_same_state(model, before):
    after = full_state(model)
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, value in before["tensors"].items():
        now = after["tensors"][name]
        assert now.dtype == value.dtype and torch.equal(now, value), f"{name} changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["training"] == before["training"]
    for name, g in before["grads"].items():
        now = after["grads"][name]
        assert (g is None and now is None) or torch.equal(g, now), f"grad of {name} changed"


def make_unusual_state(model):
    """Flags a user might have set: they must survive the call untouched."""
    model.train()
    model.model.encoder.eval()
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 == 0)
    model.model.decoder.layer_norm.weight.grad = torch.full_like(model.model.decoder.layer_norm.weight, 0.5)


@pytest.mark.parametrize("params", ["layernorm", "all"])
def test_episodic_call_restores_everything(model, processor, params):
    make_unusual_state(model)
    before = full_state(model)
    result = fastem.adapt(model, speechlike(), processor=processor, language="en", steps=3, num_samples=2,
                          lr=1e-2, params=params, max_new_tokens=8)
    assert len(result.history) == 3
    assert_same_state(model, before)


def test_failed_call_restores_even_in_continual_mode(model, processor, monkeypatch):
    make_unusual_state(model)
    before = full_state(model)
    calls = {"n": 0}
    real = adapt_module.em_loss

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after two optimizer steps have changed the weights
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "em_loss", flaky)
    for episodic in (True, False):
        calls["n"] = 0
        with pytest.raises(RuntimeError, match="injected failure"):
            fastem.adapt(model, speechlike(), processor=processor, language="en", steps=5, num_samples=2, lr=1e-2,
                         params="all", episodic=episodic, max_new_tokens=6)
        assert_same_state(model, before)


def test_continual_mode_keeps_the_adapted_weights(model, processor):
    ln = model.model.decoder.layer_norm.weight
    start = ln.detach().clone()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fastem.adapt(model, speechlike(), processor=processor, language="en", steps=2, num_samples=2, lr=1e-2,
                 episodic=False, max_new_tokens=6)
    assert not torch.equal(ln.detach(), start)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_entropy_falls_over_ten_steps(model, processor):
    result = fastem.adapt(model, speechlike(), processor=processor, language="en", steps=10, num_samples=4,
                          lr=3e-2, max_new_tokens=8, seed=0)
    ent = [h["entropy"] for h in result.history]
    assert all(math.isfinite(e) for e in ent)
    assert sum(ent[-3:]) / 3 < sum(ent[:3]) / 3 - 0.5, ent
    assert isinstance(result.text, str) and isinstance(result.text_before, str)
    assert result.sample_tokens > 0 and result.sample_seconds > 0


def test_same_seed_same_result(model, processor):
    kwargs = dict(processor=processor, language="en", steps=2, num_samples=3, lr=1e-2, max_new_tokens=6, seed=7)
    a = fastem.adapt(model, speechlike(), **kwargs)
    b = fastem.adapt(model, speechlike(), **kwargs)
    assert a.tokens == b.tokens and [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


@pytest.mark.parametrize("objective", ["entropy", "pg"])
def test_ablations_run(model, processor, objective):
    result = fastem.adapt(model, speechlike(), processor=processor, language="en", steps=2, num_samples=3,
                          lr=1e-2, objective=objective, max_new_tokens=6)
    assert len(result.history) == 2
    if objective == "entropy":  # SUTA-style: the greedy pseudo-label, a single hypothesis
        assert AdaptConfig(objective="entropy").uses_greedy_hypotheses


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model(processor, dtype):
    model = tiny_whisper().to(dtype)
    before = full_state(model)
    result = fastem.adapt(model, speechlike(), processor=processor, language="en", steps=2, num_samples=2,
                          lr=1e-2, max_new_tokens=6)
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert_same_state(model, before)
    fastem.adapt(model, speechlike(), processor=processor, language="en", steps=2, num_samples=2, lr=1e-2,
                 max_new_tokens=6, episodic=False)
    assert model.model.decoder.layer_norm.weight.dtype == dtype
    assert not torch.equal(model.model.decoder.layer_norm.weight, before["tensors"]["model.decoder.layer_norm.weight"])


def test_transcribe_equals_the_unadapted_transcript(model, processor):
    text = fastem.transcribe(model, speechlike(), processor=processor, language="en", max_new_tokens=6)
    result = fastem.adapt(model, speechlike(), processor=processor, language="en", steps=0, max_new_tokens=6)
    assert text == result.text_before == result.text


@pytest.mark.parametrize("bad, match", [
    (dict(steps=-1), "steps"), (dict(lr=0.0), "lr"), (dict(num_samples=0), "num_samples"),
    (dict(objective="kl"), "objective"), (dict(baseline="ema"), "baseline"), (dict(params="heads"), "params"),
    (dict(temperature=0.0), "temperature"), (dict(hypotheses="beam"), "hypotheses"),
    (dict(optimizer="lbfgs"), "optimizer"), (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_bad_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        AdaptConfig(**bad)


def test_bad_audio_leaves_model_untouched(model, processor):
    before = full_state(model)
    with pytest.raises(ValueError):
        fastem.adapt(model, torch.zeros(0), processor=processor, language="en", steps=1)
    with pytest.raises(ValueError):
        fastem.adapt(model, torch.full((16000,), float("nan")), processor=processor, language="en", steps=1)
    assert_same_state(model, before)
