"""A second checkpoint's vote on an adapted transcript.

The ``consensus`` guard lets the source and the adapted model vote; both are the same network, so they
share its blind spots.  A *verifier* is another Whisper checkpoint (``AdaptConfig.verifier``: a bundled
name, a hub id or a local directory, loaded once per process): it scores the unadapted and the adapted
transcript of each adapted utterance, teacher forced on the same audio, and the ``verifier`` guard keeps
the unadapted transcript when the verifier finds the adapted one more than ``max_verifier_drop`` nats
per token less likely.  It never adapts and never writes the user's model.

The texts are re-tokenized with the verifier's own tokenizer and the audio goes through its own feature
extractor, so any Whisper checkpoint can verify any other.  An English-only verifier has no vote on
audio in another language (its scores are ``None``: the guard passes).
"""
from __future__ import annotations

import threading

import torch

from .sampling import Head, build_prompts, is_multilingual, language_code, mean_logp
from .whisper import cross_kv, encode, features

__all__ = ["load_verifier", "verifier_scores"]

_LOADED: dict[tuple[str, str], tuple] = {}
_LOCK = threading.Lock()


def load_verifier(name: str, device) -> tuple:
    """``(model, processor)`` of the checkpoint ``name`` on ``device``, loaded once per process, in eval
    mode with gradients off."""
    key = (str(name), str(torch.device(device)))
    with _LOCK:
        if key not in _LOADED:
            from .models import load_whisper

            model, processor = load_whisper(name, device=device)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            _LOADED[key] = (model, processor)
        return _LOADED[key]


@torch.no_grad()
def verifier_scores(model, processor, waves: list[torch.Tensor], texts: list[list[str]],
                    languages: list[str | None]) -> list[list[float] | None]:
    """Per utterance, the verifier's mean log-prob per token (end of text included) of each of its texts,
    teacher forced on its audio (16 kHz mono ``waves``); ``None`` for an utterance the verifier cannot
    judge (an English-only verifier and a language other than English, or no language known)."""
    multilingual = is_multilingual(model)
    usable = [b for b, lang in enumerate(languages)
              if lang is not None and (multilingual or language_code(lang) == "en")]
    out: list[list[float] | None] = [None] * len(waves)
    if not usable:
        return out
    cross = cross_kv(model, encode(model, features(model, processor, [waves[b] for b in usable])))
    prompts = build_prompts(model, cross, [languages[b] for b in usable])
    tok = processor.tokenizer
    ids = [[tok.encode(" " + t.strip(), add_special_tokens=False) if t.strip() else [] for t in texts[b]]
           for b in usable]
    for b, means in zip(usable, mean_logp(model, cross, prompts, ids, Head(model))):
        out[b] = means
    return out
