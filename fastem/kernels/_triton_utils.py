"""Small helpers shared by the Triton kernel modules.

Kernels are written as plain module-level functions and handed to :func:`jit` on first use, not
decorated at import time.  Two reasons:

* importing :mod:`fastem` never imports Triton (the PyTorch references work without it);
* Triton decides at *decoration* time whether a kernel runs compiled or in its interpreter
  (``TRITON_INTERPRET=1``).  Decorating lazily means the variable only has to be set before the
  first kernel *call*, not before the first ``import fastem``.

Device helpers (functions a kernel calls, inlined by Triton) are module-level functions marked with
:func:`device`.  :func:`jit` builds, per module and interpreter mode, one namespace: a copy of the
module's globals with ``triton``, ``tl`` and every marked helper replaced by its ``triton.jit``
build of that mode, and re-binds the kernel and the helpers to it.  A kernel body just calls the
helper by its module-level name; the module itself is left as it is (plain functions), so the
compiled and the interpreted builds never see each other's helpers.
"""
from __future__ import annotations

import functools
import os
import types

import torch

__all__ = ["import_triton", "interpreting", "device", "jit", "acc_dtype", "stats_outputs", "num_sms", "next_power_of_2",
           "check_tensors", "dot_precision"]


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


_DEVICE_MARK = "__fastem_triton_device__"
_JIT_CACHE: dict = {}
_NAMESPACES: dict = {}


def device(fn):
    """Mark a module-level function as a Triton device helper: within kernels built by :func:`jit`
    from the same module, its name refers to its ``triton.jit`` build (of the same mode).  Returns
    ``fn`` itself, so importing the module still needs no Triton."""
    setattr(fn, _DEVICE_MARK, True)
    return fn


def _rebind(fn, namespace: dict):
    """``fn`` with ``namespace`` as its globals (same code, so same source, file and lines)."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__module__, new.__qualname__, new.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    return new


def _namespace(module_globals: dict, interp: bool) -> dict:
    """The globals the kernels of one module run with, in one mode (see the module docstring)."""
    key = (module_globals["__name__"], interp)
    namespace = _NAMESPACES.get(key)
    if namespace is None:
        triton, tl = import_triton()
        namespace = dict(module_globals)
        namespace.setdefault("triton", triton)
        namespace.setdefault("tl", tl)
        for name, value in module_globals.items():
            if isinstance(value, types.FunctionType) and getattr(value, _DEVICE_MARK, False):
                namespace[name] = triton.jit(_rebind(value, namespace))
        _NAMESPACES[key] = namespace
    return namespace


def jit(module_globals: dict, fn, **jit_kwargs):
    """``triton.jit(fn)``, built on first use and cached per (function, interpreter mode).

    ``fn`` runs with the module's namespace of that mode (:func:`_namespace`): its body can use
    ``tl`` like a decorated kernel would, and call the module's :func:`device` helpers.
    """
    interp = interpreting()
    key = (fn.__module__, fn.__qualname__, interp)
    kernel = _JIT_CACHE.get(key)
    if kernel is None:
        triton, _ = import_triton()
        kernel = triton.jit(_rebind(fn, _namespace(module_globals, interp)), **jit_kwargs)
        _JIT_CACHE[key] = kernel
    return kernel


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation (and statistics) dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_outputs(N: int, acc: torch.dtype, device: torch.device, out: tuple | None = None) -> tuple:
    """The forward launchers' outputs ``(entropy [N], logp [N], lse2 [2, N])`` of dtype ``acc``, or
    ``out`` (tests pass them preallocated)."""
    if out is None:
        out = (torch.empty(N, dtype=acc, device=device), torch.empty(N, dtype=acc, device=device),
               torch.empty(2, N, dtype=acc, device=device))
    return out


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
