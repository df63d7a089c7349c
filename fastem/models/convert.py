"""Convert a CTranslate2 Whisper export into a ``transformers`` ``WhisperForConditionalGeneration``.

Three things are rebuilt from a CTranslate2 directory (``model.bin`` + ``config.json``):

* the architecture (``WhisperConfig``), read off the tensor shapes and the stored head counts;
* the weights, renamed to the transformers layout (fused q|k|v and k|v projections are split);
* the generation config (special tokens, suppressed tokens, languages, alignment heads), so that
  ``model.generate(features, language=..., task="transcribe")`` behaves as with a hub checkpoint.

Every stored variable must be used and every model parameter filled: anything else is an error,
never a silently random weight.
"""
from __future__ import annotations

import re

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizer
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from .ctranslate2 import CT2Model

__all__ = ["ConversionError", "whisper_config_from_ct2", "state_dict_from_ct2", "generation_config_for", "convert_ct2_whisper"]

# Scalar attributes CTranslate2 stores next to the weights, and the values the transformers
# Whisper architecture implies. None = informational only (read elsewhere or not needed).
_GELU = 3  # CTranslate2's ActivationType::GELU
_EXPECTED_ATTRIBUTES = {
    "activation": _GELU,
    "pre_norm": 1,
    "alibi": 0,
    "scale_embeddings": 0,
    "start_from_zero_embedding": 0,
    "num_heads": None,
    "alignment_heads": None,
    "alignment_layer": None,
}

# OpenAI's decoding rule: the first timestamp may be at most 1.0 s (50 steps of 0.02 s).
MAX_INITIAL_TIMESTAMP_INDEX = 50


class ConversionError(ValueError):
    """The CTranslate2 model does not map onto the transformers Whisper architecture."""


class _Weights:
    """Float32 access to CT2 variables that records which ones were used."""

    def __init__(self, ct2: CT2Model):
        self.ct2 = ct2
        self.used: set[str] = set()

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.ct2:
            raise ConversionError(f"model.bin has no variable {name!r}")
        real = self.ct2.aliases.get(name, name)
        self.used.add(real)
        tensor = self.ct2.variables[real]
        scale_name = real + "_scale"
        if scale_name in self.ct2.variables:
            # Quantized (int8/int16) weight: CTranslate2 stores round(w * scale), scale per output row.
            self.used.add(scale_name)
            scale = self.ct2.variables[scale_name].float()
            return tensor.float() / (scale.unsqueeze(-1) if scale.dim() == 1 else scale)
        if not tensor.is_floating_point():
            raise ConversionError(f"{name} is stored as {tensor.dtype} without a scale; cannot use it as a weight")
        return tensor.float()

    def unused(self) -> list[str]:
        return sorted(set(self.ct2.variables) - self.used)


def _scalar(ct2: CT2Model, name: str) -> int | None:
    return int(ct2.variables[name].item()) if name in ct2.variables else None


def _count_layers(ct2: CT2Model, stack: str) -> int:
    pattern = re.compile(rf"^{stack}/layer_(\d+)/")
    indices = {int(m.group(1)) for name in ct2.variables if (m := pattern.match(name))}
    if indices != set(range(len(indices))):
        raise ConversionError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _check_attributes(ct2: CT2Model) -> None:
    for stack in ("encoder", "decoder"):
        for attr, expected in _EXPECTED_ATTRIBUTES.items():
            value = _scalar(ct2, f"{stack}/{attr}")
            if expected is not None and value is not None and value != expected:
                raise ConversionError(
                    f"unsupported CTranslate2 Whisper variant: {stack}/{attr} = {value}, expected {expected}"
                )


