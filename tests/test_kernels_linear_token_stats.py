"""Fused linear_token_stats (logits never materialised) against a float64 reference.

Same conventions as test_kernels_token_stats: fresh random inputs every run with the seed in every
message, the Cut-Cross-Entropy tolerance rule, NaN-poisoned allocations on the Triton path.
"""
from __future__ import annotations

import pytest
import torch

import kernel_testing as kt  # sets TRITON_INTERPRET=1 on CPU before any kernel is built
from kernel_testing import seed  # noqa: F401  (the fixture)
from fastem import ops
from fastem.kernels import _triton_utils as tu
from fastem.kernels import linear_token_stats as lts
from fastem.kernels.linear_token_stats import (_lts_forward, linear_token_stats_reference,
                                               linear_token_stats_triton)
from fastem.kernels.token_stats import IGNORE_INDEX, token_stats_reference

pytestmark = kt.INTERPRETER_WARNINGS  # numpy warnings inside the interpreter

DEV = kt.DEVICE


def make_problem(N: int, D: int, V: int, gen, *, bias: bool = True, scale: float = 1.0):
    """float64 hidden [N, D], weight [V, D], bias [V] (with -inf entries) and targets (finite logits,
    some ignored)."""
    h = kt.randn(N, D, gen=gen) * scale
    w = kt.randn(V, D, gen=gen) / D ** 0.5 * 3
    b = None
    if bias:
        b = kt.randn(V, gen=gen)
        b[kt.rand(V, gen=gen) < 0.2] = float("-inf")
        b[0] = 0.0
    y = kt.randint(V, (N,), gen)
    if b is not None:
        y = torch.where(torch.isinf(b[y]), torch.zeros_like(y), y)
    y[:: 5] = IGNORE_INDEX
    return h, w, b, y


def run_fused(h, w, b, y, gh, gl, *, weight_grad=True, bias_grad=True, **kw):
    leaves = [h.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)]
    leaves.append(None if b is None else b.detach().requires_grad_(bias_grad))
    with kt.poison_empty():
        ent, logp = linear_token_stats_triton(leaves[0], leaves[1], y, leaves[2], **kw)
        grads = kt.grads_of((ent, logp), [t for t in leaves if t is not None and t.requires_grad],
                            (gh.to(ent.dtype), gl.to(ent.dtype)))
    return ent, logp, grads


def run_ref(h, w, b, y, gh, gl, *, weight_grad=True, bias_grad=True, store_like_triton=False):
    """The PyTorch reference's outputs and gradients.  ``store_like_triton``: the logits' gradient is
    rounded to the input dtype as the kernel's dlogits store rounds it (kt.round_like_triton: toward zero
    for bfloat16 in Triton's interpreter) instead of to nearest, so that the same-dtype reference
    carries the same rounding of dlogits as the kernel's buffer (otherwise a bfloat16 run in the
    interpreter fails now and then: truncation errs twice as much, and all one way)."""
    leaves = [h.detach().requires_grad_(), w.detach().requires_grad_(weight_grad)]
    leaves.append(None if b is None else b.detach().requires_grad_(bias_grad))
    if store_like_triton and h.dtype in (torch.float16, torch.bfloat16):
        z = torch.nn.functional.linear(leaves[0], leaves[1], leaves[2]).float()
        # a value of the input dtype passes the backward's cast to it unchanged
        z.register_hook(lambda g: kt.round_like_triton(g.double(), h.dtype).float())
        ent, logp = token_stats_reference(z, y)
    else:
        ent, logp = linear_token_stats_reference(leaves[0], leaves[1], y, leaves[2])
    grads = kt.grads_of((ent, logp), [t for t in leaves if t is not None and t.requires_grad],
                        (gh.to(ent.dtype), gl.to(ent.dtype)))
    return ent, logp, grads


