"""Fused token_stats kernel against a float64 reference (Triton's interpreter on CPU, compiled on CUDA).

Inputs are fresh random numbers every run; each assertion message carries the seed
(``FASTEM_TEST_SEED=<seed>`` reproduces a run).  Outputs and gradients are checked the
Cut-Cross-Entropy way: ``|kernel - float64| <= |same-dtype torch - float64| + small tol``.  Every
public-path call runs under ``poison_empty`` (fresh outputs start as NaN), so an element the
kernel did not write fails the no-NaN check.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import kernel_testing as kt  # sets TRITON_INTERPRET=1 on CPU before any kernel is built
from kernel_testing import seed  # noqa: F401  (the fixture)
from fastem import ops
from fastem.kernels.token_stats import (IGNORE_INDEX, _token_stats_bwd, _token_stats_fwd, token_stats_reference,
                                        token_stats_triton)

pytestmark = kt.INTERPRETER_WARNINGS  # numpy warnings inside the interpreter

DEV = kt.DEVICE


def special_rows(V: int, gen: torch.Generator):
    """float64 logits ``[R, V]`` with the hard cases as rows, and targets (finite entries, one ignored)."""
    rows = []
    rows.append(kt.randn(V, gen=gen) * 3)                                        # ordinary
    r = kt.randn(V, gen=gen) * 3
    r[kt.rand(V, gen=gen) < 0.3] = float("-inf")                                 # suppressed tokens
    r[0] = 0.5                                                                   # at least one finite
    rows.append(r)
    r = torch.zeros(V, dtype=torch.float64, device=DEV)
    r[int(kt.randint(V, (1,), gen)[0])] = 40.0                                   # one-hot-like: H ~ 0
    rows.append(r)
    rows.append((kt.randn(V, gen=gen) * 1e4).clamp(-6e4, 6e4))                   # huge magnitude
    rows.append(-1000.0 - 5 * kt.rand(V, gen=gen))                               # all negative
    rows.append(torch.linspace(-6, 6, V, dtype=torch.float64, device=DEV)
                + 0.1 * kt.randn(V, gen=gen))                                    # max grows every block
    r = kt.randn(V, gen=gen)
    r[-1] = 25.0                                                                 # max in the last (partial) block
    rows.append(r)
    r = (kt.randn(V, gen=gen) * 1e4).clamp(-6e4, 6e4)
    r[kt.rand(V, gen=gen) < 0.5] = float("-inf")                                 # huge and suppressed
    r[0] = 1.0
    rows.append(r)
    rows.append(kt.randn(V, gen=gen))                                            # ignored target
    z = torch.stack(rows)
    targets = []
    for i in range(z.shape[0]):
        finite = torch.isfinite(z[i]).nonzero().squeeze(1)
        pick = finite[int(kt.randint(finite.numel(), (1,), gen)[0])]
        targets.append(int(pick))
    targets[2] = int(z[2].argmax())   # one-hot row: the likely token
    targets[-1] = IGNORE_INDEX
    return z, torch.tensor(targets, device=DEV)


def run_both(logits_in: torch.Tensor, targets: torch.Tensor, gh: torch.Tensor, gl: torch.Tensor, **kw):
    """(entropy, logp, grad) of the Triton path under poisoned allocations (input strides kept)."""
    x = logits_in.detach().requires_grad_()
    with kt.poison_empty():
        ent, logp = token_stats_triton(x, targets, **kw)
        (grad,) = torch.autograd.grad((ent, logp), (x,), (gh.to(ent.dtype), gl.to(ent.dtype)))
    return ent, logp, grad


def run_reference(logits_in: torch.Tensor, targets: torch.Tensor, gh: torch.Tensor, gl: torch.Tensor):
    x = logits_in.detach().clone().requires_grad_()
    ent, logp = token_stats_reference(x, targets)
    (grad,) = torch.autograd.grad((ent, logp), (x,), (gh.to(ent.dtype), gl.to(ent.dtype)))
    return ent, logp, grad


# Error allowed in dlogits before the store's rounding, as a multiple of the element's scale (see
# dlogits_scale): a float32 evaluation of p (gL + gH (log p + H)) errs by a few float32 epsilons of the
# terms it is built from.  Measured in the interpreter: at most 2e-6 (float32, V up to 131072, all the
# special rows), 7e-13 (float64).  Compiled kernels evaluate exp(x) as ex2.approx(x * log2 e), which adds
# up to |x| * 6e-8 relative to p (5e-6 at p = 1e-36), hence 3e-5; a 0.2% error is still 70 times that.
DLOGITS_TAU = {torch.float64: 1e-11}
DLOGITS_TAU_ACC32 = 3e-5


def dlogits_scale(z64: torch.Tensor, targets: torch.Tensor, gh: torch.Tensor, gl: torch.Tensor) -> torch.Tensor:
    """Per element of dlogits, the size of the terms it is computed from (float64, ``z64``'s shape):
    ``p_v (|gL| + |gH| (1 + |log p_v + H|))``, plus ``|gL|`` at the target.  It bounds the exact value,
    which can be far smaller (it crosses zero where gL + gH (log p_v + H) does); rounding errors of
    computing it scale with it."""
    z64, gh, gl = z64.double(), gh.double(), gl.double()
    valid = targets != IGNORE_INDEX
    gl = torch.where(valid, gl, torch.zeros_like(gl))
    logp = z64 - torch.logsumexp(z64, -1, keepdim=True)
    p = logp.exp()
    zero = torch.zeros((), dtype=torch.float64, device=z64.device)
    entropy = -torch.where(p > 0, p * logp, zero).sum(-1, keepdim=True)
    t = torch.where(p > 0, logp + entropy, zero)
    scale = p * (gl.abs()[:, None] + gh.abs()[:, None] * (1 + t.abs()))
    rows = valid.nonzero().squeeze(1)
    scale[rows, targets[rows]] += gl.abs()[rows]
    return scale


def check_dlogits(name: str, got: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, gh: torch.Tensor,
                  gl: torch.Tensor, *, seed: int, chunk_rows: int | None = None) -> None:
    """Every element of the kernel's ``dlogits`` against a float64 reference ``ref64`` (autograd through
    ``token_stats_reference`` on the kernel's own input ``logits``, upcast), in row chunks on the
    tensors' device.  Each element must be what storing *some* value within ``tau * scale`` of
    ``ref64`` in the output dtype gives:

        round(ref64 - tau * scale) <= got <= round(ref64 + tau * scale)

    ``scale`` is :func:`dlogits_scale`, ``tau`` 3e-5 (float32 accumulation) or 1e-11 (float64), and
    ``round`` the kernel's own conversion (:func:`kernel_testing.round_like_triton`).  Relative per
    element, so an element of 5e-6 (V = 131072) is held to its own size; in half precision, a 0.2%
    error before the store moves a good share of the elements to a neighbour outside their interval
    (test_checker_catches_wrong_results)."""
    assert got.shape == logits.shape and got.dtype == logits.dtype, f"{name}: {got.shape} {got.dtype} (seed={seed})"
    dtype = logits.dtype
    tau = DLOGITS_TAU.get(dtype, DLOGITS_TAU_ACC32)
    tiny = 1e-300 if dtype == torch.float64 else 1e-36      # float32 denormals (p < 1e-38)
    N = logits.shape[0]
    chunk_rows = chunk_rows or max(1, N)
    for r0 in range(0, N, chunk_rows):
        r1 = min(N, r0 + chunk_rows)
        z64 = logits[r0:r1].double()
        y = targets[r0:r1]
        ref64 = run_reference(z64, y, gh[r0:r1].double(), gl[r0:r1].double())[2]
        band = tau * dlogits_scale(z64, y, gh[r0:r1], gl[r0:r1]) + tiny
        lo, hi = kt.round_like_triton(ref64 - band, dtype), kt.round_like_triton(ref64 + band, dtype)
        g = got[r0:r1].double()
        bad = ~((lo <= g) & (g <= hi))                          # NaN fails too
        if bad.any():
            i, j = bad.nonzero()[0].tolist()
            worst = ((g - ref64).abs() / band).nan_to_num(float("inf")).max().item()
            raise AssertionError(
                f"{name}: {int(bad.sum())} of {bad.numel()} elements off in rows {r0}..{r1 - 1}; first at "
                f"[{r0 + i}, {j}]: got {g[i, j].item():.9g}, float64 {ref64[i, j].item():.9g}, allowed "
                f"[{lo[i, j].item():.9g}, {hi[i, j].item():.9g}] (worst |error| / (tau * scale) {worst:.3g}) "
                f"(seed={seed})")


def check_against_float64(z64: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, seed: int, gen,
                          **kw) -> None:
    x = z64.to(dtype)                      # the kernel's input
    N = x.shape[0]
    gh = kt.randn(N, gen=gen, dtype=torch.float32)
    gl = kt.randn(N, gen=gen, dtype=torch.float32)
    ent, logp, grad = run_both(x, targets, gh, gl, **kw)
    r64 = run_reference(x.double(), targets, gh.double(), gl.double())
    if dtype == torch.float64:
        same = (None, None, None)
        tols = [dict(atol=1e-10, rtol=1e-12)] * 2
    else:
        same = run_reference(x, targets, gh, gl)
        tols = [dict(atol=2e-6, rtol=2e-6), dict(atol=2e-6, rtol=2e-6)]
    assert ent.dtype == logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    tag = f"{dtype} N={N} V={x.shape[1]} {kw}"
    kt.check_close(f"entropy {tag}", ent, r64[0], same[0], seed=seed, **tols[0])
    kt.check_close(f"logp {tag}", logp, r64[1], same[1], seed=seed, **tols[1])
    check_dlogits(f"dlogits {tag}", grad, x, targets, gh, gl, seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("V", [123, 1000, 4097])
def test_matches_float64_reference(V, dtype, seed):
    gen = kt.generator(seed)
    z, y = special_rows(V, gen)
    check_against_float64(z, y, dtype, seed, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_blocks_exercise_online_rescaling(dtype, seed):
    """Many blocks per row: the running max is rescaled often (ramp rows), last block partial."""
    gen = kt.generator(seed)
    z, y = special_rows(1000, gen)
    check_against_float64(z, y, dtype, seed, gen, block_v=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("V", [51_865, 49_152, 131_072, 151_936])
def test_large_vocabularies(V, dtype, seed):
    """Whisper's vocabulary, SmolLM2's (49152), a 131072 one and Qwen2.5's (151936) (typical dlogits element
    ~5e-6, each held to its own size)."""
    gen = kt.generator(seed)
    z, y = special_rows(V, gen)
    # ordinary, -inf, huge, ramp, ignored (the interpreter's time is per row: three rows above 100k)
    keep = [0, 1, 3, 5, 8] if V < 100_000 else [0, 1, 3]
    check_against_float64(z[keep], y[keep], dtype, seed, gen)


def test_gradcheck_float64(seed):
    gen = kt.generator(seed)
    z = kt.randn(4, 9, gen=gen)
    z[1, ::2] = float("-inf")
    y = torch.tensor([3, 1, 0, IGNORE_INDEX], device=DEV)

    def f(x):
        return token_stats_triton(x, y)

    x = z.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-7, rtol=1e-5), f"seed={seed}"


def test_each_output_written_when_called_directly(seed):
    """Preallocated NaN outputs: every element of the forward outputs and of dlogits is written."""
    gen = kt.generator(seed)
    z, y = special_rows(300, gen)
    x = z.float()
    outs = (torch.full((x.shape[0],), float("nan"), device=DEV), torch.full((x.shape[0],), float("nan"), device=DEV),
            torch.full((2, x.shape[0]), float("nan"), device=DEV))
    ent, logp, lse = _token_stats_fwd(x, y, out=outs, block_v=128)
    assert all(o is p for o, p in zip(outs, (ent, logp, lse)))
    for name, t in (("entropy", ent), ("logp", logp), ("lse", lse)):
        assert not torch.isnan(t).any(), f"{name} not fully written (seed={seed})"
    dz = torch.full_like(x, float("nan"))
    _token_stats_bwd(x, y, lse, ent, torch.ones_like(ent), torch.ones_like(ent), out=dz, block_v=128)
    assert not torch.isnan(dz).any(), f"dlogits not fully written (seed={seed})"


def test_inplace_backward(seed):
    gen = kt.generator(seed)
    z, y = special_rows(700, gen)
    gh = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    gl = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    base = z.to(torch.bfloat16).requires_grad_()
    x = base * 1.0                       # a non-leaf buffer nothing else needs
    ptr = x.data_ptr()
    ent, logp = token_stats_triton(x, y, inplace_backward=True)
    torch.autograd.backward((ent, logp), (gh, gl))
    _, _, expected = run_both(z.to(torch.bfloat16), y, gh, gl)
    assert torch.equal(base.grad, expected), f"in-place gradient differs (seed={seed})"
    assert torch.equal(x.detach(), expected), "the logits buffer should now hold the gradient"
    assert x.data_ptr() == ptr

    leaf = z.float().requires_grad_()
    with pytest.raises(ValueError, match="leaf"):
        token_stats_triton(leaf, y, inplace_backward=True)


def test_inplace_backward_guards_other_readers():
    """Another node that saved the same logits fails loudly after the in-place backward."""
    base = torch.randn(3, 50, device=DEV, requires_grad=True)
    x = base * 1.0
    y = torch.tensor([1, 2, 3], device=DEV)
    other = (x * x).sum()      # saves x; created first, so its backward runs after token_stats'
    ent, logp = token_stats_triton(x, y, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (ent.sum() + logp.sum() + other).backward()


def test_strided_inputs(seed):
    gen = kt.generator(seed)
    z, y = special_rows(257, gen)
    wide = torch.full((z.shape[0], 400), 7.0, dtype=torch.float32, device=DEV)
    wide[:, 50:307] = z.float()
    rows_view = wide[:, 50:307]                            # row stride 400, unit column stride
    cols_view = z.float().t().contiguous().t()             # column stride != 1
    gh = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    gl = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    expected = run_both(z.float(), y, gh, gl)
    for view in (rows_view, cols_view):
        got = run_both(view, y, gh, gl)
        # equal up to summation order (the lanes' partition of a row follows its 16-byte alignment)
        for name, a, b in zip(("entropy", "logp", "dlogits"), got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()),
                                       msg=lambda m: f"strided {name}: {m} (seed={seed})")


def test_all_neg_inf_row_gives_nan_without_crash():
    z = torch.randn(3, 200, device=DEV)
    z[1] = float("-inf")
    y = torch.tensor([5, 7, IGNORE_INDEX], device=DEV)
    x = z.clone().requires_grad_()
    ent, logp = token_stats_triton(x, y)
    assert torch.isnan(ent[1]) and torch.isnan(logp[1])
    ref_e, ref_l = token_stats_reference(z, y)
    assert torch.isnan(ref_e[1]) and torch.isnan(ref_l[1])      # same convention as the reference
    assert torch.isfinite(ent[[0, 2]]).all() and torch.isfinite(logp[[0, 2]]).all()
    (ent.nan_to_num().sum() + logp.nan_to_num().sum()).backward()
    assert torch.isfinite(x.grad[[0, 2]]).all()


def test_target_on_suppressed_token():
    z = torch.randn(2, 300, device=DEV, dtype=torch.float64)
    z[:, 10] = float("-inf")
    y = torch.tensor([10, 11], device=DEV)
    x = z.clone().requires_grad_()
    ent, logp = token_stats_triton(x, y)
    assert torch.isneginf(logp[0]) and torch.isfinite(logp[1])
    gl = torch.tensor([0.7, 0.3], dtype=torch.float64, device=DEV)
    (grad,) = torch.autograd.grad(logp, x, gl)
    xr = z.clone().requires_grad_()
    (ref,) = torch.autograd.grad(token_stats_reference(xr, y)[1], xr, gl)
    assert torch.allclose(grad, ref, rtol=1e-12, atol=1e-12)
    assert grad[0, 10] == 0.7


def test_out_of_range_target_is_nan_not_a_crash():
    z = torch.randn(2, 100, device=DEV)
    ent, logp = token_stats_triton(z, torch.tensor([100, 3], device=DEV))
    assert torch.isnan(logp[0]) and torch.isfinite(logp[1]) and torch.isfinite(ent).all()


def test_empty_batch_and_int32_targets():
    ent, logp = token_stats_triton(torch.zeros(0, 10, device=DEV), torch.zeros(0, dtype=torch.long, device=DEV))
    assert ent.shape == logp.shape == (0,)
    z = torch.randn(4, 77, device=DEV)
    y = torch.tensor([1, 2, IGNORE_INDEX, 76], device=DEV)
    a = token_stats_triton(z, y.int())
    b = token_stats_triton(z, y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("inplace", [False, True])
def test_ops_dispatch_triton_matches_torch(inplace, seed):
    """The path the adaptation loop takes: fastem.ops.token_stats with both backends."""
    gen = kt.generator(seed)
    z = kt.randn(6, 500, gen=gen) * 3
    z[1, ::3] = float("-inf")
    y = kt.randint(500, (6,), gen)
    y[1] = 1
    y[4] = IGNORE_INDEX
    gh = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    gl = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    res = {}
    for backend in ("triton", "torch"):
        leaf = z.float().requires_grad_()
        x = leaf * 1.0
        kw = {"inplace_backward": inplace} if backend == "triton" else {}
        ent, logp = ops.token_stats(x, y, backend=backend, **kw)
        torch.autograd.backward((ent, logp), (gh, gl))
        res[backend] = (ent.detach(), logp.detach(), leaf.grad)
    for name, a, b in zip(("entropy", "logp", "grad"), res["triton"], res["torch"]):
        scale = b.abs().max().item() if name == "grad" else 1.0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0), msg=lambda m: f"{name}: {m} (seed={seed})")


def test_checker_catches_wrong_results(seed):
    """The comparison itself can fail: a perturbed or unwritten result is caught."""
    gen = kt.generator(seed)
    z, y = special_rows(300, gen)
    gh = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    gl = kt.randn(z.shape[0], gen=gen, dtype=torch.float32)
    ent, logp, grad = run_both(z.float(), y, gh, gl)
    r64 = run_reference(z.float().double(), y, gh.double(), gl.double())
    same = run_reference(z.float(), y, gh, gl)
    kt.check_close("entropy", ent, r64[0], same[0], seed=seed, atol=2e-6, rtol=2e-6)
    bad = ent.clone()
    bad[0] += 1e-3
    with pytest.raises(AssertionError, match="seed="):
        kt.check_close("entropy", bad, r64[0], same[0], seed=seed, atol=2e-6, rtol=2e-6)
    x = z.float()
    check_dlogits("dlogits", grad, x, y, gh, gl, seed=seed)
    bad = grad.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(AssertionError, match="seed="):
        check_dlogits("dlogits", bad, x, y, gh, gl, seed=seed)
    bad = grad.clone()
    bad[0] *= 1.002   # 0.2% off on one (ordinary) row of 300 elements
    with pytest.raises(AssertionError, match="rows 0..8; first at \\[0, "):
        check_dlogits("dlogits", bad, x, y, gh, gl, seed=seed)
    # bfloat16: a kernel evaluating in float32 and storing bfloat16 (as the kernel does) passes, and the
    # same with a 0.2% error before the store fails (the error is below one bfloat16 step of ~0.4-0.8%).
    xb = z.to(torch.bfloat16)
    _, _, g32 = run_both(xb.float(), y, gh, gl)               # the same logits, float32 dlogits
    as_bf16 = lambda t: kt.round_like_triton(t.double(), torch.bfloat16).to(torch.bfloat16)  # noqa: E731
    check_dlogits("dlogits bf16", as_bf16(g32), xb, y, gh, gl, seed=seed)
    bad = g32.clone()
    bad[0] *= 1.002
    with pytest.raises(AssertionError, match="rows 0..8; first at \\[0, "):
        check_dlogits("dlogits bf16", as_bf16(bad), xb, y, gh, gl, seed=seed)


# ------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_large_batch(dtype, seed):
    gen = kt.generator(seed)
    N, V = 2048, 51_865
    z = kt.randn(N, V, gen=gen, dtype=torch.float32) * 4
    z[::7, ::5] = float("-inf")
    y = kt.randint(V, (N,), gen)
    y = torch.where(torch.isinf(z.gather(1, y[:, None]).squeeze(1)), (y + 1) % V, y)
    y[::11] = IGNORE_INDEX
    check_against_float64(z.double(), y, dtype, seed, gen)


def check_all_rows(N: int, V: int, seed: int, *, chunk_rows: int, dtype=torch.bfloat16) -> None:
    """Random ``[N, V]`` logits made on the device: every row of entropy and logp and every element of
    dlogits against float64, the references built ``chunk_rows`` rows at a time (for shapes whose
    float64 copy would not fit at once)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    try:
        z = torch.randn(N, V, device=DEV, dtype=dtype, generator=gen)
        y = torch.randint(0, V, (N,), device=DEV, generator=gen)
        gh = torch.randn(N, device=DEV, generator=gen)
        gl = torch.randn(N, device=DEV, generator=gen)
        x = z.requires_grad_()
        ent, logp = token_stats_triton(x, y)
        (g,) = torch.autograd.grad((ent, logp), x, (gh, gl))
    except torch.OutOfMemoryError:
        pytest.skip("not enough GPU memory")
    x = x.detach()
    r64 = [torch.empty(N, dtype=torch.float64, device=DEV) for _ in range(2)]
    same = [torch.empty(N, dtype=ent.dtype, device=DEV) for _ in range(2)]
    for r0 in range(0, N, chunk_rows):
        rows = slice(r0, r0 + chunk_rows)
        for out, res in ((r64, token_stats_reference(x[rows].double(), y[rows])),
                         (same, token_stats_reference(x[rows], y[rows]))):
            out[0][rows], out[1][rows] = res
    tag = f"{dtype} N={N} V={V}"
    kt.check_close(f"entropy {tag}", ent, r64[0], same[0], seed=seed, atol=2e-6, rtol=2e-6)
    kt.check_close(f"logp {tag}", logp, r64[1], same[1], seed=seed, atol=2e-6, rtol=2e-6)
    check_dlogits(f"dlogits {tag}", g, x, y, gh, gl, seed=seed, chunk_rows=chunk_rows)


def test_all_rows_in_chunks(seed):
    """The chunked all-rows check of test_gpu_int64_offsets, on a small shape (last chunk partial)."""
    check_all_rows(7, 1000, seed, chunk_rows=3)


@pytest.mark.gpu
@gpu
def test_gpu_int64_offsets(seed):
    """row * stride beyond 2**31 elements: N = 16384 + 16 rows of V = 131072 bf16 logits (4.3 GB; rows
    16384.. start past 2**31), every row of the outputs and every element of dlogits against float64."""
    check_all_rows(16_384 + 16, 131_072, seed, chunk_rows=256)


@pytest.mark.gpu
@gpu
def test_gpu_float64_gradcheck():
    z = torch.randn(3, 37, device="cuda", dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, IGNORE_INDEX, 36], device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.autograd.gradcheck(lambda x: token_stats_triton(x, y), (z,), eps=1e-6, atol=1e-7, rtol=1e-5)
