"""Small helpers shared by the Triton kernel modules.

Kernels are written as plain module-level functions and handed to :func:`jit` on first use, not
decorated at import time.  Two reasons:

* importing :mod:`fastem` never imports Triton (the PyTorch references work without it);
* Triton decides at *decoration* time whether a kernel runs compiled or in its interpreter
  (``TRITON_INTERPRET=1``).  Decorating lazily means the variable only has to be set before the
  first kernel *call*, not before the first ``import fastem``.
"""
from __future__ import annotations

import functools
import os

import torch

__all__ = ["import_triton", "interpreting", "jit", "num_sms", "next_power_of_2", "check_tensors", "dot_precision"]


def import_triton():
    """``(triton, triton.language)``, or a clear ``RuntimeError`` when Triton is not installed."""
    try:
        import triton
        import triton.language as tl
    except Exception as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the Triton kernels need the triton package (pip install triton)") from exc
    return triton, tl


def interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except Exception:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


_JIT_CACHE: dict = {}


def jit(module_globals: dict, fn, **jit_kwargs):
    """``triton.jit(fn)``, built on first use and cached per (function, interpreter mode).

    ``triton`` and ``triton.language as tl`` are injected into ``module_globals`` (the kernel's
    ``__globals__``) so that the kernel body can use ``tl`` like a decorated kernel would.
    """
    interp = interpreting()
    key = (fn.__module__, fn.__qualname__, interp)
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        triton, tl = import_triton()
        module_globals.setdefault("triton", triton)
        module_globals.setdefault("tl", tl)
        kernel = triton.jit(fn, **jit_kwargs)
        _JIT_CACHE[key] = kernel
    return kernel


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 4 elsewhere, e.g. in the interpreter)."""
    if device.type == "cuda":
        return _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_tensors(*tensors: torch.Tensor) -> None:
    """Raise a clear error where the kernels cannot run: CPU tensors outside the interpreter."""
    first = tensors[0]
    for t in tensors:
        if t.device != first.device:
            raise ValueError(f"all tensors must be on one device, got {first.device} and {t.device}")
    if first.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "the Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before the first kernel call "
            "(Triton's interpreter, for tests) or use backend='torch'")


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``.

    float32: ``"tf32"`` where ``torch.backends.cuda.matmul.allow_tf32`` allows it (as a torch matmul
    would), else ``"tf32x3"``: three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), float32
    accuracy at several times the speed of an FMA (``"ieee"``) dot.  float64: exact.  Half types
    ignore it."""
    if dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "tf32x3"
    if dtype == torch.float64:
        return "ieee"
    return "tf32"