def check_problem(h64, w64, b64, y, dtype, seed, gen, *, weight_grad=True, bias_grad=True, **kw):
    h, w = h64.to(dtype), w64.to(dtype)
    b = None if b64 is None else b64.to(dtype)
    N = h.shape[0]
    gh = kt.randn(N, gen=gen, dtype=torch.float32)
    gl = kt.randn(N, gen=gen, dtype=torch.float32)
    opts = dict(weight_grad=weight_grad, bias_grad=bias_grad)
    got = run_fused(h, w, b, y, gh, gl, **opts, **kw)
    ref64 = run_ref(h.double(), w.double(), None if b is None else b.double(), y, gh.double(), gl.double(), **opts)
    tag = f"{dtype} N={N} D={h.shape[1]} V={w.shape[0]} bias={b is not None} {kw}"
    if dtype == torch.float64:
        same = (None, None, [None] * len(ref64[2]))
        tol_out = tol_grad = dict(atol=1e-10, rtol=1e-10)
    else:
        same = run_ref(h, w, b, y, gh, gl, **opts, store_like_triton=True)
        # float32 tl.dot vs BLAS sum in another order, and each float32 logit is rounded at its own
        # magnitude: allow a few of those roundings on top of the reference's own error.
        z = h.double() @ w.double().t() + (0 if b is None else b.double())
        zmax = z[torch.isfinite(z)].abs().max().item()
        tol_out = dict(atol=1e-5 + 8 * 2.0 ** -24 * zmax, rtol=1e-5)
        tol_grad = dict(atol=1e-6, rtol=1e-6, mode="norm")
    kt.check_close(f"entropy {tag}", got[0], ref64[0], same[0], seed=seed, **tol_out)
    kt.check_close(f"logp {tag}", got[1], ref64[1], same[1], seed=seed, **tol_out)
    names = ["grad_hidden"] + (["grad_weight"] if weight_grad else []) + (
        ["grad_bias"] if b is not None and bias_grad else [])
    assert len(got[2]) == len(names)
    for name, g, r, s in zip(names, got[2], ref64[2], same[2]):
        assert g.dtype == dtype, f"{name} dtype {g.dtype} (seed={seed})"
        kt.check_close(f"{name} {tag}", g, r, s, seed=seed, **tol_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("N,D,V", [(37, 40, 123), (20, 24, 1000)])
def test_matches_float64_reference(N, D, V, dtype, seed):
    gen = kt.generator(seed)
    check_problem(*make_problem(N, D, V, gen), dtype, seed, gen)


@pytest.mark.parametrize("num_splits,chunk_bytes", [(1, 1 << 30), (3, 20 * 700 * 4), (1000, 1)])
def test_splits_and_chunks(num_splits, chunk_bytes, seed):
    """One split / several splits / one split per tile; one chunk / several chunks with a partial
    last one / one tile per chunk."""
    gen = kt.generator(seed)
    check_problem(*make_problem(20, 24, 1000, gen), torch.float32, seed, gen,
                  num_splits=num_splits, chunk_bytes=chunk_bytes)


def test_weight_or_bias_without_grad(seed):
    gen = kt.generator(seed)
    h, w, b, y = make_problem(21, 24, 300, gen)
    check_problem(h, w, b, y, torch.float32, seed, gen, weight_grad=False, bias_grad=False)
    x = h.float().requires_grad_()
    wt = w.float()                       # no grad
    ent, logp = linear_token_stats_triton(x, wt, y, b.float())
    (ent.sum() + logp.sum()).backward()
    assert wt.grad is None and x.grad is not None


def test_large_logits_and_neg_inf_bias(seed):
    """Logits of size ~1e3 (hidden scaled up) and many suppressed tokens."""
    gen = kt.generator(seed)
    h, w, b, y = make_problem(19, 32, 500, gen, scale=300.0)
    b[kt.rand(500, gen=gen) < 0.5] = float("-inf")
    b[0] = 0.0
    y = torch.where((y >= 0) & torch.isinf(b[y.clamp_min(0)]), torch.zeros_like(y), y)
    check_problem(h, w, b, y, torch.float32, seed, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_negative_logits(dtype, seed):
    """Every logit around -200 (a bias shift; exp underflows to 0 in float32): the running max must
    start at -inf, not 0."""
    gen = kt.generator(seed)
    h, w, b, y = make_problem(17, 24, 600, gen)
    check_problem(h, w, b - 200.0, y, dtype, seed, gen, num_splits=3)


def test_gradcheck_float64(seed):
    gen = kt.generator(seed)
    h = kt.randn(3, 5, gen=gen).requires_grad_()
    w = kt.randn(7, 5, gen=gen).requires_grad_()
    b = kt.randn(7, gen=gen)
    b[2] = float("-inf")
    b.requires_grad_()
    y = torch.tensor([1, IGNORE_INDEX, 6], device=DEV)
    assert torch.autograd.gradcheck(lambda h_, w_, b_: linear_token_stats_triton(h_, w_, y, b_, num_splits=1),
                                    (h, w, b), eps=1e-6, atol=1e-7, rtol=1e-5), f"seed={seed}"


def test_forward_outputs_fully_written(seed):
    gen = kt.generator(seed)
    h, w, b, y = make_problem(45, 20, 700, gen)
    outs = (torch.full((45,), float("nan"), device=DEV), torch.full((45,), float("nan"), device=DEV),
            torch.full((2, 45), float("nan"), device=DEV))
    res = _lts_forward(h.float(), w.float(), y, b.float(), num_splits=2, out=outs)
    for name, t in zip(("entropy", "logp", "lse"), res):
        assert not torch.isnan(t).any(), f"{name} not fully written (seed={seed})"


def test_strided_hidden_and_all_neg_inf_row(seed):
    gen = kt.generator(seed)
    h, w, b, y = make_problem(10, 24, 200, gen)
    hs = h.float().t().contiguous().t()           # column-major hidden: strides (1, N)
    a = linear_token_stats_triton(hs, w.float(), y, b.float())
    c = linear_token_stats_triton(h.float(), w.float(), y, b.float())
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6, msg=lambda m: f"{m} (seed={seed})")
    all_inf = torch.full((200,), float("-inf"), device=DEV)
    ent, logp = linear_token_stats_triton(h.float(), w.float(), y.clamp_min(0), all_inf)
    assert torch.isnan(ent).all() and torch.isnan(logp).all()   # invalid input: NaN, no crash


def test_empty_batch():
    h = torch.zeros(0, 8, device=DEV, requires_grad=True)
    w = torch.randn(30, 8, device=DEV, requires_grad=True)
    ent, logp = linear_token_stats_triton(h, w, torch.zeros(0, dtype=torch.long, device=DEV))
    assert ent.shape == logp.shape == (0,)
    (ent.sum() + logp.sum()).backward()
    assert h.grad.shape == (0, 8) and torch.equal(w.grad, torch.zeros_like(w))


def test_ops_dispatch_triton_matches_torch(seed):
    gen = kt.generator(seed)
    h, w, b, y = make_problem(16, 32, 400, gen)
    gh = kt.randn(16, gen=gen, dtype=torch.float32)
    gl = kt.randn(16, gen=gen, dtype=torch.float32)
    res = {}
    for backend in ("triton", "torch"):
        x, wt = h.float().requires_grad_(), w.float().requires_grad_()
        ent, logp = ops.linear_token_stats(x, wt, y, b.float(), backend=backend)
        torch.autograd.backward((ent, logp), (gh, gl))
        res[backend] = (ent.detach(), logp.detach(), x.grad, wt.grad)
    for name, a, c in zip(("entropy", "logp", "grad_hidden", "grad_weight"), res["triton"], res["torch"]):
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m} (seed={seed})")


