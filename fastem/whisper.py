"""Whisper's forward pass, laid out for adaptation: each piece computed once where it can be.

``transformers``' Whisper modules are used as they are (their weights, their linear layers, their
encoder self-attention); what this module adds is *where* the work happens:

* **Encoder prefix.** :func:`encoder_embed` + :func:`encoder_layers` split the encoder at any layer,
  so layers below the first adapted one run once per utterance and only the rest runs each step.
* **Cross-attention keys/values once.** :func:`cross_kv` projects the encoder output to every
  decoder layer's keys and values once; all rows of an utterance (its ``K`` samples) share them:
  their queries are folded into one attention call per utterance, never expanded per row.
* **Preallocated self-attention cache.** :class:`SelfKV` holds ``[L, R, H, T_max, d]`` keys and
  values written in place; finished rows are dropped from it (:meth:`SelfKV.keep`).
* **Per-utterance LayerNorms.** A :class:`LayerNormOverrides` table gives chosen LayerNorm modules
  one weight and bias per utterance (``[B, D]``); row ``r`` of a batch uses its utterance's row.
  This is how ``B`` utterances adapt in one batched forward and backward, each with its own
  parameters (and how the user's model is never written during episodic adaptation).

The decoder forward is the same for incremental decoding (with a :class:`SelfKV`) and for the
teacher-forced scoring pass (whole sequences, causal, differentiable).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerNormOverrides", "CrossKV", "SelfKV", "PaddingContext", "clip_frames", "encoder_embed",
           "encoder_layers", "encode", "padding_context", "padding_from", "cross_kv", "decoder_forward"]


class LayerNormOverrides:
    """Per-utterance weight and bias for some LayerNorm modules: ``{module: (weight [B, D], bias [B, D])}``.

    ``rows`` (given to :meth:`apply`) maps each row of the activations to its utterance.
    """

    def __init__(self, table: dict[nn.LayerNorm, tuple[torch.Tensor, torch.Tensor]]):
        self.table = table

    def apply(self, module: nn.LayerNorm, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        entry = self.table.get(module)
        if entry is None:
            return module(x)
        weight, bias = entry
        y = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
        w = weight.index_select(0, rows).to(x.dtype).view(shape)
        b = bias.index_select(0, rows).to(x.dtype).view(shape)
        return torch.addcmul(b, y, w)


def _ln(module: nn.LayerNorm, x: torch.Tensor, over: LayerNormOverrides | None, rows: torch.Tensor | None):
    return module(x) if over is None else over.apply(module, x, rows)


def features(model, processor, waves: list[torch.Tensor]) -> torch.Tensor:
    """Log-mel features of 16 kHz mono ``waves`` by ``processor``'s extractor, on the model's device and dtype."""
    from .audio import SAMPLE_RATE

    feats = processor.feature_extractor([w.numpy() for w in waves], sampling_rate=SAMPLE_RATE,
                                        return_tensors="pt").input_features
    param = next(model.parameters())
    return feats.to(device=param.device, dtype=param.dtype)


def encoder_embed(model, features: torch.Tensor, *, shorter: bool = False) -> torch.Tensor:
    """Convolutions + positions: ``[B, n_mels, 3000]`` log-mel features -> ``[B, 1500, D]``.  With
    ``shorter``, fewer frames (an even number) are accepted: the first positions of the 30-s input
    (:func:`clip_frames`), the audio context whisper.cpp calls ``audio_ctx``."""
    enc = model.get_encoder()
    expected = enc.config.max_source_positions * enc.conv1.stride[0] * enc.conv2.stride[0]
    frames = features.shape[-1]
    if frames != expected and not (shorter and 0 < frames < expected and frames % 2 == 0):
        raise ValueError(f"Whisper expects {expected} mel frames (30 s, padded), got {frames}")
    h = F.gelu(enc.conv1(features))
    h = F.gelu(enc.conv2(h)).permute(0, 2, 1)
    return h + enc.embed_positions.weight[: h.shape[1]]


def clip_frames(seconds: list[float], total: int = 3000, margin_seconds: float = 1.0) -> int:
    """Mel frames that hold the longest of these clips with a margin, rounded up to whole seconds (100
    frames), at most ``total``: the encoder's input when it runs on the clips' own length."""
    longest = max(seconds) + margin_seconds
    return int(min(total, 100 * -(-longest * 100 // 100)))


@dataclass
class PaddingContext:
    """The source model's encoder on the positions after the first ``positions`` (the padding of a clip's 30-s
    input): each layer's self-attention keys and values there (``[B, H, S - positions, d]``, from layer ``start``
    on) and the last layer's output there, before the final LayerNorm (``[B, S - positions, D]``).  With it the
    first positions alone run through the encoder and still attend over the whole input (:func:`encoder_layers`)."""

    positions: int
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    hidden: torch.Tensor

    @staticmethod
    def cat(parts: list["PaddingContext"]) -> "PaddingContext":
        """Several utterances' contexts of the same ``positions`` as one batch."""
        if len({p.positions for p in parts}) != 1:
            raise ValueError("only contexts of the same length join in one batch")
        return PaddingContext(parts[0].positions, [torch.cat(k) for k in zip(*(p.keys for p in parts))],
                              [torch.cat(v) for v in zip(*(p.values for p in parts))],
                              torch.cat([p.hidden for p in parts]))


