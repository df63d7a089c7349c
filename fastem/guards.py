"""Guards: when the adapted transcript is not to be trusted, keep the unadapted one.

Entropy minimization can find shortcuts: a confident repetition loop, an empty transcript, a
"[Music]" hallucination, words appended beyond the audio, or a fluent sentence the audio does not
support.  Each guard is a small function of a :class:`Evidence` record (the unadapted and adapted
transcripts and what the *source* model thinks of each) returning ``None`` when it passes or a short
reason when it fires.  A guard only fires on a fault the adaptation introduced: if the unadapted
transcript already has it, adapting did not cause it.

:func:`check` runs the selected guards in order and returns the first that fires.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["Evidence", "GUARDS", "DEFAULT_GUARDS", "check", "compression_ratio", "longest_repeat", "looping",
           "sequence_logp", "SCORED"]


@dataclass
class Evidence:
    """What the guards look at for one utterance.

    ``source_logp_*``: mean per-token log-probability that the unadapted (source) model gives the
    unadapted / adapted transcript (teacher forced, EOS included), ``None`` when not computed;
    ``adapted_logp_*``: the same under the adapted model; ``verifier_logp_*``: the same under a second
    checkpoint (:mod:`fastem.verifier`), ``None`` without one.
    """

    text_before: str
    text_after: str
    tokens_before: list[int]
    tokens_after: list[int]
    seconds: float
    source_logp_before: float | None = None
    source_logp_after: float | None = None
    adapted_logp_before: float | None = None
    adapted_logp_after: float | None = None
    max_logp_drop: float = 1.5      # nats per token (the ``confidence`` guard)
    max_length_ratio: float = 2.0   # the ``length`` guard, with at least 4 tokens of difference
    consensus_margin: float = 0.0   # the ``consensus`` guard: how much more the adapted model must prefer its own
    verifier_logp_before: float | None = None
    verifier_logp_after: float | None = None
    max_verifier_drop: float = 0.1  # nats per token (the ``verifier`` guard)
    max_seq_logp_drop: float | None = None  # nats per transcript (the ``likelihood`` guard); None: off


def compression_ratio(text: str) -> float:
    """Bytes of ``text`` over bytes of its zlib compression (Whisper flags > 2.4 as a repetition loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def longest_repeat(tokens: list[int], max_n: int = 8) -> int:
    """The largest number of consecutive repeats of any n-gram (n <= ``max_n``) in ``tokens``."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(n):
            run, prev = 1, None
            for i in range(start, len(tokens) - n + 1, n):
                gram = tuple(tokens[i:i + n])
                run = run + 1 if gram == prev else 1
                prev = gram
                best = max(best, run)
    return best


def looping(text: str, tokens: list[int]) -> bool:
    """A repetition loop: zlib compression ratio over 2.4 (Whisper's own test) or an n-gram repeated 4 times."""
    return compression_ratio(text) > 2.4 or longest_repeat(tokens) >= 4


def repetition(ev: Evidence) -> str | None:
    if looping(ev.text_after, ev.tokens_after) and not looping(ev.text_before, ev.tokens_before):
        return (f"repetition loop (compression ratio {compression_ratio(ev.text_after):.2f}, "
                f"{longest_repeat(ev.tokens_after)} repeats)")
    return None


_WORD = re.compile(r"\w", re.UNICODE)
_NON_SPEECH = re.compile(r"^\s*(?:[\[\(][^\]\)]*[\]\)]|[♪♫*\-.…,!?\s])*\s*$")


def empty(ev: Evidence) -> str | None:
    if not ev.text_after.strip() and _WORD.search(ev.text_before):
        return "empty transcript"
    return None


def non_speech(ev: Evidence) -> str | None:
    """Only bracketed or music-note text (``[Music]``, ``(upbeat music)``, ``♪``) where there were words."""
    after_ns = bool(ev.text_after.strip()) and bool(_NON_SPEECH.match(ev.text_after))
    before_ns = bool(_NON_SPEECH.match(ev.text_before))
    if after_ns and not before_ns:
        return f"non-speech annotation {ev.text_after.strip()[:40]!r}"
    return None


def length(ev: Evidence) -> str | None:
    """Far longer (text appended beyond the audio) or far shorter than the unadapted transcript."""
    a, b = len(ev.tokens_after), len(ev.tokens_before)
    if abs(a - b) < 4:
        return None
    if a > ev.max_length_ratio * max(b, 1):
        return f"{a} tokens vs {b} unadapted"
    if b > ev.max_length_ratio * max(a, 1) and not looping(ev.text_before, ev.tokens_before):
        return f"{a} tokens vs {b} unadapted"  # (shorter than a looping unadapted transcript: a repair)
    return None


def _drop(who: str, before: float | None, after: float | None, limit: float, ev: Evidence,
          what: str = "log-prob per token") -> str | None:
    """``who`` finds the adapted transcript more than ``limit`` nats (per token, or of the ``what`` compared)
    less likely than the unadapted one."""
    if before is None or after is None or ev.tokens_after == ev.tokens_before:
        return None
    drop = before - after
    if drop > limit:
        return f"{who} {what} {after:.2f} vs {before:.2f} unadapted (drop {drop:.2f} > {limit:g})"
    return None


def confidence(ev: Evidence) -> str | None:
    """The source model finds the adapted transcript much less likely than its own."""
    return _drop("source model", ev.source_logp_before, ev.source_logp_after, ev.max_logp_drop, ev)


def sequence_logp(mean: float, tokens: list[int]) -> float:
    """A transcript's total log-prob from its mean per-token log-prob (the mean counts end of text too)."""
    return mean * (len(tokens) + 1)


def likelihood(ev: Evidence) -> str | None:
    """The source model finds the adapted transcript, as a whole, more than ``max_seq_logp_drop`` nats less
    likely than its own: the total log-prob of the transcript, not the mean per token.  Both transcripts
    answer the same audio, so the sequence probability is the quantity to compare; a per-token mean lets
    an edit that adds or drops tokens through at a threshold the whole transcript fails.  At 0 an adapted
    transcript is accepted only where the source model agrees it is at least as likely (adaptation as a
    search the source endorses)."""
    if ev.max_seq_logp_drop is None or ev.source_logp_before is None or ev.source_logp_after is None:
        return None
    return _drop("source model", sequence_logp(ev.source_logp_before, ev.tokens_before),
                 sequence_logp(ev.source_logp_after, ev.tokens_after), ev.max_seq_logp_drop, ev,
                 what="log-prob of the transcript")


def consensus(ev: Evidence) -> str | None:
    """The source and the adapted model together prefer the unadapted transcript: the sum of their mean
    per-token log-probs is higher for it (a product of the two models choosing between the two
    transcripts; the adapted model's preference for its own must outweigh the source model's for its own)."""
    values = (ev.source_logp_before, ev.source_logp_after, ev.adapted_logp_before, ev.adapted_logp_after)
    if any(v is None for v in values) or ev.tokens_after == ev.tokens_before:
        return None
    drop = ev.source_logp_before - ev.source_logp_after
    gain = ev.adapted_logp_after - ev.adapted_logp_before
    if gain < drop + ev.consensus_margin:
        return (f"adapted model prefers its transcript by {gain:.2f} nats per token, the source model its own "
                f"by {drop:.2f}")
    return None


def verifier(ev: Evidence) -> str | None:
    """A second checkpoint finds the adapted transcript less likely than the unadapted one, by more than
    ``max_verifier_drop`` nats per token (no verifier, or one that cannot judge the language: passes)."""
    return _drop("verifier", ev.verifier_logp_before, ev.verifier_logp_after, ev.max_verifier_drop, ev)


GUARDS: dict[str, Callable[[Evidence], str | None]] = {
    "empty": empty,
    "non_speech": non_speech,
    "repetition": repetition,
    "length": length,
    "confidence": confidence,
    "consensus": consensus,
    "likelihood": likelihood,
    "verifier": verifier,
}
#: the guards named by default; :class:`fastem.AdaptConfig` adds ``likelihood`` and ``verifier`` through their
#: settings (``max_seq_logp_drop``, ``verifier``: both on by default)
DEFAULT_GUARDS = ("empty", "non_speech", "repetition", "length", "confidence", "consensus")
#: the guards that judge by the source and the adapted model's scores of both transcripts (the loop computes
#: them only when one of these is checked)
SCORED = frozenset({"confidence", "consensus", "likelihood"})


def check(ev: Evidence, names=DEFAULT_GUARDS) -> tuple[str, str] | None:
    """``(guard name, reason)`` of the first guard in ``names`` that fires, or ``None``."""
    for name in names:
        if name not in GUARDS:
            raise ValueError(f"unknown guard {name!r}; known: {sorted(GUARDS)}")
        reason = GUARDS[name](ev)
        if reason is not None:
            return name, reason
    return None
