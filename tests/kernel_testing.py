"""Helpers shared by the kernel tests.

* ``DEVICE``: CUDA when present, else CPU, where the kernels run in Triton's interpreter
  (``TRITON_INTERPRET=1``, set here as well as in conftest, before any kernel is first called).
* ``fresh_seed``: a new seed per test run (inputs are random every run); ``FASTEM_TEST_SEED``
  pins it to reproduce a failure, and every assertion message carries it.  The ``seed`` fixture
  returns one (test modules import it: ``from kernel_testing import seed``).
* ``INTERPRETER_WARNINGS``: the kernel test modules' ``pytestmark`` (numpy's RuntimeWarnings
  inside Triton's interpreter are expected).
* ``check_close``: the Cut-Cross-Entropy criterion.  A result computed from inputs of some dtype is
  compared with a float64 reference; it may deviate by as much as the same-dtype PyTorch
  reference deviates (elementwise), plus a small tolerance.  NaN anywhere fails.
* ``poison_empty``: a context manager making ``torch.empty``/``torch.empty_like`` return NaN-filled
  float tensors, so an output element a kernel forgot to write shows up as NaN.
* ``round_like_triton``: a float64 tensor converted to a kernel output dtype the way a kernel's
  ``.to(dtype)`` store converts float32 there (Triton's interpreter truncates float32 -> bfloat16, a
  compiled kernel rounds to nearest even; probed once, not assumed).
"""
from __future__ import annotations

import contextlib
import math
import os
import random

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Last-place size of each output dtype: a result rounded to it may sit one unit away from the
# reference's own rounding.
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def fresh_seed() -> int:
    pinned = os.environ.get("FASTEM_TEST_SEED")
    return int(pinned) if pinned else random.SystemRandom().randrange(2 ** 31)


INTERPRETER_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture
def seed() -> int:
    """A fresh (or ``FASTEM_TEST_SEED``-pinned) seed for the test."""
    return fresh_seed()


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen: torch.Generator, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def rand(*shape, gen: torch.Generator, dtype=torch.float64, device=DEVICE) -> torch.Tensor:
    return torch.rand(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def randint(high: int, shape, gen: torch.Generator, device=DEVICE) -> torch.Tensor:
    return torch.randint(0, high, tuple(shape), generator=gen).to(device)


def check_close(name: str, got: torch.Tensor, ref64: torch.Tensor, ref_same: torch.Tensor | None, *, seed: int,
                atol: float = 0.0, rtol: float = 0.0, mode: str = "elementwise") -> None:
    """Assert ``|got - ref64| <= |ref_same - ref64| + atol + rtol * |ref64|`` elementwise, and no NaN.

    Infinities must match exactly.  ``ref_same=None`` drops the first term (float64 results).

    ``mode="norm"`` is for results that sum many rounded terms (the matmul gradients of the fused
    linear op, computed from a half-precision dlogits buffer like eager's): their errors are random
    walks, independent between the kernel and the reference, so an element-by-element comparison
    is a coin toss.  There the error's RMS must not exceed the reference's RMS error, and its max
    not twice the reference's max error (each plus ``atol + rtol * max|ref64|``).  An RMS taken over n
    elements is itself an estimate (relative spread ~1/sqrt(2n)), so on small results (the gradient of
    a 6 x 32 hidden state: 192 elements) the RMS bound carries a factor 1 + 2/sqrt(n); on large ones
    it is 1.  Measured on 30 fresh seeds of the Whisper-vocabulary case (bfloat16), the kernel's RMS
    error was 0.16-0.81 of the reference's, so the factor keeps a rare tie from failing and nothing
    else: a wrong kernel errs by orders of magnitude more.
    """
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)} (seed={seed})"
    g = got.detach().double().cpu()
    r = ref64.detach().double().cpu()
    nan = torch.isnan(g)
    assert not nan.any(), (f"{name}: {int(nan.sum())} NaN of {g.numel()} (first at {nan.nonzero()[0].tolist()}) "
                           f"(seed={seed})")
    inf = torch.isinf(r) | torch.isinf(g)
    assert torch.equal(g[inf], r[inf]), f"{name}: infinities differ (seed={seed})"
    if mode == "norm":
        fin = ~inf
        err = (g - r)[fin].abs()
        ref_err = (ref_same.detach().double().cpu() - r)[fin].abs() if ref_same is not None else torch.zeros_like(err)
        slack = atol + rtol * (r[fin].abs().max().item() if fin.any() else 0.0)
        rms, ref_rms = err.pow(2).mean().sqrt().item(), ref_err.pow(2).mean().sqrt().item()
        mx, ref_mx = err.max().item(), ref_err.max().item()
        spread = 1.0 + 2.0 / math.sqrt(max(err.numel(), 1))
        assert rms <= spread * ref_rms + slack and mx <= 2 * ref_mx + slack, (
            f"{name}: error rms {rms:.3g} / max {mx:.3g} vs same-dtype reference rms {ref_rms:.3g} / max {ref_mx:.3g} "
            f"(slack {slack:.3g}) (seed={seed})")
        return
    bound = atol + rtol * r.abs()
    if ref_same is not None:
        bound = bound + (ref_same.detach().double().cpu() - r).abs()
    err = (g - r).abs()
    bad = (err > bound) & ~inf
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        excess = (err - bound)[~inf].max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {g.numel()} elements off; first at {list(idx)}: got {g[idx].item():.9g}, "
            f"float64 {r[idx].item():.9g}, allowed {bound[idx].item():.3g} (worst excess {excess:.3g}) (seed={seed})")