def _attend_with_padding(attn, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Whisper's encoder self-attention for the positions ``x`` over themselves and fixed ``keys``/``values``."""
    q = _heads(attn.q_proj(x), attn)
    k = torch.cat([_heads(attn.k_proj(x), attn), keys.to(x.dtype)], 2)
    v = torch.cat([_heads(attn.v_proj(x), attn), values.to(x.dtype)], 2)
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
    return attn.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


def encoder_layers(model, h: torch.Tensor, start: int = 0, stop: int | None = None, *,
                   over: LayerNormOverrides | None = None, final_norm: bool = True,
                   rows: torch.Tensor | None = None, padding: PaddingContext | None = None,
                   attn_inputs: list | None = None) -> torch.Tensor:
    """Encoder layers ``[start, stop)`` on hidden states ``h [B, S, D]``, then the final LayerNorm
    (when ``final_norm`` and the stack is run to its end).  ``rows [B]``: the row of ``over``'s tables
    each utterance uses (default: its own index).  ``padding``: ``h`` holds the first ``padding.positions``
    positions alone, which attend over themselves and the padding's fixed keys/values; the output is the whole
    input's, the padding's last hidden states joined before the final LayerNorm (``stop`` must be None).
    ``attn_inputs``: each layer's normalized self-attention input is appended to it (:func:`padding_context`)."""
    enc = model.get_encoder()
    if over is not None and rows is None:
        rows = torch.arange(h.shape[0], device=h.device)
    layers = enc.layers[start:stop]
    if padding is not None and (stop is not None or len(padding.keys) != len(layers)):
        raise ValueError("a padding context runs the encoder to its end, from the layer it was made at")
    for i, layer in enumerate(layers):
        x = _ln(layer.self_attn_layer_norm, h, over, rows)
        if attn_inputs is not None:
            attn_inputs.append(x)
        if padding is None:
            x, _ = layer.self_attn(hidden_states=x, attention_mask=None)
        else:
            x = _attend_with_padding(layer.self_attn, x, padding.keys[i], padding.values[i])
        h = h + x
        x = _ln(layer.final_layer_norm, h, over, rows)
        h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
        if h.dtype == torch.float16:
            limit = torch.finfo(h.dtype).max - 1000
            h = h.clamp(-limit, limit)
    if padding is not None:
        h = torch.cat([h, padding.hidden.to(h.dtype)], 1)
    if final_norm and (stop is None or stop >= len(enc.layers)):
        h = _ln(enc.layer_norm, h, over, rows)
    return h


@torch.no_grad()
def padding_context(model, h: torch.Tensor, start: int, positions: int) -> PaddingContext:
    """The :class:`PaddingContext` of hidden states ``h [B, S, D]`` entering layer ``start``: the model's encoder
    layers run on the whole input, keeping what the positions from ``positions`` on contribute."""
    inputs: list[torch.Tensor] = []
    last = encoder_layers(model, h, start, final_norm=False, attn_inputs=inputs)
    return padding_from(model, start, inputs, last, positions)


def padding_from(model, start: int, attn_inputs: list[torch.Tensor], last: torch.Tensor,
                 positions: int) -> PaddingContext:
    """The :class:`PaddingContext` from a pass of the encoder layers from ``start`` that recorded its
    ``attn_inputs`` (:func:`encoder_layers`) and ended in ``last`` (before the final LayerNorm)."""
    layers = model.get_encoder().layers[start:]
    keys = [_heads(layer.self_attn.k_proj(x[:, positions:]), layer.self_attn) for layer, x in zip(layers, attn_inputs)]
    values = [_heads(layer.self_attn.v_proj(x[:, positions:]), layer.self_attn) for layer, x in zip(layers, attn_inputs)]
    return PaddingContext(positions, keys, values, last[:, positions:].contiguous())


def encode(model, features: torch.Tensor, *, over: LayerNormOverrides | None = None) -> torch.Tensor:
    """The whole encoder: ``[B, n_mels, 3000]`` -> ``[B, 1500, D]``."""
    return encoder_layers(model, encoder_embed(model, features), over=over)


@dataclass
class CrossKV:
    """Every decoder layer's cross-attention keys and values, ``[B, H, S, d]``, one row per utterance."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    def detach(self) -> "CrossKV":
        return CrossKV([k.detach() for k in self.keys], [v.detach() for v in self.values])

    def select(self, index: list[int]) -> "CrossKV":
        """The keys/values of utterances ``index`` (all of them, in order: this object)."""
        if list(index) == list(range(self.keys[0].shape[0])):
            return self
        sel = torch.tensor(index, device=self.keys[0].device, dtype=torch.long)
        return CrossKV([k.index_select(0, sel) for k in self.keys], [v.index_select(0, sel) for v in self.values])

    # -- the decoder context interface (what the sampler, beam search and scoring call) ----------------
    @property
    def device(self) -> torch.device:
        return self.keys[0].device

    def prefill(self, model, ids: torch.Tensor, groups: list[int], *, max_len: int, over=None, rows=None):
        """Run the prompts ``ids [R, P]`` into a new self-attention cache for ``max_len`` positions; returns
        ``(hidden [R, P, D], cache)``."""
        cache = SelfKV(model, ids.shape[0], max_len, device=ids.device, dtype=self.keys[0].dtype)
        return decoder_forward(model, ids, self, groups, cache=cache, over=over, rows=rows), cache

    def step(self, model, ids: torch.Tensor, cache: "SelfKV", groups: list[int], *, over=None, rows=None):
        """Continue the cached rows by ``ids [R, 1]``: hidden states ``[R, 1, D]``."""
        return decoder_forward(model, ids, self, groups, cache=cache, over=over, rows=rows)

    def forward(self, model, ids: torch.Tensor, groups: list[int], *, over=None, rows=None,
                start: int = 0) -> torch.Tensor:
        """Whole sequences ``ids [R, T]`` from position 0 (causal, differentiable): the hidden states of
        positions ``start`` onwards, ``[R, T - start, D]``."""
        return decoder_forward(model, ids, self, groups, over=over, rows=rows)[:, start:]


def cross_kv(model, enc: torch.Tensor) -> CrossKV:
    """Project the encoder output ``[B, S, D]`` to each decoder layer's cross-attention keys/values."""
    keys, values = [], []
    b, s, _ = enc.shape
    for layer in model.get_decoder().layers:
        attn = layer.encoder_attn
        shape = (b, s, attn.num_heads, attn.head_dim)
        keys.append(attn.k_proj(enc).view(shape).transpose(1, 2).contiguous())
        values.append(attn.v_proj(enc).view(shape).transpose(1, 2).contiguous())
    return CrossKV(keys, values)


class SelfKV:
    """Preallocated decoder self-attention cache: keys/values ``[L, R, H, T_max, d]``, filled in place."""

    def __init__(self, model, rows: int, max_len: int, *, device, dtype):
        dec = model.get_decoder()
        attn = dec.layers[0].self_attn
        shape = (len(dec.layers), rows, attn.num_heads, max_len, attn.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` (in that order; repeated rows are copied, as beam search needs)."""
        self.k = self.k.index_select(1, index)
        self.v = self.v.index_select(1, index)


def _heads(x: torch.Tensor, attn) -> torch.Tensor:
    r, t, _ = x.shape
    return x.view(r, t, attn.num_heads, attn.head_dim).transpose(1, 2).contiguous()


def _self_attention(attn, x: torch.Tensor, cache: SelfKV | None, layer: int, start: int) -> torch.Tensor:
    r, t, d = x.shape
    q = _heads(attn.q_proj(x) * attn.scaling, attn)
    k = _heads(attn.k_proj(x), attn)
    v = _heads(attn.v_proj(x), attn)
    mask, causal = None, t > 1
    if cache is not None:
        cache.k[layer, :, :, start:start + t] = k
        cache.v[layer, :, :, start:start + t] = v
        k = cache.k[layer, :, :, :start + t]
        v = cache.v[layer, :, :, :start + t]
        if t > 1 and start > 0:
            pos = torch.arange(start + t, device=x.device)
            mask = pos.unsqueeze(0) <= (pos[start:].unsqueeze(1))
            causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=1.0)
    return attn.out_proj(out.transpose(1, 2).reshape(r, t, d))


def _cross_attention(attn, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     groups: list[int]) -> torch.Tensor:
    """Cross-attention of ``R`` rows, ``groups[b]`` consecutive rows per utterance ``b``: each utterance's
    rows are folded into one query sequence against its single copy of the keys and values."""
    r, t, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q = _heads(attn.q_proj(x) * attn.scaling, attn)  # [R, H, T, d]
    if all(g == 1 for g in groups):  # one row per utterance: an ordinary batched call
        out = F.scaled_dot_product_attention(q, keys, values, scale=1.0)
    else:
        parts, lo = [], 0
        for b, g in enumerate(groups):
            if g == 0:
                continue
            qb = q[lo:lo + g].transpose(0, 1).reshape(1, h, g * t, hd)
            ob = F.scaled_dot_product_attention(qb, keys[b:b + 1], values[b:b + 1], scale=1.0)
            parts.append(ob.view(h, g, t, hd).transpose(0, 1))
            lo += g
        out = torch.cat(parts) if len(parts) > 1 else parts[0]
    return attn.out_proj(out.transpose(1, 2).reshape(r, t, d))


def decoder_forward(model, ids: torch.Tensor, cross: CrossKV, groups: list[int], *, cache: SelfKV | None = None,
                    over: LayerNormOverrides | None = None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder hidden states (after the final LayerNorm) ``[R, T, D]`` for token ids ``[R, T]``.

    ``groups[b]``: how many consecutive rows belong to utterance ``b`` (whose cross keys/values are
    ``cross.*[i][b]``).  With ``cache`` the ids continue the cached sequence at ``cache.length`` and the
    cache grows; without, the ids are whole sequences from position 0 (causal).  ``rows [R]`` maps rows
    to utterances for per-utterance LayerNorms (default: from ``groups``).
    """
    dec = model.get_decoder()
    r, t = ids.shape
    if sum(groups) != r:
        raise ValueError(f"groups {groups} do not cover the {r} rows")
    if over is not None and rows is None:
        rows = torch.repeat_interleave(torch.arange(len(groups), device=ids.device),
                                       torch.tensor(groups, device=ids.device))
    start = cache.length if cache is not None else 0
    h = dec.embed_tokens(ids) + dec.embed_positions.weight[start:start + t]
    for i, layer in enumerate(dec.layers):
        x = _ln(layer.self_attn_layer_norm, h, over, rows)
        h = h + _self_attention(layer.self_attn, x, cache, i, start)
        x = _ln(layer.encoder_attn_layer_norm, h, over, rows)
        h = h + _cross_attention(layer.encoder_attn, x, cross.keys[i], cross.values[i], groups)
        x = _ln(layer.final_layer_norm, h, over, rows)
        h = h + layer.fc2(layer.activation_fn(layer.fc1(x)))
    if cache is not None:
        cache.length = start + t
    return _ln(dec.layer_norm, h, over, rows)