def whisper_config_from_ct2(ct2: CT2Model, *, eot_id: int, sot_id: int,
                            suppress_tokens: list[int] | None = None,
                            begin_suppress_tokens: list[int] | None = None) -> WhisperConfig:
    """The ``WhisperConfig`` implied by the stored shapes (and stored head counts)."""
    if ct2.spec != "WhisperSpec":
        raise ConversionError(f"not a Whisper model: spec is {ct2.spec!r}")
    _check_attributes(ct2)
    d_model, n_mels, _ = ct2.get("encoder/conv1/weight").shape
    # Whisper uses 64-dimensional heads; the stored count wins when present.
    enc_heads = _scalar(ct2, "encoder/num_heads") or d_model // 64
    dec_heads = _scalar(ct2, "decoder/num_heads") or d_model // 64
    return WhisperConfig(
        vocab_size=ct2.get("decoder/embeddings/weight").shape[0],
        num_mel_bins=n_mels,
        d_model=d_model,
        encoder_layers=_count_layers(ct2, "encoder"),
        decoder_layers=_count_layers(ct2, "decoder"),
        encoder_attention_heads=enc_heads,
        decoder_attention_heads=dec_heads,
        encoder_ffn_dim=ct2.get("encoder/layer_0/ffn/linear_0/weight").shape[0],
        decoder_ffn_dim=ct2.get("decoder/layer_0/ffn/linear_0/weight").shape[0],
        max_source_positions=ct2.get("encoder/position_encodings/encodings").shape[0],
        max_target_positions=ct2.get("decoder/position_encodings/encodings").shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=eot_id,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
        decoder_start_token_id=sot_id,
        suppress_tokens=suppress_tokens,
        begin_suppress_tokens=begin_suppress_tokens,
    )


