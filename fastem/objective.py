"""The sequence-entropy objective and its ablations, as surrogate losses.

Notation: an autoregressive model draws ``y = (y_1, ..., y_L)`` given ``x`` (``y_L`` is EOS, or the
sequence was cut at ``max_new_tokens``).  ``H_t`` is the entropy of the next-token distribution
``p(. | y_<t, x)`` from which ``y_t`` is drawn, ``logp_t = log p(y_t | y_<t, x)``.  The quantity fastem
minimizes is the *sequence entropy*

    H(Y|x) = E_y[ sum_{t=1..L} H_t(y_<t) ].

Differentiating (the score-function identity for the sampling distribution, the plain gradient for
the entropies inside) gives, exactly,

    grad H(Y|x) = E_y[ sum_t grad H_t ]  +  E_y[ sum_s (sum_{t>s} H_t) grad logp_s ].

``em_loss`` returns a scalar whose gradient is an unbiased one-batch estimate of one of these
objectives from ``K`` sampled sequences, given per-token ``entropy`` and ``logp`` tensors ``[K, T]``
(from :func:`fastem.ops.token_stats`) and a ``mask`` of real tokens (the EOS token counts, padding
after it does not):

``objective="em"`` (the full objective)
    ``L = 1/K sum_k [ sum_t H_t^k + sum_s sg(C_s^k - b_s^k) logp_s^k ]`` with the *cost-to-go*
    ``C_s = sum_{t>s} H_t`` (entropies after token ``s``, detached) and a baseline ``b``.  Its expected
    gradient equals ``grad H(Y|x)``, not up to a scale (``reduction="sum"``).

``objective="entropy"`` (token entropy at fixed prefixes)
    ``L = 1/K sum_k sum_t H_t^k``: the first term alone.  Evaluated on the greedy pseudo-label this is
    the SUTA-style teacher-forcing entropy loss.  It ignores that changing the model changes which
    prefixes are visited, so it is biased for ``H(Y|x)``.

``objective="pg"`` (REINFORCE with a sequence reward)
    ``L = 1/K sum_k sum_s sg(R^k - b^k) logp_s^k`` with the sequence cost ``R = sum_t H_t`` for every
    token: the score-function term alone, with the whole-sequence cost instead of the cost-to-go and
    without the direct entropy gradient.  Also biased for ``H(Y|x)``.

``objective="random"`` (the random-reward control)
    ``L = 1/K sum_k sum_s sg(R^k - b^k) logp_s^k`` with ``R^k`` drawn 0 or 1 with equal odds, independently
    of the sample (from ``generator``): the same update rule as ``pg`` with a reward that carries no
    information.  Its expected gradient is zero; a task score that moves under it moves for reasons other
    than the signal (the spurious-reward control of the language-model literature).

Baselines (subtracted from the cost; none changes the expectation except where noted):

* ``"none"``: ``b = 0``.
* ``"loo"``: leave-one-out, ``b_s^k = 1/(K-1) sum_{j != k} C_s^j`` (a sequence shorter than ``s`` has
  ``C_s = 0``).  Independent of sample ``k``, hence unbiased; with ``K = 1`` it is ``0``.
* ``"mean"``: ``b_s = 1/K sum_j C_s^j`` including the sample itself.  Lower variance but it scales the
  policy-gradient term by ``(K-1)/K`` in expectation (biased for finite ``K``).

``reduction="sum"`` sums over tokens and averages over the ``K`` samples (exact scale);
``reduction="mean"`` divides the same total by the number of real tokens instead.

Samples drawn from another distribution ``q`` (the model as it was a few optimizer steps ago, when the loop
reuses its hypotheses, ``AdaptConfig.sample_every``) enter with importance ``weights``
``w^k = p(y^k | x) / q(y^k | x)``, detached: each sample's terms are multiplied by ``w^k``.  Since
``E_q[w f(y)] = E_p[f(y)]`` for any ``f``, both terms keep their expectations (the leave-one-out baseline is still
independent of the sample it is subtracted from), so with the exact ratios the estimate is unbiased for
``grad H(Y|x)`` under the current model; the loop passes the ratios normalized to mean 1 over the ``K`` samples
(self-normalized importance sampling: consistent, lower variance).

``suta_loss`` is the SUTA baseline (Lin et al., 2022) on teacher-forced logits of the greedy
pseudo-label: ``em_coef * mean_t H(softmax(z_t / T)) + (1 - em_coef) * MCC``, the minimum class
confusion term with SUTA's entropy re-weighting, computed without the ``V x V`` class-correlation
matrix (see :func:`mcc_loss`).
"""
from __future__ import annotations

import torch

SEQUENCE_OBJECTIVES = ("em", "entropy", "pg", "random")  # what em_loss computes
#: the objectives with a policy-gradient term (they need sampled hypotheses)
POLICY_OBJECTIVES = ("em", "pg", "random")
OBJECTIVES = SEQUENCE_OBJECTIVES + ("suta",)
BASELINES = ("none", "loo", "mean")
REDUCTIONS = ("sum", "mean")

__all__ = ["OBJECTIVES", "SEQUENCE_OBJECTIVES", "POLICY_OBJECTIVES", "BASELINES", "REDUCTIONS", "em_loss", "cost_to_go",
           "entropy_rows", "mcc_loss", "suta_loss"]


def cost_to_go(entropy: torch.Tensor) -> torch.Tensor:
    """``C_s = sum_{t>s} H_t`` along the last dimension (entropies must already be masked)."""
    return entropy.flip(-1).cumsum(-1).flip(-1) - entropy


