"""Per-token entropy and target log-prob of ``logits = hidden @ weight.T + bias`` without the logits.

``linear_token_stats(hidden [N, D], weight [V, D], targets [N], bias [V] | None)`` returns the same
``(entropy [N], logp [N])`` as ``token_stats(hidden @ weight.T + bias, targets)`` (see
:mod:`fastem.kernels.token_stats` for the formulas, ``-inf`` and ``IGNORE_INDEX`` conventions), but
the ``[N, V]`` logits, softmax and logit gradient never exist in memory at once.

Forward (Triton, ``_lts_fwd_kernel``)
    A program owns a tile of ``BLOCK_N`` tokens and one contiguous *split* of the vocabulary.  It
    walks its split in ``BLOCK_V`` tiles; each logit tile ``[BLOCK_N, BLOCK_V]`` is one ``tl.dot``
    accumulation over ``D`` in float32 (``BLOCK_K`` steps), plus the bias, and is folded straight
    into per-row online statistics: running max ``m``, ``d = sum exp(z - m)``, ``b = sum (z - m)
    exp(z - m)`` (shifted by the max, so no cancellation at large |z|) and the target logit.  The
    per-(split, row) partials (4 floats) are merged by a tiny second kernel into ``lse``, ``H`` and
    ``logp``.  Splitting the vocabulary is what keeps the GPU full at small ``N``: the grid is
    ``cdiv(N, BLOCK_N) x splits`` with about 8 programs per SM, token tiles fastest so that the
    programs in flight share the same weight tiles through L2.  Each program's matmul tile stays
    128 x 128 (no token chunking, unlike Liger's fused linear cross-entropy whose small chunks
    underfill the matmul).

Backward (Triton tile kernel + cuBLAS on large vocabulary chunks)
    ``dlogits = gL (onehot(y) - p) - gH p (log p + H)`` is needed by two matmuls,
    ``grad_hidden = dlogits @ weight`` and ``grad_weight = dlogits.T @ hidden``.  We walk the
    vocabulary in chunks of ``Vc`` columns (all ``N`` tokens at once): ``_lts_dlogits_kernel``
    recomputes the logit tiles of the chunk with ``tl.dot`` (same tiling as the forward, so ``p`` is
    consistent with the saved ``lse``) and writes ``dlogits`` for the chunk into one reusable
    ``[N, Vc]`` buffer in the input dtype; then cuBLAS does ``grad_hidden += buf @ W[chunk]`` (float32
    accumulator, ``out_dtype=float32`` on CUDA) and ``grad_weight[chunk] = buf.T @ hidden`` (a single
    GEMM with K = N, float32 accumulation inside cuBLAS, written in place into the output rows).

    Why not fully fused ``tl.dot`` accumulation of both gradients (as Cut Cross-Entropy does)?  It
    needs atomics on ``grad_hidden`` across vocabulary tiles and on ``grad_weight`` across token
    tiles (or a second recompute pass), in float32 buffers of [N, D] and [V, D].  The chunked
    scheme instead runs the two gradient GEMMs as large, well-shaped cuBLAS calls (``N x Vc x D``
    with ``Vc`` in the thousands) and pays one bounded buffer: ``Vc`` is chosen so the buffer is at
    most ``chunk_bytes`` (256 MiB default: ``Vc = 8192`` at N = 16384 in bf16).  Peak extra memory
    of the backward is about ``chunk_bytes + 4 N D`` (the float32 grad_hidden accumulator) + the
    outputs, i.e. ~0.45 GB at N = 16384, D = 1280, bf16 (estimate) against well over 10 GB for eager
    (bf16 logits 1.7 GB, their float32 copy, softmax and products 3.4 GB each, the gradients).
    ``test_gpu_peak_memory_target`` measures both on a GPU.

    Weight not requiring grad: no ``grad_weight`` GEMM.  Bias requiring grad: ``grad_bias[chunk] =
    buf.sum(0)`` in float32.  Hidden not requiring grad: no ``grad_hidden`` GEMM.

float32 inputs use TF32 in ``tl.dot`` where ``torch.backends.cuda.matmul.allow_tf32`` is set (as a
torch matmul would) and 3xTF32 (float32 accuracy on tensor cores) otherwise; float64 (verification,
gradcheck) computes in float64.  Under Triton's
interpreter the half-precision tiles are cast to float32 before ``tl.dot`` (the interpreter's bf16
dot is wrong); the bits of the inputs are the same, only the products are formed in float32.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # bound lazily at first launch (see _triton_utils.jit); named here for linters
    import triton.language as tl

from . import _triton_utils as tu
from .token_stats import IGNORE_INDEX, token_stats_reference

__all__ = ["linear_token_stats_reference", "linear_token_stats_triton", "LinearTokenStatsFunction"]


def linear_token_stats_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 bias: torch.Tensor | None = None, *, chunk_size: int | None = None):
    """Plain PyTorch: ``token_stats_reference(hidden @ weight.T + bias, targets)``.

    ``chunk_size`` splits the tokens into chunks (bounding the forward's temporaries; autograd
    still keeps each chunk's logits for the backward).  Differentiable w.r.t. all inputs.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if chunk_size is None or chunk_size >= hidden.shape[0]:
        logits = torch.nn.functional.linear(hidden, weight, bias)
        return token_stats_reference(logits, targets)
    ents, logps = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        logits = torch.nn.functional.linear(hidden[start:start + chunk_size], weight, bias)
        e, lp = token_stats_reference(logits, targets[start:start + chunk_size])
        ents.append(e)
        logps.append(lp)
    return torch.cat(ents), torch.cat(logps)


# ----------------------------------------------------------------------------------------------
# Triton kernels (plain functions, ``triton.jit``-ed on first use; see _triton_utils.jit)
# ----------------------------------------------------------------------------------------------

@tu.device
def _logits_tile(h_ptr, w_ptr, bias_ptr, rows_ld, cols, col_mask, V, D,
                 stride_hn, stride_hd, stride_wv, stride_wd, stride_bias,
                 HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 EVEN_K: tl.constexpr, ACC: tl.constexpr, DOT_CAST: tl.constexpr, PRECISION: tl.constexpr):
    """The logit tile ``hidden[rows_ld] @ weight[cols].T (+ bias[cols])`` ``[BLOCK_N, BLOCK_V]`` in ``ACC``:
    one ``tl.dot`` accumulation over ``D`` in ``BLOCK_K`` steps (device helper, inlined by Triton;
    the forward and the dlogits kernels share it, so their logits agree bit for bit).

    Rows / columns past the end load wrapped (``rows_ld = rows % N``, ``cols % V``) in-bounds data
    instead of being masked, so the K loop needs no mask when ``EVEN_K`` (D % BLOCK_K == 0); the
    callers' epilogues mask them out.  ``col_mask`` masks the bias load only."""
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows_ld[:, None] * stride_hn + offs_k[None, :] * stride_hd
    w_ptrs = w_ptr + (cols % V).to(tl.int64)[None, :] * stride_wv + offs_k[:, None] * stride_wd
    acc = tl.zeros([BLOCK_N, BLOCK_V], ACC)
    for k0 in range(0, D, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k0 + offs_k) < D
            h = tl.load(h_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_CAST:
            h = h.to(ACC)
            w = w.to(ACC)
        acc = tl.dot(h, w, acc, input_precision=PRECISION, out_dtype=ACC)
        h_ptrs += BLOCK_K * stride_hd
        w_ptrs += BLOCK_K * stride_wd
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols.to(tl.int64) * stride_bias, mask=col_mask, other=0.0).to(ACC)
        acc = acc + bias[None, :]
    return acc


def _lts_fwd_kernel(h_ptr, w_ptr, bias_ptr, y_ptr, pm_ptr, pd_ptr, pb_ptr, pz_ptr,
                    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, stride_bias,
                    tiles_per_split,
                    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, ACC: tl.constexpr, DOT_CAST: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    rows_ld = (rows % N).to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
    offs_v = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_N], float("-inf"), ACC)
    d = tl.zeros([BLOCK_N], ACC)
    b = tl.zeros([BLOCK_N], ACC)
    zy = tl.zeros([BLOCK_N], ACC)
    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + offs_v
        col_mask = cols < V
        # rows / columns past the end are computed from wrapped data; masked out here
        acc = _logits_tile(h_ptr, w_ptr, bias_ptr, rows_ld, cols, col_mask, V, D,
                           stride_hn, stride_hd, stride_wv, stride_wd, stride_bias,
                           HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, ACC, DOT_CAST, PRECISION)
        z = tl.where(col_mask[None, :], acc, float("-inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe).to(ACC)
        e = tl.exp(z - m_safe[:, None])
        s = tl.where(z == float("-inf"), 0.0, z - m_safe[:, None]).to(ACC)
        b = alpha * (b + shift * d) + tl.sum(s * e, 1)
        d = alpha * d + tl.sum(e, 1)
        m = m_new

    # partials, each [S, N]: running max, sum of exponentials, shifted sum, target logit
    off = pid_s.to(tl.int64) * N + rows64
    tl.store(pm_ptr + off, m, mask=row_mask)
    tl.store(pd_ptr + off, d, mask=row_mask)
    tl.store(pb_ptr + off, b, mask=row_mask)
    tl.store(pz_ptr + off, zy, mask=row_mask)


def _lts_combine_kernel(pm_ptr, pd_ptr, pb_ptr, pz_ptr, y_ptr, ent_ptr, logp_ptr, mx_ptr, logd_ptr, N, S, V,
                        IGNORE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < N
    splits = tl.arange(0, BLOCK_S)
    mask = (splits[:, None] < S) & row_mask[None, :]
    off = splits.to(tl.int64)[:, None] * N + rows.to(tl.int64)[None, :]
    m = tl.load(pm_ptr + off, mask=mask, other=float("-inf"))
    d = tl.load(pd_ptr + off, mask=mask, other=0.0)
    b = tl.load(pb_ptr + off, mask=mask, other=0.0)
    zy = tl.load(pz_ptr + off, mask=mask, other=0.0)
    mx = tl.max(m, 0)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx).to(ACC)
    scale = tl.exp(m - mx_safe[None, :])
    shift = tl.where(m == float("-inf"), 0.0, m - mx_safe[None, :]).to(ACC)
    d_row = tl.sum(scale * d, 0)
    b_row = tl.sum(scale * (b + shift * d), 0)
    z_t = tl.sum(zy, 0)
    log_d = tl.log(d_row)
    ent = log_d - b_row / d_row
    ent = tl.where(ent < 0.0, 0.0, ent).to(ACC)
    y = tl.load(y_ptr + rows, mask=row_mask, other=IGNORE).to(tl.int64)
    valid = y != IGNORE
    in_range = (y >= 0) & (y < V)
    logp = tl.where(valid, tl.where(in_range, (z_t - mx) - log_d, float("nan")), 0.0).to(ACC)
    tl.store(ent_ptr + rows, ent, mask=row_mask)
    tl.store(logp_ptr + rows, logp, mask=row_mask)
    tl.store(mx_ptr + rows, mx, mask=row_mask)
    tl.store(logd_ptr + rows, log_d, mask=row_mask)


def _lts_dlogits_kernel(h_ptr, w_ptr, bias_ptr, y_ptr, mx_ptr, logd_ptr, ent_ptr, gh_ptr, gl_ptr, out_ptr,
                        N, V, D, v_start, v_count, stride_hn, stride_hd, stride_wv, stride_wd, stride_bias,
                        stride_out,
                        HAS_BIAS: tl.constexpr, IGNORE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr, EVEN_K: tl.constexpr,
                        ACC: tl.constexpr, DOT_CAST: tl.constexpr, PRECISION: tl.constexpr):
    # 1-D grid over (token tiles x vocabulary tiles of this chunk), grouped so that GROUP_N token
    # tiles sweep the same weight tiles together (L2 reuse, as in Triton's matmul tutorial).
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(v_count, BLOCK_V)
    in_group = GROUP_N * num_pid_v
    first_n = (pid // in_group) * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + (pid % in_group) % group_size
    pid_v = (pid % in_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)     # column inside the chunk
    col_mask = local < v_count
    cols = v_start + local
    rows_ld = (rows % N).to(tl.int64)          # wrapped, in-bounds loads (see _logits_tile)
    acc = _logits_tile(h_ptr, w_ptr, bias_ptr, rows_ld, cols, col_mask, V, D,
                       stride_hn, stride_hd, stride_wv, stride_wd, stride_bias,
                       HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, EVEN_K, ACC, DOT_CAST, PRECISION)

    mx = tl.load(mx_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    log_d = tl.load(logd_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    gh = tl.load(gh_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    y = tl.load(y_ptr + rows, mask=row_mask, other=IGNORE).to(tl.int64)
    gl = tl.load(gl_ptr + rows, mask=row_mask, other=0.0).to(ACC)
    gl = tl.where(y != IGNORE, gl, 0.0).to(ACC)
    logp_v = (acc - mx[:, None]) - log_d[:, None]
    p = tl.exp(logp_v)
    t = tl.where(acc == float("-inf"), 0.0, logp_v + ent[:, None]).to(ACC)
    dz = -p * (gl[:, None] + gh[:, None] * t)
    dz = tl.where(cols[None, :] == y[:, None], dz + gl[:, None], dz)
    out_ptrs = out_ptr + rows64[:, None] * stride_out + local.to(tl.int64)[None, :]
    tl.store(out_ptrs, dz.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
DEFAULT_CHUNK_BYTES = 256 << 20


def _config(dtype: torch.dtype, interp: bool) -> dict:
    """Tile sizes.

    GPU, half precision: 128 x 128 logit tiles, K steps of 64, 8 warps, 3 stages (compiled offline
    for sm_90: wgmma, 254 registers, no spills, 96 KB of shared memory); float32: 64 x 128 x 32.
    Interpreter: 32 x 128 tiles, K steps of 32 (its cost is per tile operation; the tests choose
    shapes that span several row tiles, vocabulary tiles, K steps, splits and chunks)."""
    if interp:
        return dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=32, num_warps=1, num_stages=1)
    if dtype == torch.float64:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=16, num_warps=4, num_stages=2)
    if dtype == torch.float32:
        # 128 x 128 float32 tiles spill registers in the softmax epilogue (ptxas, sm_90); 64 x 128 does not.
        return dict(BLOCK_N=64, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3)


def _check(hidden, weight, targets, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"need hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if hidden.dtype not in _SUPPORTED or weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError("weight must be non-empty")
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_floating_point()):
        raise ValueError(f"bias must be a float [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")


def _launch_args(hidden, weight, bias):
    _, tl = tu.import_triton()
    interp = tu.interpreting()
    acc_t = tl.float64 if hidden.dtype == torch.float64 else tl.float32
    dot_cast = interp and hidden.dtype in (torch.float16, torch.bfloat16)
    cfg = _config(hidden.dtype, interp)
    bias_arg = bias if bias is not None else hidden   # any pointer; never read without HAS_BIAS
    stride_bias = bias.stride(0) if bias is not None else 0
    return acc_t, dot_cast, cfg, bias_arg, stride_bias


def _lts_forward(hidden, weight, targets, bias=None, *, num_splits: int | None = None, out: tuple | None = None):
    """Forward launch: ``(entropy [N], logp [N], lse2 [2, N])`` in float32 (float64 for float64 inputs),
    ``lse2 = (row max, log sum exp(z - max))``."""
    acc_t, dot_cast, cfg, bias_arg, stride_bias = _launch_args(hidden, weight, bias)
    tu.check_tensors(hidden, weight, targets, *(() if bias is None else (bias,)))
    N, D = hidden.shape
    V = weight.shape[0]
    acc = tu.acc_dtype(hidden.dtype)
    ent, logp, lse = tu.stats_outputs(N, acc, hidden.device, out)
    if N == 0:
        return ent, logp, lse
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    n_tiles_n = -(-N // BN)
    n_tiles_v = -(-V // BV)
    if num_splits is None:
        # ~8 programs per SM, at most 128 splits (the combine kernel holds all splits of a row).
        num_splits = -(-8 * tu.num_sms(hidden.device) // n_tiles_n)
    num_splits = max(1, min(int(num_splits), n_tiles_v, 128))
    tiles_per_split = -(-n_tiles_v // num_splits)
    num_splits = -(-n_tiles_v // tiles_per_split)   # no empty split
    part = torch.empty(4, num_splits, N, dtype=acc, device=hidden.device)
    fwd = tu.jit(globals(), _lts_fwd_kernel)
    fwd[(n_tiles_n, num_splits)](
        hidden, weight, bias_arg, targets, part[0], part[1], part[2], part[3], N, V, D,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), stride_bias, tiles_per_split,
        HAS_BIAS=bias is not None, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, EVEN_K=D % BK == 0, ACC=acc_t,
        DOT_CAST=dot_cast,
        PRECISION=tu.dot_precision(hidden.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    BLOCK_S = max(2, tu.next_power_of_2(num_splits))
    BLOCK_R = max(1, min(128, 4096 // BLOCK_S))
    comb = tu.jit(globals(), _lts_combine_kernel)
    comb[(-(-N // BLOCK_R),)](part[0], part[1], part[2], part[3], targets, ent, logp, lse[0], lse[1], N, num_splits, V,
                              IGNORE=IGNORE_INDEX, BLOCK_R=BLOCK_R, BLOCK_S=BLOCK_S, ACC=acc_t, num_warps=4)
    return ent, logp, lse


def _lts_dlogits_chunk(hidden, weight, targets, bias, lse, entropy, gh, gl, v_start, v_count, out):
    """Write ``dlogits[:, v_start:v_start+v_count]`` into ``out[:, :v_count]`` (``out`` unit column stride)."""
    acc_t, dot_cast, cfg, bias_arg, stride_bias = _launch_args(hidden, weight, bias)
    N, D = hidden.shape
    V = weight.shape[0]
    BN, BV, BK = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    grid = (-(-N // BN) * -(-v_count // BV),)
    kernel = tu.jit(globals(), _lts_dlogits_kernel)
    kernel[grid](hidden, weight, bias_arg, targets, lse[0], lse[1], entropy, gh, gl, out,
                 N, V, D, v_start, v_count, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                 stride_bias, out.stride(0),
                 HAS_BIAS=bias is not None, IGNORE=IGNORE_INDEX, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, GROUP_N=8,
                 EVEN_K=D % BK == 0,
                 ACC=acc_t, DOT_CAST=dot_cast, PRECISION=tu.dot_precision(hidden.dtype),
                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


_ADDMM_OUT_DTYPE_OK = True


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with ``acc`` float32 (or float64) and ``a, b`` possibly half precision.

    CUDA: cuBLAS with float32 output (``out_dtype``), so the partial products are never rounded to
    half precision.  Elsewhere (the interpreter path): the operands are upcast.
    """
    global _ADDMM_OUT_DTYPE_OK
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE_OK:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE_OK = False
    if a.is_cuda:
        try:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
            return
        except (RuntimeError, TypeError):
            acc.add_(a @ b)
            return
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_columns(N: int, V: int, elem_size: int, chunk_bytes: int, block_v: int) -> int:
    cols = max(1, chunk_bytes // max(1, N * elem_size))
    if cols >= V:
        return V
    return max(block_v, cols // block_v * block_v)


def _lts_backward(hidden, weight, targets, bias, lse, entropy, grad_entropy, grad_logp, *,
                  need_hidden: bool, need_weight: bool, need_bias: bool, chunk_bytes: int,
                  chunk_buffer: torch.Tensor | None = None):
    """Gradients ``(grad_hidden, grad_weight, grad_bias)`` (None where not needed)."""
    N, D = hidden.shape
    V = weight.shape[0]
    acc_dtype = lse.dtype
    if N == 0:
        return (torch.zeros_like(hidden) if need_hidden else None, torch.zeros_like(weight) if need_weight else None,
                torch.zeros_like(bias) if need_bias else None)
    gh = grad_entropy.to(acc_dtype).contiguous()
    gl = grad_logp.to(acc_dtype).contiguous()
    cfg = _config(hidden.dtype, tu.interpreting())
    vc = _chunk_columns(N, V, hidden.element_size(), chunk_bytes, cfg["BLOCK_V"])
    buf = chunk_buffer
    if buf is None:
        buf = torch.empty(N, vc, dtype=hidden.dtype, device=hidden.device)
    grad_h = torch.zeros(N, D, dtype=acc_dtype, device=hidden.device) if need_hidden else None
    grad_w = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else None
    grad_b = torch.empty(V, dtype=acc_dtype, device=hidden.device) if need_bias else None
    for v0 in range(0, V, vc):
        n = min(vc, V - v0)
        dl = _lts_dlogits_chunk(hidden, weight, targets, bias, lse, entropy, gh, gl, v0, n, buf)[:, :n]
        if need_hidden:
            _addmm_fp32_(grad_h, dl, weight[v0:v0 + n])
        if need_weight:
            if dl.is_cuda or dl.dtype not in (torch.float16, torch.bfloat16):
                torch.mm(dl.t(), hidden, out=grad_w[v0:v0 + n])
            else:
                grad_w[v0:v0 + n] = torch.mm(dl.t().float(), hidden.float()).to(grad_w.dtype)
        if need_bias:
            grad_b[v0:v0 + n] = dl.sum(0, dtype=acc_dtype)
    if grad_h is not None:
        grad_h = grad_h.to(hidden.dtype)
    if grad_b is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


class LinearTokenStatsFunction(torch.autograd.Function):
    """Autograd wrapper: saves hidden, weight, bias, targets and, per token, lse (as max and log-sum) and H."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_bytes, num_splits):
        if targets.dtype != torch.int64 or not targets.is_contiguous():
            targets = targets.to(torch.int64).contiguous()
        entropy, logp, lse = _lts_forward(hidden, weight, targets, bias, num_splits=num_splits)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.chunk_bytes = chunk_bytes
        return entropy, logp

    @staticmethod
    def backward(ctx, grad_entropy, grad_logp):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(entropy)
        if grad_logp is None:
            grad_logp = torch.zeros_like(entropy)
        gh, gw, gb = _lts_backward(hidden, weight, targets, bias, lse, entropy, grad_entropy, grad_logp,
                                   need_hidden=need_h, need_weight=need_w, need_bias=bool(need_b and bias is not None),
                                   chunk_bytes=ctx.chunk_bytes)
        return gh, gw, gb, None, None, None


def linear_token_stats_triton(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              bias: torch.Tensor | None = None, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                              num_splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused ``token_stats(hidden @ weight.T + bias, targets)`` -> ``(entropy [N], logp [N])``.

    ``hidden [N, D]`` and ``weight [V, D]`` share one dtype (float16/bfloat16/float32/float64; any
    strides), ``bias [V]`` any float dtype, may hold ``-inf`` (suppressed tokens).  Results are
    float32 (float64 for float64 inputs); differentiable w.r.t. hidden, weight and bias (each only
    computed when it requires grad).  ``chunk_bytes`` bounds the backward's ``[N, Vc]`` dlogits
    buffer; ``num_splits`` overrides the forward's vocabulary split count (tests).
    """
    _check(hidden, weight, targets, bias)
    return LinearTokenStatsFunction.apply(hidden, weight, bias, targets, int(chunk_bytes), num_splits)
