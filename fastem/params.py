"""Which parameters adapt, and putting the model back exactly as it was.

``select_parameters`` names the adapted set; :class:`ModelSnapshot` records everything an adaptation
call may touch (the adapted tensors bit-for-bit, every parameter's ``requires_grad`` and ``.grad``,
every module's train/eval flag) and restores it, also when the call fails half-way.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Union

import torch
from torch import nn

ParamSpec = Union[str, Callable[[str, nn.Parameter], bool]]
PARAM_SETS = ("layernorm", "layernorm:decoder", "layernorm:encoder", "layernorm:topN", "decoder", "encoder", "all")

__all__ = ["PARAM_SETS", "check_param_spec", "select_parameters", "touches_encoder", "first_adapted_encoder_layer",
           "cross_kv_fixed",
           "layernorm_modules", "ModelSnapshot", "MasterWeights"]


def _in_stack(name: str, stack: str) -> bool:
    """Whether parameter ``name`` lies in the ``"encoder"`` or ``"decoder"`` stack."""
    return f".{stack}." in f".{name}"


def is_norm(module: nn.Module) -> bool:
    """A normalization layer with a learnt scale: ``nn.LayerNorm`` or an RMSNorm (Llama, Qwen2, Gemma, ...)."""
    return isinstance(module, nn.LayerNorm) or (type(module).__name__.endswith("RMSNorm")
                                                 and isinstance(getattr(module, "weight", None), nn.Parameter))


def _layernorm_names(model: nn.Module) -> set[str]:
    names = set()
    for mod_name, mod in model.named_modules():
        if is_norm(mod):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def check_param_spec(which: ParamSpec) -> None:
    """Raise ``ValueError`` unless ``which`` names a parameter set (see :func:`select_parameters`)."""
    if callable(which):
        return
    if isinstance(which, str):
        if which in PARAM_SETS and which != "layernorm:topN":
            return
        if which.startswith("layernorm:top") and which[len("layernorm:top"):].isdigit():
            return
    raise ValueError(f"params must be one of {PARAM_SETS} (N a number of encoder layers) or a callable, got {which!r}")


def _encoder_layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


def select_parameters(model: nn.Module, which: ParamSpec = "layernorm") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs adapted for ``which``.

    * ``"layernorm"``: weight and bias of every LayerNorm, encoder and decoder (as SUTA adapts); in a
      language model, every normalization layer (LayerNorm or RMSNorm).
    * ``"layernorm:decoder"`` / ``"layernorm:encoder"``: the LayerNorms of one stack.  With the
      decoder's alone the encoder runs once per utterance, not once per step.
    * ``"layernorm:topN"``: the decoder's LayerNorms and those of the top ``N`` encoder layers (and
      the encoder's final LayerNorm); the encoder layers below run once per utterance.
    * ``"decoder"`` / ``"encoder"``: every parameter of that stack.
    * ``"all"``: every parameter.
    * a callable ``(name, param) -> bool`` picks its own set.

    Fixed sinusoidal tables (the encoder's ``embed_positions``) are never adapted.  Tied parameters
    (Whisper's output head is the token embedding) appear once.
    """
    check_param_spec(which)
    named = list(model.named_parameters())  # de-duplicates tied parameters
    if callable(which):
        chosen = [(n, p) for n, p in named if which(n, p)]
    elif which.startswith("layernorm"):
        ln = _layernorm_names(model)
        chosen = [(n, p) for n, p in named if n in ln]
        if which == "layernorm:decoder":
            chosen = [(n, p) for n, p in chosen if _in_stack(n, "decoder")]
        elif which == "layernorm:encoder":
            chosen = [(n, p) for n, p in chosen if _in_stack(n, "encoder")]
        elif which.startswith("layernorm:top"):
            top = int(which[len("layernorm:top"):])
            n_layers = len(model.get_encoder().layers) if hasattr(model, "get_encoder") else 0
            lowest = n_layers - top

            def keep(name: str) -> bool:
                if not _in_stack(name, "encoder"):
                    return True
                idx = _encoder_layer_index(name)
                return top > 0 and (idx is None or idx >= lowest)

            chosen = [(n, p) for n, p in chosen if keep(n)]
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


