"""Speed baselines: the obvious way to take an adaptation step (full logits, then the same loss), and the
median wall time of a call."""
from __future__ import annotations

import statistics
import time

import torch

__all__ = ["full_logits_backward", "median_seconds"]


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_logits_backward(logits: torch.Tensor, targets: torch.Tensor, eos: int, params) -> None:
    """``em_loss`` of ``K`` generated continuations from their full logits ``[K, T, V]`` (the vocabulary
    materialised, as a step built on ``generate`` does), backward, then the parameters' grads cleared."""
    from fastem.objective import em_loss

    logp_all = torch.log_softmax(logits.float(), -1)
    entropy = -(logp_all.exp() * torch.where(torch.isfinite(logp_all), logp_all, 0.0)).sum(-1)
    logp = logp_all.gather(2, targets.unsqueeze(2)).squeeze(2)
    mask = torch.cumsum((targets == eos).long(), 1) - (targets == eos).long() == 0
    em_loss(entropy, logp, mask).backward()
    for p in params:
        p.grad = None
        p.requires_grad_(False)