@contextlib.contextmanager
def poison_empty():
    """Within the block, uninitialised float tensors from torch.empty / empty_like are NaN."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*args, **kwargs):
        t = real_empty_like(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def grads_of(outputs, inputs, grad_outputs):
    """``torch.autograd.grad`` that returns None for inputs the outputs do not depend on."""
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)


def _bf16_probe_kernel(x_ptr, out_ptr):
    x = tl.load(x_ptr)  # noqa: F821  (tl is bound when the probe is built)
    tl.store(out_ptr, x.to(tl.bfloat16))  # noqa: F821


_BF16_ROUNDING: dict = {}


def triton_bf16_rounding(device: torch.device = DEVICE) -> str:
    """How a Triton kernel's float32 -> bfloat16 ``.to()`` rounds on ``device`` (in the interpreter on
    CPU): ``"rtne"`` (to nearest, as compiled kernels do) or ``"trunc"`` (toward zero, as Triton 3.x's
    interpreter does).  Probed with one value 3/4 of a bfloat16 step above 1."""
    key = (device.type, os.environ.get("TRITON_INTERPRET", ""))
    if key not in _BF16_ROUNDING:
        import triton
        import triton.language as tl  # noqa: F401  (the probe kernel's global)

        globals()["tl"] = tl
        kernel = triton.jit(_bf16_probe_kernel)
        x = torch.tensor([1.0 + 0.75 * 2.0 ** -7], dtype=torch.float32, device=device)
        out = torch.zeros(1, dtype=torch.bfloat16, device=device)
        kernel[(1,)](x, out)
        got = out.item()
        assert got in (1.0, 1.0 + 2.0 ** -7), f"bfloat16 probe gave {got!r}"
        _BF16_ROUNDING[key] = "trunc" if got == 1.0 else "rtne"
    return _BF16_ROUNDING[key]


def round_like_triton(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` (float64) as a kernel would store it in ``dtype``, back in float64 (see the module docstring).
    Goes through float32 first, as the kernels compute in float32 (float64 stays float64)."""
    if dtype == torch.float64:
        return x.double()
    f32 = x.float()
    if dtype == torch.bfloat16 and triton_bf16_rounding(x.device) == "trunc":
        bits = f32.view(torch.int32) & ~0xFFFF
        return bits.view(torch.float32).double()
    return f32.to(dtype).double()