def first_adapted_encoder_layer(model: nn.Module, names: list[str]) -> int | None:
    """Index of the lowest encoder layer holding an adapted parameter (``None``: no encoder parameter
    adapts; the number of layers: only the encoder's final LayerNorm adapts).  Parameters before the
    layers (convolutions, positions) count as layer 0.  The layers below run once per utterance."""
    n_layers = len(model.get_encoder().layers)
    first = None
    for name in names:
        if not _in_stack(name, "encoder"):
            continue
        idx = _encoder_layer_index(name)
        if idx is None:  # the final LayerNorm comes after every layer; conv1, conv2, positions before
            idx = n_layers if "layer_norm" in name.split(".") else 0
        first = idx if first is None else min(first, idx)
    return first


def cross_kv_fixed(named: list[tuple[str, nn.Parameter]]) -> bool:
    """Whether the decoder's cross-attention keys/values stay fixed while these parameters adapt (no
    encoder parameter and no cross-attention key/value projection among them): then they are
    computed once per utterance."""
    return not touches_encoder(named) and not any(
        ".encoder_attn.k_proj." in n or ".encoder_attn.v_proj." in n for n, _ in named)


def layernorm_modules(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> dict[nn.LayerNorm, tuple[bool, bool]] | None:
    """``{LayerNorm module: (weight adapts, bias adapts)}`` when every selected parameter is a LayerNorm
    weight or bias (these can adapt per utterance, batched); ``None`` otherwise."""
    ids = {id(p) for _, p in named}
    found: dict[nn.LayerNorm, tuple[bool, bool]] = {}
    covered = 0
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            w = mod.weight is not None and id(mod.weight) in ids
            b = mod.bias is not None and id(mod.bias) in ids
            if w or b:
                found[mod] = (w, b)
                covered += int(w) + int(b)
    return found if covered == len(ids) else None


class ModelSnapshot:
    """Everything an adaptation call changes, recorded so it can be put back bit-for-bit."""

    def __init__(self, model: nn.Module, adapted: list[nn.Parameter]):
        self.model = model
        self.values = [(p, p.detach().clone()) for p in adapted]
        self.flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
        self.modes = [(m, m.training) for m in model.modules()]

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the recorded values with the current ones (twice: back as it was)."""
        for p, saved in self.values:
            tmp = p.detach().clone()
            p.copy_(saved)
            saved.copy_(tmp)

    @contextlib.contextmanager
    def swapped(self, active: bool = True):
        """Inside the block the model holds the recorded values (``active=False``: nothing changes);
        after it, whatever it held before, also when the block raises."""
        if not active:
            yield
            return
        self.swap()
        try:
            yield
        finally:
            self.swap()

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


def _own_forward(model: nn.Module) -> bool:
    """Whether fastem runs the model's forward itself (Whisper), so that per-utterance LayerNorms can be applied;
    a language model runs its own ``transformers`` forward, which reads the model's parameters."""
    return getattr(getattr(model, "config", None), "model_type", None) == "whisper"


class Binding:
    """What the optimizer updates, and how the forward pass sees it.

    * **Per utterance** (every selected parameter is a LayerNorm weight or bias): each of the ``B``
      utterances gets its own float32 copy (``[B, D]`` leaves in :attr:`tensors`), applied through
      :attr:`over`; the model's own parameters are never written (:meth:`commit` copies row 0 into
      them, for continual adaptation).
    * **Direct** (any other set; ``B`` must be 1): the model's parameters adapt in place through
      float32 :class:`MasterWeights`; the caller snapshots and restores them.
    """

    def __init__(self, model: nn.Module, named: list[tuple[str, nn.Parameter]], batch: int):
        from .whisper import LayerNormOverrides

        self.named = named
        lns = layernorm_modules(model, named) if _own_forward(model) else None
        if lns is not None:
            table = {}
            self.tensors = []
            for mod, (w_adapts, b_adapts) in lns.items():
                w = mod.weight.detach().float().unsqueeze(0).repeat(batch, 1)
                b = (mod.bias.detach().float() if mod.bias is not None else torch.zeros_like(mod.weight, dtype=torch.float32)
                     ).unsqueeze(0).repeat(batch, 1)
                for t, adapts in ((w, w_adapts), (b, b_adapts)):
                    if adapts:
                        t.requires_grad_(True)
                        self.tensors.append(t)
                table[mod] = (w, b)
            self.over = LayerNormOverrides(table)
            self.direct_params: list[nn.Parameter] = []
            self.masters = None
        else:
            if batch != 1:
                raise ValueError("only LayerNorm parameter sets adapt several utterances at once; this set adapts "
                                 "one utterance at a time")
            self.over = None
            self.direct_params = [p for _, p in named]
            self.masters = MasterWeights(self.direct_params)
            self.tensors = self.masters.masters

    @staticmethod
    def batchable(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> bool:
        """Whether this set adapts per utterance (several utterances in one batch)."""
        return _own_forward(model) and layernorm_modules(model, named) is not None

    @property
    def direct(self) -> bool:
        return self.over is None

    def before_backward(self) -> None:
        """Direct: make the model's parameters require grad (the caller's snapshot restores the flags)."""
        for p in self.direct_params:
            p.requires_grad_(True)
            p.grad = None

    def after_backward(self) -> None:
        if self.masters is not None:
            self.masters.pull_grads()

    def after_step(self) -> None:
        if self.masters is not None:
            self.masters.push_values()

    def zero_grad(self) -> None:
        if self.masters is not None:
            self.masters.zero_grad()
        for t in self.tensors:
            t.grad = None

    def grad_finite(self, batch: int) -> torch.Tensor:
        """``[B]``: whether each utterance's gradient is finite."""
        ok = torch.ones(batch, dtype=torch.bool)
        for t in self.tensors:
            if t.grad is None:
                continue
            g = t.grad.detach()
            ok &= (torch.isfinite(g).reshape(batch, -1).all(1) if not self.direct else torch.isfinite(g).all()).cpu()
        return ok

    @torch.no_grad()
    def drop_grads(self, which: torch.Tensor) -> None:
        """Zero the gradient of utterances ``which`` (``[B]`` bool; direct sets: all of it)."""
        for t in self.tensors:
            if t.grad is not None:
                if self.direct:
                    t.grad.zero_()
                else:
                    t.grad[which.to(t.device)] = 0

    @torch.no_grad()
    def rows(self) -> list[torch.Tensor]:
        """A copy of the current values (to undo a step for some utterances)."""
        return [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def optimizer_rows(self, optimizer) -> list[dict]:
        """A copy of ``optimizer``'s state of the same shape as each tensor (Adam's moments, SGD's momentum)."""
        return [{k: v.clone() for k, v in optimizer.state.get(t, {}).items() if torch.is_tensor(v) and v.shape == t.shape}
                for t in self.tensors]

    @torch.no_grad()
    def undo(self, saved: list[torch.Tensor], which: torch.Tensor, optimizer=None, states: list[dict] | None = None
             ) -> None:
        """Put back utterances ``which`` (``[B]`` bool) from ``saved`` (:meth:`rows`), and with ``optimizer`` its
        state from ``states`` (:meth:`optimizer_rows`)."""
        if not bool(which.any()):
            return
        for i, (t, s) in enumerate(zip(self.tensors, saved)):
            live = optimizer.state.get(t, {}) if optimizer is not None else {}
            kept = states[i] if states is not None else {}
            for dst, src in [(t, s)] + [(live[k], v) for k, v in kept.items() if k in live]:
                if self.direct:
                    dst.copy_(src)
                else:
                    dst[which.to(dst.device)] = src[which.to(dst.device)]
        self.after_step()

    @torch.no_grad()
    def pull_toward(self, values: list[torch.Tensor], fraction: float) -> None:
        """Move every adapted value ``fraction`` of the way back to ``values`` (e.g. the source model's)."""
        for t, v in zip(self.tensors, values):
            t.lerp_(v.to(device=t.device, dtype=t.dtype), fraction)
        self.after_step()

    @torch.no_grad()
    def commit(self, row: int = 0) -> None:
        """Per utterance: write utterance ``row``'s values into the model's LayerNorms."""
        if self.direct:
            return
        for mod, (w, b) in self.over.table.items():
            mod.weight.copy_(w[row].to(mod.weight.dtype))
            if mod.bias is not None:
                mod.bias.copy_(b[row].to(mod.bias.dtype))
