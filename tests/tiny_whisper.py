"""A tiny randomly initialised Whisper with the real multilingual vocabulary layout.

Weights are random but shaped so that decoding behaves like a real model's: the final layer norm's
bias points along a direction that the EOS embedding also points along, so EOS has a sizeable,
input-dependent probability and sampled hypotheses end at varied lengths.
"""
from __future__ import annotations

import torch
from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

EOS, SOT, TRANSCRIBE, TRANSLATE, NO_TS = 50257, 50258, 50359, 50358, 50363
LANGS = {"<|en|>": 50259, "<|zh|>": 50260, "<|de|>": 50261, "<|cs|>": 50283, "<|nl|>": 50271}
SUPPRESS = [1, 2, 7, 8, 9, 10, 14, 25, 26, 27, 28, 29, 31, 58, 59, 60, 61, 62, 63, 90, 91, 92, 93, 50359, 50360,
            50361, 50362, 50363]


def tiny_whisper(seed: int = 0, d_model: int = 32, eos_strength: float = 5.0,
                 encoder_layers: int = 1) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=d_model, encoder_layers=encoder_layers, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=2 * d_model,
        decoder_ffn_dim=2 * d_model, max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=SOT, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS,
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        u = torch.randn(d_model)
        u /= u.norm()
        model.model.decoder.layer_norm.bias.copy_(2.0 * u)
        model.model.decoder.embed_tokens.weight[EOS] = eos_strength * u
    gc = GenerationConfig(
        decoder_start_token_id=SOT, eos_token_id=EOS, pad_token_id=EOS, bos_token_id=EOS,
        suppress_tokens=list(SUPPRESS), begin_suppress_tokens=[220, EOS], no_timestamps_token_id=NO_TS,
        lang_to_id=dict(LANGS), task_to_id={"transcribe": TRANSCRIBE, "translate": TRANSLATE},
        is_multilingual=True, max_length=448,
    )
    model.generation_config = gc
    return model


def random_features(seed: int = 0, frames: int = 3000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 80, frames, generator=g) * 0.5


def teacher_forced_mean_logp(model, feats, toks, prompt=(SOT, LANGS["<|en|>"], TRANSCRIBE, NO_TS)) -> float:
    """By hand, from the plain HF model's logits: the mean log-prob per token of ``toks`` + EOS after
    ``prompt``, with the generation config's suppressions (float64)."""
    prompt = list(prompt)
    ids = torch.tensor([prompt + list(toks) + [EOS]])
    with torch.no_grad():
        logits = model(input_features=feats, decoder_input_ids=ids[:, :-1]).logits[0, len(prompt) - 1:].double()
    gc = model.generation_config
    logits[:, gc.suppress_tokens] = float("-inf")
    logits[0, gc.begin_suppress_tokens] = float("-inf")
    return float(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):].unsqueeze(1)).mean())
