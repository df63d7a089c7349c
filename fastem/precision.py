"""The precision of the adaptation steps (``AdaptConfig.step_precision``).

The encoder layers that adapt (their forward with grad, and so their backward) may run under
``torch.autocast`` in bfloat16: on 30 s of input they are most of a step's arithmetic.  Everything else
stays in the model's own dtype: the cross-attention keys/values projected from their output, sampling,
the teacher-forced scoring (in bfloat16 too it made the adaptation weaker on DEV, RESULTS.md "The steps in
bfloat16"), the loss, the optimizer, the adapted parameters, every transcript and every guard's score.
The output projection and the token statistics also turn autocast off themselves (:func:`full_precision`),
so they stay float32 under a caller's own autocast.  ``"auto"`` uses bfloat16 where the hardware computes it
natively and the model is float32.  A language model has no encoder: the setting changes nothing there.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["STEP_PRECISIONS", "full_precision", "native_bfloat16", "step_autocast", "step_dtype"]

STEP_PRECISIONS = ("model", "bfloat16", "auto")
_NATIVE_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CPU with AVX512-BF16 or AMX, or a
    CUDA device with bfloat16 support."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & _NATIVE_CPU_FLAGS)
    return False


def step_dtype(setting: str, model) -> torch.dtype | None:
    """The dtype the steps' autocast uses for ``model`` (None: none, the model's own dtype)."""
    if setting not in STEP_PRECISIONS:
        raise ValueError(f"step_precision must be one of {STEP_PRECISIONS}, got {setting!r}")
    if setting == "model":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    param = next(model.parameters())
    return torch.bfloat16 if param.dtype == torch.float32 and native_bfloat16(param.device) else None


def step_autocast(setting: str, model):
    """The context the adapted encoder layers run in during the steps."""
    dtype = step_dtype(setting, model)
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def full_precision(tensor: torch.Tensor):
    """Autocast off on ``tensor``'s device: the output projection and the token statistics stay float32 under
    any autocast."""
    return torch.autocast(tensor.device.type, enabled=False)