def _baseline(cost: torch.Tensor, kind: str) -> torch.Tensor:
    k = cost.shape[0]
    if kind == "none" or (kind == "loo" and k == 1):
        return torch.zeros_like(cost)
    total = cost.sum(0, keepdim=True)
    if kind == "loo":
        return (total - cost) / (k - 1)
    return total.expand_as(cost) / k  # "mean"


def em_loss(entropy: torch.Tensor, logp: torch.Tensor, mask: torch.Tensor, *, objective: str = "em",
            baseline: str = "loo", reduction: str = "sum", generator: torch.Generator | None = None,
            weights: torch.Tensor | None = None) -> torch.Tensor:
    """Surrogate loss for ``K`` sampled sequences of one input; see the module docstring.

    ``entropy``, ``logp``: ``[K, T]`` per-token entropy and log-prob of the sampled token,
    differentiable.  ``mask``: ``[K, T]`` bool/0-1, true for real tokens (EOS included).  ``generator``
    draws the random rewards of ``objective="random"`` (the global generator when None).  ``weights``:
    ``[K]`` importance weights of samples drawn from another distribution (None: drawn from this one);
    they are treated as constants.
    """
    if objective not in SEQUENCE_OBJECTIVES:
        raise ValueError(f"em_loss objective must be one of {SEQUENCE_OBJECTIVES}, got {objective!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if entropy.dim() != 2 or entropy.shape != logp.shape or entropy.shape != mask.shape:
        raise ValueError("entropy, logp and mask must all be [K, T] with the same shape, got "
                         f"{tuple(entropy.shape)}, {tuple(logp.shape)}, {tuple(mask.shape)}")
    if weights is not None and (weights.dim() != 1 or weights.shape[0] != entropy.shape[0]):
        raise ValueError(f"weights must be [K] = [{entropy.shape[0]}], got {tuple(weights.shape)}")
    m = mask.to(entropy.dtype)
    ent = entropy * m
    # each sample's terms scaled by its weight (a [K, 1] column; 1 without weights)
    w = 1.0 if weights is None else weights.detach().to(entropy.dtype).unsqueeze(1)
    total = torch.zeros((), dtype=entropy.dtype, device=entropy.device)
    if objective in ("em", "entropy"):
        total = total + (ent * w).sum()
    if objective in POLICY_OBJECTIVES:
        h = ent.detach()
        if objective == "em":
            cost = cost_to_go(h)
        elif objective == "pg":
            cost = h.sum(-1, keepdim=True).expand_as(h)
        else:  # "random": a fair coin per sample, whatever it says
            device = generator.device if generator is not None else h.device
            coin = torch.randint(0, 2, (h.shape[0], 1), generator=generator, device=device)
            cost = coin.to(device=h.device, dtype=h.dtype).expand_as(h)
        advantage = (cost - _baseline(cost, baseline)) * m
        total = total + (advantage * (logp * m) * w).sum()
    if reduction == "sum":
        return total / entropy.shape[0]
    return total / m.sum().clamp_min(1.0)


def entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per row; ``-inf`` logits (impossible classes) contribute 0."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def mcc_loss(logits: torch.Tensor, *, reweight: bool = True) -> torch.Tensor:
    """SUTA's minimum class confusion on ``logits [N, V]`` (already divided by the temperature).

    SUTA forms ``C = P^T diag(w) P`` (``P [N, V]`` the token distributions, ``w`` the detached
    weights ``1 + exp(-H_t)`` rescaled to sum to ``N``), divides column ``j`` by its sum ``s_j`` and
    returns ``(sum(C') - trace(C')) / V``.  The normalised matrix sums to the number of classes with
    ``s_j > 0`` and its trace is ``sum_j C_jj / s_j`` with ``C_jj = sum_t w_t p_tj^2``, so the loss is
    computed in ``O(N V)``.  Classes no token can take (suppressed, ``p = 0``: SUTA's formula gives
    0/0 there) are left out, and ``V`` counts the others.
    """
    p = torch.softmax(logits.float(), dim=-1)
    n = p.shape[0]
    if reweight:
        w = 1.0 + torch.exp(-entropy_rows(logits.float()).detach())
        w = n * w / w.sum()
    else:
        w = torch.ones(n, device=p.device)
    s = (w.unsqueeze(1) * p).sum(0)
    diag = (w.unsqueeze(1) * p * p).sum(0)
    live = s > 0
    classes = live.sum().clamp_min(1)
    return (classes - (diag[live] / s[live]).sum()) / classes


def suta_loss(logits: torch.Tensor, *, em_coef: float = 0.5, reweight: bool = True) -> torch.Tensor:
    """SUTA's loss on the teacher-forced logits ``[N, V]`` of one greedy pseudo-label (divided by the
    temperature): ``em_coef * mean_t H_t + (1 - em_coef) * mcc_loss``."""
    if logits.dim() != 2 or logits.shape[0] == 0:
        raise ValueError(f"logits must be [N, V] with N >= 1, got {tuple(logits.shape)}")
    if not 0.0 <= em_coef <= 1.0:
        raise ValueError(f"em_coef must be in [0, 1], got {em_coef!r}")
    loss = torch.zeros((), device=logits.device)
    if em_coef > 0:
        loss = loss + em_coef * entropy_rows(logits.float()).mean()
    if em_coef < 1:
        loss = loss + (1.0 - em_coef) * mcc_loss(logits, reweight=reweight)
    return loss
