"""The adaptation loop on the fused kernels (Triton; the interpreter on CPU) equals the PyTorch path."""
import pytest
import torch

import fastem
from fastem import sampling
from tiny_whisper import random_features, tiny_whisper


def test_score_backends_agree():
    model = tiny_whisper()
    for p in model.parameters():
        p.requires_grad_(False)
    ln = model.model.decoder.layer_norm.weight
    ln.requires_grad_(True)
    enc = sampling.encode(model, random_features())
    prompt = sampling.build_prompt(model, enc, "en")
    hyps = sampling.decode(model, enc, prompt, num_samples=3, max_new_tokens=6, generator=torch.Generator().manual_seed(2))
    out = {}
    for backend in ("torch", "triton"):
        ln.grad = None
        entropy, logp, mask = sampling.score(model, enc, prompt, hyps, backend=backend)
        fastem.em_loss(entropy, logp, mask).backward()
        out[backend] = (entropy.detach(), logp.detach(), ln.grad.clone())
    for a, b in zip(out["torch"], out["triton"]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_adapt_transcripts_equal_across_backends(processor):
    audio = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    results = {}
    for backend in ("torch", "triton"):
        model = tiny_whisper()
        results[backend] = fastem.adapt(model, audio, processor=processor, language="en", steps=2, num_samples=2,
                                        lr=1e-2, max_new_tokens=5, seed=3, backend=backend)
    a, b = results["torch"], results["triton"]
    assert a.tokens == b.tokens and a.tokens_before == b.tokens_before
    for ha, hb in zip(a.history, b.history):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-4, abs=1e-4)
        assert ha["length"] == hb["length"]
