"""Per-token entropy and target log-probability over the vocabulary.

For logits ``z`` of one row (softmax ``p``, log-normaliser ``lse``) and target ``y``::

    H    = lse - sum_v p_v z_v          (entropy of softmax(z), >= 0)
    logp = z_y - lse                    (log-probability of the target)

Gradients, for upstream ``gH`` and ``gL`` of a row::

    dz = gL * (onehot(y) - p) - gH * p * (log p + H)

Entries equal to ``-inf`` (suppressed tokens) have ``p = 0`` and contribute nothing;
results and gradients stay finite.  Targets equal to ``IGNORE_INDEX`` give ``logp = 0``
and no gradient through ``logp``.

Two implementations: :func:`token_stats_reference` (PyTorch) and :func:`token_stats_triton`
(fused Triton kernels, one read of the logits forward, one read + one write backward, with the
autograd Function :class:`TokenStatsFunction`).  Triton is imported on the first kernel call only.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # bound lazily at first launch (see _triton_utils.jit); named here for linters
    import triton.language as tl

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


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
# The kernels below are plain functions handed to ``triton.jit`` on first use (see
# ``_triton_utils.jit``): importing this module never imports Triton.  ``tl`` is injected into
# this module's globals at that moment.
#
# Forward, one program per row, one pass over the vocabulary in blocks of BLOCK_V:
#   m  running max (a scalar: one block reduction per block),
#   d  per-lane sums of exp(z - m),
#   b  per-lane sums of (z - m) * exp(z - m)     (shifted by the running max, see below),
# rescaled by alpha = exp(m_old - m_new) when the max grows.  At the end
#   lse = m + log d,   H = log d - b / d,   logp = (z_y - m) - log d.
# lse is kept as the pair (m, log d) (two floats per row): z - m is exact for z near the max, so
# p = exp((z - m) - log d) keeps full float32 accuracy even for logits of size 1e4, where a rounded
# float32 lse would be off by up to 5e-4 (and p by as much, relatively).
# Keeping b relative to the running max (instead of sum z * exp(z - m)) is the same quantity
# (H = m + log d - b'/d with b' = b + m d) but never cancels two numbers of the size of |z|: with
# logits around 1e4 the plain form loses ~1e-3 of absolute entropy in float32, this one does not.
#
# -inf entries: the running max starts at -inf (not 0); exponentials are taken relative to
# ``m_safe`` (0 while the max is still -inf), so exp(-inf - m_safe) = 0 and no inf - inf appears;
# (z - m) * exp(z - m) is taken as 0 for z = -inf.


def _token_stats_fwd_kernel(z_ptr, y_ptr, ent_ptr, logp_ptr, mx_ptr, logd_ptr, stride_row, V,
                            IGNORE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_off = row * stride_row
    base = z_ptr + row_off
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), ACC)
    d = tl.zeros([BLOCK_V], ACC)
    b = tl.zeros([BLOCK_V], ACC)
    # Blocks start on 16-byte boundaries (VEC elements; rows of V = 51865 are not aligned): the
    # first block begins up to VEC - 1 columns before the row, so all full blocks load unmasked
    # 16-byte vectors; only the first and the last block are masked.
    for start in range(-(row_off % VEC).to(tl.int32), V, BLOCK_V):
        cols = start + offs
        off = tl.multiple_of(row_off + start, VEC)
        if (start >= 0) & (start + BLOCK_V <= V):
            z = tl.load(z_ptr + off + offs).to(ACC)
        else:
            z = tl.load(z_ptr + off + offs, mask=(cols >= 0) & (cols < V), other=float("-inf")).to(ACC)
        m_new = tl.maximum(m, tl.max(z, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        alpha = tl.exp(m - m_safe)                                        # 0 while m was -inf
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe).to(ACC)    # <= 0
        e = tl.exp(z - m_safe)
        s = tl.where(z == float("-inf"), 0.0, z - m_safe).to(ACC)
        b = alpha * (b + shift * d) + s * e
        d = alpha * d + e
        m = m_new
    d_row = tl.sum(d, 0)
    b_row = tl.sum(b, 0)
    log_d = tl.log(d_row)
    ent = log_d - b_row / d_row
    ent = tl.where(ent < 0.0, 0.0, ent).to(ACC)   # rounding only; NaN (all -inf row) stays NaN
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != IGNORE
    in_range = (y >= 0) & (y < V)
    zy = tl.load(base + tl.where(in_range, y, 0), mask=valid & in_range, other=0.0).to(ACC)
    logp = tl.where(valid, tl.where(in_range, (zy - m) - log_d, float("nan")), 0.0).to(ACC)
    tl.store(ent_ptr + row, ent)
    tl.store(logp_ptr + row, logp)
    tl.store(mx_ptr + row, m)
    tl.store(logd_ptr + row, log_d)


# Backward, one program per row, one pass: dz = gL*(onehot(y) - p) - gH*p*(log p + H).
# ``dz_ptr`` may equal ``z_ptr`` (in-place): every element is read before it is written, by the
# same program in the same iteration.
def _token_stats_bwd_kernel(z_ptr, y_ptr, mx_ptr, logd_ptr, ent_ptr, gh_ptr, gl_ptr, dz_ptr, stride_z, stride_dz, V,
                            IGNORE: tl.constexpr, BLOCK_V: tl.constexpr, VEC: tl.constexpr, ACC: tl.constexpr):
    # VEC > 1 only when z and dz rows share one alignment (same stride, both 16-byte aligned).
    row = tl.program_id(0).to(tl.int64)
    z_off = row * stride_z
    dz_off = row * stride_dz
    mx = tl.load(mx_ptr + row).to(ACC)
    log_d = tl.load(logd_ptr + row).to(ACC)
    ent = tl.load(ent_ptr + row).to(ACC)
    gh = tl.load(gh_ptr + row).to(ACC)
    y = tl.load(y_ptr + row).to(tl.int64)
    gl = tl.where(y != IGNORE, tl.load(gl_ptr + row).to(ACC), 0.0).to(ACC)
    offs = tl.arange(0, BLOCK_V)
    for start in range(-(z_off % VEC).to(tl.int32), V, BLOCK_V):     # aligned blocks, as in the forward
        cols = start + offs
        zo = tl.multiple_of(z_off + start, VEC)
        do = tl.multiple_of(dz_off + start, VEC)
        full = (start >= 0) & (start + BLOCK_V <= V)
        if full:
            z = tl.load(z_ptr + zo + offs).to(ACC)
        else:
            z = tl.load(z_ptr + zo + offs, mask=(cols >= 0) & (cols < V), other=float("-inf")).to(ACC)
        logp_v = (z - mx) - log_d      # z - mx is exact near the max, even at |z| ~ 1e4
        p = tl.exp(logp_v)
        t = tl.where(z == float("-inf"), 0.0, logp_v + ent).to(ACC)   # p log p -> 0 where p == 0
        dz = -p * (gl + gh * t)
        dz = tl.where(cols == y, dz + gl, dz).to(dz_ptr.dtype.element_ty)
        if full:
            tl.store(dz_ptr + do + offs, dz)
        else:
            tl.store(dz_ptr + do + offs, dz, mask=(cols >= 0) & (cols < V))


_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype):
    from . import _triton_utils as tu

    _, tl = tu.import_triton()
    return tl.float64 if dtype == torch.float64 else tl.float32


def _vec(*tensors: torch.Tensor) -> int:
    """Elements per 16 bytes when every tensor starts 16-byte aligned (the kernels then align their
    blocks to 16-byte boundaries), else 1."""
    elem = tensors[0].element_size()
    if all(t.data_ptr() % 16 == 0 for t in tensors):
        return 16 // elem
    return 1


def _block_v(V: int, dtype: torch.dtype, block_v: int | None) -> tuple[int, int]:
    """(BLOCK_V, num_warps).  4096-wide blocks (16 elements per thread at 8 warps) amortise the one
    block reduction per iteration of the forward; float64 halves it to stay within registers."""
    from ._triton_utils import next_power_of_2

    if block_v is None:
        block_v = min(2048 if dtype == torch.float64 else 4096, next_power_of_2(V))
    block_v = max(16, int(block_v))
    num_warps = 8 if block_v >= 2048 else (4 if block_v >= 512 else 2)
    return block_v, num_warps


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if targets.shape != logits.shape[:1]:
        raise ValueError(f"targets must be [N] = [{logits.shape[0]}], got {tuple(targets.shape)}")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(f"logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.shape[1] == 0:
        raise ValueError("logits must have at least one column")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")


def _token_stats_fwd(logits: torch.Tensor, targets: torch.Tensor, *, out: tuple | None = None,
                     block_v: int | None = None):
    """Launch the forward kernel: ``(entropy [N], logp [N], lse2 [2, N])`` of the compute dtype, where
    ``lse2 = (row max, log sum exp(z - max))``.

    ``logits`` must have unit stride along the vocabulary.  ``out`` (tests) passes the three output
    tensors preallocated.
    """
    from . import _triton_utils as tu

    tu.check_tensors(logits, targets)
    N, V = logits.shape
    ent, logp, lse = tu.stats_outputs(N, tu.acc_dtype(logits.dtype), logits.device, out)
    if N == 0:
        return ent, logp, lse
    BLOCK_V, num_warps = _block_v(V, logits.dtype, block_v)
    kernel = tu.jit(globals(), _token_stats_fwd_kernel)
    kernel[(N,)](logits, targets, ent, logp, lse[0], lse[1], logits.stride(0), V,
                 IGNORE=IGNORE_INDEX, BLOCK_V=BLOCK_V, VEC=_vec(logits), ACC=_acc_dtype(logits.dtype),
                 num_warps=num_warps)
    return ent, logp, lse


def _token_stats_bwd(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                     grad_entropy: torch.Tensor, grad_logp: torch.Tensor, *, out: torch.Tensor | None = None,
                     block_v: int | None = None) -> torch.Tensor:
    """Launch the backward kernel: ``dlogits [N, V]`` in ``logits.dtype``, written to ``out`` (which may
    be ``logits`` itself: in place) or to a new tensor."""
    from . import _triton_utils as tu

    N, V = logits.shape
    if out is None:
        out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if out.shape != logits.shape or out.stride(1) != 1 or out.dtype != logits.dtype:
        raise ValueError("out must be [N, V] of the logits' dtype with unit column stride")
    if N == 0:
        return out
    acc = lse.dtype
    gh = grad_entropy.to(acc).contiguous()
    gl = grad_logp.to(acc).contiguous()
    BLOCK_V, num_warps = _block_v(V, logits.dtype, block_v)
    kernel = tu.jit(globals(), _token_stats_bwd_kernel)
    vec = _vec(logits, out) if logits.stride(0) == out.stride(0) else 1
    kernel[(N,)](logits, targets, lse[0], lse[1], entropy, gh, gl, out, logits.stride(0), out.stride(0), V,
                 IGNORE=IGNORE_INDEX, BLOCK_V=BLOCK_V, VEC=vec, ACC=_acc_dtype(logits.dtype), num_warps=num_warps)
    return out


class TokenStatsFunction(torch.autograd.Function):
    """Autograd wrapper of the fused kernels.  Saves the logits and, per row, lse (as max and log-sum)
    and H."""

    @staticmethod
    def forward(ctx, logits, targets, inplace_backward, block_v):
        owns = False
        if logits.stride(1) != 1:
            logits = logits.contiguous()   # a private copy: its buffer may always take the gradient
            owns = True
        if targets.dtype != torch.int64 or not targets.is_contiguous():
            targets = targets.to(torch.int64).contiguous()
        entropy, logp, lse = _token_stats_fwd(logits, targets, block_v=block_v)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.inplace = bool(inplace_backward) or owns
        ctx.block_v = block_v
        return entropy, logp

    @staticmethod
    def backward(ctx, grad_entropy, grad_logp):
        logits, targets, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(entropy)
        if grad_logp is None:
            grad_logp = torch.zeros_like(entropy)
        out = logits if ctx.inplace else None
        grad = _token_stats_bwd(logits, targets, lse, entropy, grad_entropy, grad_logp, out=out,
                                block_v=ctx.block_v)
        if ctx.inplace:
            # Any other autograd node that saved this buffer now fails loudly instead of reading
            # gradients as logits.
            torch.autograd.graph.increment_version(logits)
        return grad, None, None, None


def token_stats_triton(logits: torch.Tensor, targets: torch.Tensor, *, inplace_backward: bool = False,
                       block_v: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton ``(entropy [N], logp [N])`` of ``logits [N, V]``; same contract as
    :func:`token_stats_reference` (float32 results, float64 for float64 logits).

    * dtypes: float16 / bfloat16 / float32 / float64 logits, accumulated in float32 (float64 for
      float64); the gradient has the logits' dtype.
    * strides: rows may have any stride (offsets are int64, so ``row * stride`` beyond 2**31 is
      fine); a non-unit column stride is copied to a contiguous tensor first.
    * ``inplace_backward=True`` writes ``dlogits`` over the logits' buffer and returns that buffer
      as the gradient (no [N, V] allocation in backward).  Only for logits that nothing else reads
      afterwards (e.g. the fresh output of the LM head); refused for leaf tensors.  The buffer's
      version counter is bumped, so another autograd node that saved it errors instead of reading
      garbage.  A non-contiguous input is copied privately, and that copy always takes the gradient.
    * ``-inf`` logits (suppressed tokens) have p = 0 and get a zero gradient (the target's logit
      excepted: its ``logp`` is ``-inf``, gradient ``gL``).  A row whose logits are **all** ``-inf``
      has no distribution: its entropy and logp are NaN (as in the reference) and its gradient row
      is NaN; other rows are unaffected and nothing raises.
    * targets outside ``[0, V)`` other than ``IGNORE_INDEX`` give ``logp = NaN`` (never an
      out-of-bounds read); ``IGNORE_INDEX`` gives ``logp = 0`` and no gradient through ``logp``.
    * ``block_v`` overrides the vocabulary block (tests use small blocks to exercise the online
      rescaling on small vocabularies).
    """
    _check_inputs(logits, targets)
    if inplace_backward and logits.requires_grad and logits.is_leaf:
        raise ValueError("inplace_backward=True would overwrite a leaf tensor with its own gradient")
    return TokenStatsFunction.apply(logits, targets, inplace_backward, block_v)