def _linear(sd: dict, w: _Weights, dst: str, src: str, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = w(f"{src}/weight")
    if bias:
        sd[f"{dst}.bias"] = w(f"{src}/bias")


def _layer_norm(sd: dict, w: _Weights, dst: str, src: str) -> None:
    sd[f"{dst}.weight"] = w(f"{src}/gamma")
    sd[f"{dst}.bias"] = w(f"{src}/beta")


def _split_rows(sd: dict, w: _Weights, src: str, dsts: list[str]) -> None:
    """Split a row-stacked fused projection (e.g. q|k|v) into separate linears.

    The key projection has no bias in transformers' Whisper: CTranslate2 stores zeros there. A
    bias on the keys would only add a per-query constant to the attention scores, which softmax
    ignores, so dropping that slice cannot change the model either way.
    """
    weights = w(f"{src}/weight").chunk(len(dsts), dim=0)
    biases = w(f"{src}/bias").chunk(len(dsts), dim=0)
    for dst, weight, bias in zip(dsts, weights, biases):
        sd[f"{dst}.weight"] = weight.contiguous()
        if not dst.endswith("k_proj"):
            sd[f"{dst}.bias"] = bias.contiguous()


def _ffn(sd: dict, w: _Weights, dst: str, src: str) -> None:
    _linear(sd, w, f"{dst}.fc1", f"{src}/ffn/linear_0")
    _linear(sd, w, f"{dst}.fc2", f"{src}/ffn/linear_1")
    _layer_norm(sd, w, f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")


def _self_attention(sd: dict, w: _Weights, dst: str, src: str) -> None:
    a = f"{dst}.self_attn"
    _split_rows(sd, w, f"{src}/self_attention/linear_0", [f"{a}.q_proj", f"{a}.k_proj", f"{a}.v_proj"])
    _linear(sd, w, f"{a}.out_proj", f"{src}/self_attention/linear_1")
    _layer_norm(sd, w, f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")


def state_dict_from_ct2(ct2: CT2Model, config: WhisperConfig) -> dict[str, torch.Tensor]:
    """Float32 transformers state dict; raises if any stored variable is left unused."""
    w = _Weights(ct2)
    sd: dict[str, torch.Tensor] = {}
    enc, dec = "model.encoder", "model.decoder"
    for conv in ("conv1", "conv2"):
        _linear(sd, w, f"{enc}.{conv}", f"encoder/{conv}")
    sd[f"{enc}.embed_positions.weight"] = w("encoder/position_encodings/encodings")
    for i in range(config.encoder_layers):
        _self_attention(sd, w, f"{enc}.layers.{i}", f"encoder/layer_{i}")
        _ffn(sd, w, f"{enc}.layers.{i}", f"encoder/layer_{i}")
    _layer_norm(sd, w, f"{enc}.layer_norm", "encoder/layer_norm")

    sd[f"{dec}.embed_tokens.weight"] = w("decoder/embeddings/weight")
    sd[f"{dec}.embed_positions.weight"] = w("decoder/position_encodings/encodings")
    for i in range(config.decoder_layers):
        layer, src = f"{dec}.layers.{i}", f"decoder/layer_{i}"
        _self_attention(sd, w, layer, src)
        x = f"{layer}.encoder_attn"
        _linear(sd, w, f"{x}.q_proj", f"{src}/attention/linear_0")
        _split_rows(sd, w, f"{src}/attention/linear_1", [f"{x}.k_proj", f"{x}.v_proj"])
        _linear(sd, w, f"{x}.out_proj", f"{src}/attention/linear_2")
        _layer_norm(sd, w, f"{layer}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
        _ffn(sd, w, layer, src)
    _layer_norm(sd, w, f"{dec}.layer_norm", "decoder/layer_norm")
    # The output head: an alias of the token embedding in CTranslate2, tied in transformers.
    projection = "decoder/projection/weight" if "decoder/projection/weight" in ct2 else "decoder/embeddings/weight"
    sd["proj_out.weight"] = w(projection)
    if projection in ct2.variables:  # stored separately, not tied: must equal the embedding to tie
        if not torch.equal(sd["proj_out.weight"], sd[f"{dec}.embed_tokens.weight"]):
            raise ConversionError("decoder/projection differs from decoder/embeddings: untied output heads are not supported")

    # Attribute scalars were validated by whisper_config_from_ct2; count them as used.
    w.used.update(n for n in ct2.variables if n.rsplit("/", 1)[-1] in _EXPECTED_ATTRIBUTES and ct2.variables[n].dim() == 0)
    leftover = w.unused()
    if leftover:
        raise ConversionError(f"model.bin variables not mapped to the transformers model: {leftover}")
    return sd


def generation_config_for(config: WhisperConfig, tokenizer: WhisperTokenizer, ct2_config: dict) -> GenerationConfig:
    """Whisper generation settings from the CTranslate2 ``config.json`` and the special tokens."""
    vocab = tokenizer.get_vocab()

    def token_id(token: str) -> int:
        if token not in vocab:
            raise ConversionError(f"tokenizer lacks the special token {token}")
        return vocab[token]

    # Built field by field, not with from_model_config(): a config marked as derived from the
    # model config is re-derived by from_pretrained, which would drop the Whisper fields below.
    gen = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
        max_length=config.max_target_positions,
    )
    gen.suppress_tokens = list(ct2_config.get("suppress_ids", config.suppress_tokens or []))
    gen.begin_suppress_tokens = list(ct2_config.get("suppress_ids_begin", config.begin_suppress_tokens or []))
    gen.no_timestamps_token_id = token_id("<|notimestamps|>")
    gen.prev_sot_token_id = token_id("<|startofprev|>")
    gen.max_initial_timestamp_index = MAX_INITIAL_TIMESTAMP_INDEX
    gen.return_timestamps = False
    # OpenAI's rule (also transformers'): multilingual vocabularies have 51865 tokens or more.
    gen.is_multilingual = config.vocab_size >= 51865
    if gen.is_multilingual:
        gen.lang_to_id = {f"<|{code}|>": vocab[f"<|{code}|>"] for code in LANGUAGES if f"<|{code}|>" in vocab}
        gen.task_to_id = {task: token_id(f"<|{task}|>") for task in ("transcribe", "translate")}
        # Hub checkpoints default to transcription (via the deprecated forced_decoder_ids); the
        # ``task`` field does the same without the deprecation warning. language=None still
        # triggers language detection.
        gen.task = "transcribe"
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(map(int, pair)) for pair in ct2_config["alignment_heads"]]
    return gen


def convert_ct2_whisper(ct2: CT2Model, ct2_config: dict, tokenizer: WhisperTokenizer) -> WhisperForConditionalGeneration:
    """A float32, eval-mode ``WhisperForConditionalGeneration`` holding the CTranslate2 weights."""
    config = whisper_config_from_ct2(
        ct2,
        eot_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        sot_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
        suppress_tokens=ct2_config.get("suppress_ids"),
        begin_suppress_tokens=ct2_config.get("suppress_ids_begin"),
    )
    if len(tokenizer) != config.vocab_size:
        raise ConversionError(f"tokenizer has {len(tokenizer)} tokens but the model's vocabulary has {config.vocab_size}")
    state_dict = state_dict_from_ct2(ct2, config)
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(
            f"converted weights do not fit the model: missing {result.missing_keys}, unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise ConversionError(f"tensors left uninitialised after conversion: {still_meta}")
    model.generation_config = generation_config_for(config, tokenizer, ct2_config)
    return model.eval()