def test_reference_chunking_is_exact(seed):
    gen = kt.generator(seed)
    h, w, b, y = make_problem(23, 8, 50, gen)
    a = linear_token_stats_reference(h, w, y, b)
    c = linear_token_stats_reference(h, w, y, b, chunk_size=5)
    torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the GPU path's tiles, interpreted
# The interpreter normally runs 32 x 128 x 32 tiles (its cost is per tile operation).  These tests run
# the tile sizes and the forward's split count that a compiled launch picks (``_config(dtype,
# interp=False)``, ``num_sms`` of an H100: 132); the interpreter ignores num_warps and num_stages.
H100_SMS = 132


@pytest.fixture
def gpu_tiles(monkeypatch):
    """The launchers pick the compiled path's configuration.  Returns ``(real _config, calls)``: the
    dtypes the launchers asked a configuration for and ``"sms"`` per split-count query."""
    real = lts._config
    calls = []

    def config(dtype, interp):
        calls.append(dtype)
        return real(dtype, False)

    def num_sms(device):
        calls.append("sms")
        return H100_SMS

    monkeypatch.setattr(lts, "_config", config)
    monkeypatch.setattr(tu, "num_sms", num_sms)
    return real, calls


@pytest.mark.parametrize("dtype,even_k", [
    (torch.bfloat16, False), (torch.float32, False),
    pytest.param(torch.float16, True, marks=pytest.mark.slow), pytest.param(torch.float64, False, marks=pytest.mark.slow)])
