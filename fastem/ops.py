"""Public ops with backend dispatch: the PyTorch reference or the fused Triton kernels.

``backend``:
  * ``"torch"``  the pure-PyTorch reference (any device).
  * ``"triton"`` the fused Triton kernels (CUDA; on CPU only under ``TRITON_INTERPRET=1``).
  * ``"auto"``   Triton on CUDA tensors when Triton is importable, else the reference.
"""
from __future__ import annotations

import torch

from .kernels.token_stats import IGNORE_INDEX, token_stats_reference

__all__ = ["IGNORE_INDEX", "token_stats", "linear_token_stats", "resolve_backend"]

_BACKENDS = ("auto", "torch", "triton")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
    return backend


def token_stats(logits: torch.Tensor, targets: torch.Tensor, *, backend: str = "torch",
                inplace_backward: bool = False):
    """Per-row entropy of ``softmax(logits)`` and log-prob of ``targets``.

    ``logits [N, V]`` (any float dtype, computed in float32 or better), ``targets [N]`` int64
    with ``-100`` = ignore (logp 0).  Returns ``(entropy [N], logp [N])``, float32 (float64 for
    float64 input), differentiable w.r.t. ``logits``.

    ``inplace_backward`` (Triton only; ignored by the reference): the backward writes the logits'
    gradient over the logits buffer instead of allocating one.  Only for logits nothing else reads
    afterwards (see :func:`fastem.kernels.token_stats.token_stats_triton`).
    """
    if resolve_backend(backend, logits) == "triton":
        from .kernels.token_stats import token_stats_triton

        return token_stats_triton(logits, targets, inplace_backward=inplace_backward)
    return token_stats_reference(logits, targets)


def linear_token_stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias=None, *,
                       backend: str = "torch"):
    """``token_stats(hidden @ weight.T + bias, targets)`` without materialising the logits (Triton)."""
    if resolve_backend(backend, hidden) == "triton":
        from .kernels.linear_token_stats import linear_token_stats_triton

        return linear_token_stats_triton(hidden, weight, targets, bias)
    from .kernels.linear_token_stats import linear_token_stats_reference

    return linear_token_stats_reference(hidden, weight, targets, bias)
