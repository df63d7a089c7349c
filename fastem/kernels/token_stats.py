"""Per-token entropy and target log-probability over the vocabulary.

For logits ``z`` of one row (softmax ``p``, log-normaliser ``lse``) and target ``y``::

    H    = lse - sum_v p_v z_v          (entropy of softmax(z), >= 0)
    logp = z_y - lse                    (log-probability of the target)

Gradients, for upstream ``gH`` and ``gL`` of a row::

    dz = gL * (onehot(y) - p) - gH * p * (log p + H)

Entries equal to ``-inf`` (suppressed tokens) have ``p = 0`` and contribute nothing;
results and gradients stay finite.  Targets equal to ``IGNORE_INDEX`` give ``logp = 0``
and no gradient through ``logp``.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def token_stats_reference(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch ``(entropy, logp)`` for ``logits [N, V]`` and ``targets [N]``.

    Computed in float32 (float64 inputs stay float64); differentiable w.r.t. ``logits``.
    Returns two ``[N]`` tensors of the compute dtype.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N] = [{logits.shape[0]}], got {tuple(targets.shape)}")
    z = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    # -inf logits have p == 0; replace them by 0 so that p * z is 0, not nan, in value and gradient.
    z_finite = torch.where(torch.isneginf(z), torch.zeros((), dtype=z.dtype, device=z.device), z)
    entropy = (lse - (p * z_finite).sum(-1)).clamp_min(0.0)
    valid = targets != IGNORE_INDEX
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    z_target = z.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
    logp = torch.where(valid, z_target - lse, torch.zeros((), dtype=z.dtype, device=z.device))
    return entropy, logp
