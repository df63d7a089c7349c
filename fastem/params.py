"""Which parameters adapt, and putting the model back exactly as it was.

``select_parameters`` names the adapted set; :class:`ModelSnapshot` records everything an adaptation
call may touch (the adapted tensors bit-for-bit, every parameter's ``requires_grad`` and ``.grad``,
every module's train/eval flag) and restores it, also when the call fails half-way.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

ParamSpec = Union[str, Callable[[str, nn.Parameter], bool]]
PARAM_SETS = ("layernorm", "decoder", "encoder", "all")

__all__ = ["PARAM_SETS", "select_parameters", "touches_encoder", "ModelSnapshot", "MasterWeights"]


def _in_stack(name: str, stack: str) -> bool:
    """Whether parameter ``name`` lies in the ``"encoder"`` or ``"decoder"`` stack."""
    return f".{stack}." in f".{name}"


def _layernorm_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def select_parameters(model: nn.Module, which: ParamSpec = "layernorm") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs adapted for ``which``.

    * ``"layernorm"``: weight and bias of every LayerNorm, encoder and decoder (as SUTA adapts).
    * ``"decoder"`` / ``"encoder"``: every parameter of that stack.
    * ``"all"``: every parameter.
    * a callable ``(name, param) -> bool`` picks its own set.

    Fixed sinusoidal tables (the encoder's ``embed_positions``) are never adapted.  Tied parameters
    (Whisper's output head is the token embedding) appear once.
    """
    named = list(model.named_parameters())  # de-duplicates tied parameters
    if callable(which):
        chosen = [(n, p) for n, p in named if which(n, p)]
    elif which == "layernorm":
        ln = _layernorm_names(model)
        chosen = [(n, p) for n, p in named if n in ln]
    elif which in ("decoder", "encoder"):
        chosen = [(n, p) for n, p in named if _in_stack(n, which)]
    elif which == "all":
        chosen = named
    else:
        raise ValueError(f"params must be one of {PARAM_SETS} or a callable, got {which!r}")
    chosen = [(n, p) for n, p in chosen if not n.endswith("encoder.embed_positions.weight")]
    if not chosen:
        raise ValueError(f"params={which!r} selects no parameter of this model")
    return chosen


def touches_encoder(named: list[tuple[str, nn.Parameter]]) -> bool:
    """Whether any selected parameter is in the encoder (then the encoder must run with grad each step)."""
    return any(_in_stack(n, "encoder") for n, _ in named)


class ModelSnapshot:
    """Everything an adaptation call changes, recorded so it can be put back bit-for-bit."""

    def __init__(self, model: nn.Module, adapted: list[nn.Parameter]):
        self.model = model
        self.values = [(p, p.detach().clone()) for p in adapted]
        self.flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def restore(self, *, values: bool = True) -> None:
        """Put back flags, grads and modes; and the adapted values unless ``values=False`` (continual)."""
        if values:
            for p, saved in self.values:
                p.copy_(saved)
        for p, requires_grad, grad in self.flags:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for m, training in self.modes:
            m.training = training


class MasterWeights:
    """Float32 master copies for parameters stored in half precision.

    The optimizer updates the float32 masters; after each step the model's half-precision parameters
    are set from them, so small updates are not lost to rounding.  Float32 parameters are their own
    masters (no copy).
    """

    def __init__(self, params: list[nn.Parameter]):
        self.pairs = [(p, p if p.dtype == torch.float32 else p.detach().float().requires_grad_(True)) for p in params]

    @property
    def masters(self) -> list[torch.Tensor]:
        return [m for _, m in self.pairs]

    def pull_grads(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def push_values(self) -> None:
        for p, m in self.pairs:
            if m is not p:
                p.copy_(m)

    def zero_grad(self) -> None:
        for p, m in self.pairs:
            p.grad = None
            m.grad = None