def test_gpu_tile_configuration(dtype, even_k, gpu_tiles, seed):
    """GPU tiles (half: 128 x 128 x 64, float32: 64 x 128 x 32, float64: 64 x 64 x 16) on a shape that
    spans GROUP_N + 1 = 9 row tiles (the dlogits grid's last group partial, the last tile partial), two K
    steps (masked unless ``even_k``), three vocabulary tiles (the last partial) in as many splits, and
    two backward chunks (the last partial)."""
    real, calls = gpu_tiles
    cfg = real(dtype, False)
    bn, bv, bk = cfg["BLOCK_N"], cfg["BLOCK_V"], cfg["BLOCK_K"]
    assert (bn, bv, bk) != tuple(real(dtype, True)[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K"))
    N, D, V = 8 * bn + 5, 2 * bk if even_k else bk + 8, 2 * bv + 37
    gen = kt.generator(seed)
    elem = torch.empty((), dtype=dtype).element_size()
    check_problem(*make_problem(N, D, V, gen), dtype, seed, gen, chunk_bytes=N * elem * 2 * bv)
    assert dtype in calls and "sms" in calls      # the launchers did use the GPU configuration


def test_gpu_split_count_no_bias_odd_vocab(gpu_tiles, seed):
    """At a few tokens the GPU forward splits the vocabulary in up to 128 parts (Whisper's 406 tiles:
    102 splits), so the combine kernel holds BLOCK_S = 128 partials per row; the interpreter's own
    split count (4 "SMs") never gets there.  65 vocabulary tiles (the last one a single column), one
    per split; no bias; D = 17 (one masked K step)."""
    real, calls = gpu_tiles
    V = 64 * real(torch.float32, False)["BLOCK_V"] + 1
    gen = kt.generator(seed)
    check_problem(*make_problem(5, 17, V, gen, bias=False), torch.float32, seed, gen)
    assert "sms" in calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float32, marks=pytest.mark.slow)])
def test_whisper_vocabulary(dtype, seed):
    """The real vocabulary (406 tiles of 128; ~15 s in the interpreter per dtype)."""
    gen = kt.generator(seed)
    check_problem(*make_problem(6, 32, 51_865, gen), dtype, seed, gen)


@pytest.mark.parametrize("V", [49_152, pytest.param(151_936, marks=pytest.mark.slow)])
def test_language_model_vocabularies(V, seed):
    """SmolLM2's vocabulary (49152) in the default run, Qwen2.5's (151936) with the slow checks."""
    gen = kt.generator(seed)
    check_problem(*make_problem(3, 32, V, gen), torch.bfloat16, seed, gen)


# ------------------------------------------------------------------ GPU only
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N,D", [(256, 384), (1000, 1280)])
def test_gpu_whisper_shapes(N, D, dtype, seed):
    gen = kt.generator(seed)
    check_problem(*make_problem(N, D, 51_865, gen), dtype, seed, gen, chunk_bytes=64 << 20)


def _peak_extra(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


@pytest.mark.gpu
@gpu
def test_gpu_peak_memory_target():
    """The target: forward + backward extra memory <= 1/10 of eager at N = 16384, D = 1280, V = 51865."""
    N, D, V = 16_384, 1280, 51_865
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, D, device="cuda", dtype=torch.bfloat16) * 0.03).requires_grad_()
    y = torch.randint(0, V, (N,), device="cuda")

    def run(f):
        def go():
            ent, logp = f(h, w, y)
            (ent.sum() + logp.sum()).backward()
            h.grad = w.grad = None
        return go

    fused = _peak_extra(run(linear_token_stats_triton))
    eager = _peak_extra(run(linear_token_stats_reference))
    assert fused * 10 <= eager, f"fused {fused / 2**20:.0f} MiB vs eager {eager / 2**20:.0f} MiB"
