"""Transcript normalisation and word error rate, the way Whisper results are usually scored.

References in different corpora disagree on case, punctuation and number style, so hypothesis
and reference are both normalised before counting errors: Whisper's ``EnglishTextNormalizer``
for English (contractions, numbers, British->American spellings, punctuation) and its
``BasicTextNormalizer`` (lower case, symbols and bracketed text removed) for other languages.

The British->American spelling table is not part of ``transformers`` (hub checkpoints ship it
as ``normalizer.json``). :func:`english_spelling_mapping` looks for it offline; without it the
English normaliser still does everything except that one step.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import jiwer
from transformers.models.whisper.english_normalizer import BasicTextNormalizer, EnglishTextNormalizer

__all__ = ["english_spelling_mapping", "normalize", "word_edits", "word_errors", "wer"]

logger = logging.getLogger(__name__)

# Hub repos whose normalizer.json may already sit in the local Hugging Face cache.
_HUB_REPOS = ("openai/whisper-tiny", "openai/whisper-tiny.en", "openai/whisper-base", "openai/whisper-base.en",
              "openai/whisper-small", "openai/whisper-medium", "openai/whisper-large-v3")


def _spelling_sources() -> list[Path]:
    """Candidate files for the spelling table, most explicit first. Never touches the network."""
    candidates: list[Path] = []
    if os.environ.get("FASTEM_SPELLING_MAPPING"):
        candidates.append(Path(os.environ["FASTEM_SPELLING_MAPPING"]))
    spec = importlib.util.find_spec("whisper")  # the openai-whisper package ships normalizers/english.json
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location) / "normalizers" / "english.json")
    try:
        from huggingface_hub import try_to_load_from_cache

        for repo in _HUB_REPOS:
            found = try_to_load_from_cache(repo, "normalizer.json")
            if isinstance(found, str):
                candidates.append(Path(found))
    except Exception:  # an old or broken huggingface_hub: just skip the hub cache
        pass
    return candidates


@functools.lru_cache(maxsize=1)
def english_spelling_mapping() -> dict[str, str]:
    """Whisper's British->American spelling table, or ``{}`` when none is available offline.

    Looked up in ``$FASTEM_SPELLING_MAPPING`` (a JSON file), the ``openai-whisper`` package, then
    the local Hugging Face cache of the ``openai/whisper-*`` tokenizers.
    """
    for path in _spelling_sources():
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(mapping, dict):
            return {str(k): str(v) for k, v in mapping.items()}
    logger.info("Whisper's English spelling table was not found offline; normalising without it")
    return {}


@functools.lru_cache(maxsize=1)
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer(english_spelling_mapping())


@functools.lru_cache(maxsize=1)
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def _is_english(language: str | None) -> bool:
    return (language or "").strip().lower().replace("_", "-").split("-")[0] in ("en", "english")


def normalize(text: str, language: str = "en") -> str:
    """Whisper-style normalisation of ``text``: English rules for ``"en"``, basic rules otherwise."""
    normalizer = _english() if _is_english(language) else _basic()
    return " ".join(normalizer(text).split())


def _edits(ref_words: list[str], hyp_words: list[str]) -> tuple[int, int, int]:
    """``(substitutions, deletions, insertions)`` between two normalised word lists."""
    if not ref_words or not hyp_words:
        return 0, len(ref_words), len(hyp_words)
    out = jiwer.process_words(" ".join(ref_words), " ".join(hyp_words))
    return out.substitutions, out.deletions, out.insertions


def word_edits(ref: str, hyp: str, language: str = "en") -> tuple[int, int, int]:
    """``(substitutions, deletions, insertions)`` turning ``ref`` into ``hyp`` after normalisation.

    An empty reference makes every hypothesis word an insertion; an empty hypothesis makes every
    reference word a deletion.
    """
    return _edits(normalize(ref, language).split(), normalize(hyp, language).split())


def word_errors(ref: str, hyp: str, language: str = "en") -> tuple[int, int]:
    """``(substitutions + deletions + insertions, reference word count)`` after normalisation
    (:func:`word_edits`)."""
    ref_words = normalize(ref, language).split()
    return sum(_edits(ref_words, normalize(hyp, language).split())), len(ref_words)


def wer(references: str | Sequence[str], hypotheses: str | Sequence[str], language: str = "en") -> float:
    """Corpus word error rate: total errors over total reference words, after normalisation.

    Accepts one string each or equal-length sequences. If the references hold no words at all,
    the result is ``0.0`` when the hypotheses are empty too and ``inf`` otherwise.
    """
    if isinstance(references, str) != isinstance(hypotheses, str):
        raise TypeError("pass either one reference and one hypothesis string, or two sequences of strings")
    if isinstance(references, str):
        references, hypotheses = [references], [hypotheses]
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    errors = words = 0
    for ref, hyp in zip(references, hypotheses):
        e, n = word_errors(ref, hyp, language)
        errors += e
        words += n
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / words
