"""The per-token draw of the sampling loop: ``torch.multinomial`` against fastem's inverse-CDF draw.

    pytest benchmarks/bench_sampling.py --benchmark-only --benchmark-columns=min,median,mean,rounds

Rows of Whisper's vocabulary (V = 51,865) with suppressed tokens, R in {4, 16, 64} (K samples of one
clip, of a batch of four, of a batch of sixteen), one draw per row from one generator, as
:func:`fastem.sampling.categorical` is called at every token.  Same distribution (``tests/test_sampling.py``
checks it); the ratio of the two rows of one R is the figure.
"""
from __future__ import annotations

import pytest
import torch

from fastem.sampling import categorical

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V = 51_865


def _probs(rows: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, V, generator=g) * 4
    logits[:, 50_257:] = float("-inf")  # Whisper's special tokens, suppressed while sampling text
    return torch.softmax(logits, -1).to(DEVICE)


@pytest.mark.parametrize("rows", [4, 16, 64])
@pytest.mark.parametrize("draw", ["multinomial", "categorical"])
def test_draw(benchmark, draw, rows):
    probs = _probs(rows)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    if draw == "multinomial":
        def fn():
            return torch.multinomial(probs, 1, generator=gen).squeeze(1)
    else:
        def fn():
            return categorical(probs, generator=gen)
    benchmark.group = f"draw R={rows} V={V}"
    out = benchmark.pedantic(fn, rounds=30, warmup_rounds=3)
    assert out.shape == (rows,) and bool((out < 50_257).all())
