"""The judge: every check that decides what a call returns, in one place.

Four kinds of check, each a small function of the evidence it names:

* **The gate** (before adapting): an utterance the source model is already sure of is not adapted
  (:func:`gate`: mean next-token entropy along its greedy transcript below ``min_entropy``), unless
  its greedy transcript needed Whisper's fallback (a loop, or too unlikely: not confidence).  A window
  that Whisper's no-speech rule calls silence is not adapted either (:mod:`fastem.decoding`), nor, with beam
  search and two draws, one whose greedy and beam transcripts agree: the medoid's outcome is then decided
  (:func:`foregone`).
* **The guards** (after adapting): when the adapted transcript is not to be trusted, the unadapted one
  is returned.  Entropy minimization can find shortcuts: a confident repetition loop, an empty
  transcript, a "[Music]" hallucination, words appended beyond the audio, or a fluent sentence the
  audio does not support.  Each guard is a function of an :class:`Evidence` record (the two transcripts
  and what the source model, the adapted model and a second checkpoint think of each) returning
  ``None`` when it passes or a short reason when it fires.  A guard only fires on a fault the
  adaptation introduced: if the unadapted transcript already has it, adapting did not cause it.
* **The verifier** (:mod:`fastem.verifier`), a second checkpoint's vote: loaded only when some
  transcript changed, once per process (``fastem.verifier.clear()`` releases it).
* **The medoid** (:func:`choose`, with ``AdaptConfig.draws`` > 1): each draw's transcript faces the guards, a
  rejected one standing as the unadapted transcript, and the call returns the :func:`medoid` of the unadapted
  transcript and the draws': a change is kept only when the draws agree on it.  With beam search the source
  model's greedy transcript is a candidate too (a vote for the change greedy decoding would make).

``AdaptConfig.guards`` names every guard that runs (``()``: none; ``"auto"``: :data:`DEFAULT_GUARDS` with greedy
decoding, :data:`BEAM_GUARDS` with beam search); the thresholds are the config's judge fields.
:func:`verdicts` evaluates every named guard (each one's verdict is kept in ``AdaptResult.verdicts``); the
first that fires, in ``guards`` order, decides.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .decoding import compression_ratio

__all__ = ["Evidence", "GUARDS", "DEFAULT_GUARDS", "BEAM_GUARDS", "SCORED", "TEXTUAL_GUARDS", "VOTED", "agreement",
           "check", "choose", "compression_ratio", "evidence", "first_fired", "gate", "longest_repeat", "looping",
           "medoid", "sequence_logp", "verdicts"]


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
    verifier_text: str | None = None  # the second checkpoint's own transcript (the ``agreement`` guard)
    language: str | None = None       # how the ``agreement`` guard normalizes words (None: English)


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


def agreement(ev: Evidence) -> str | None:
    """The second checkpoint's own transcript of the audio is further from the adapted transcript than from the
    unadapted one (word edit distance after Whisper's normalizer): of the two, an independent recognizer hears
    the unadapted one (no threshold; ties pass; no verifier transcript, or one without words: passes)."""
    from .text import normalize, word_errors

    if ev.verifier_text is None or ev.tokens_after == ev.tokens_before:
        return None
    lang = ev.language or "en"
    if not normalize(ev.verifier_text, lang).split():
        return None
    near_before = word_errors(ev.verifier_text, ev.text_before, lang)[0]
    near_after = word_errors(ev.verifier_text, ev.text_after, lang)[0]
    if near_after > near_before:
        return (f"the verifier's transcript is {near_after} words from the adapted transcript, {near_before} from the "
                "unadapted")
    return None


def medoid(texts: list[str], language: str | None = None) -> int:
    """Index of the transcript nearest the others: the smallest sum of word edit distances (after Whisper's
    normalizer) to every other one of ``texts``; ties go to the earliest.  With the unadapted transcript first and
    two independent adaptations after it, an adapted one is returned only when the two draws agree on it more
    than either agrees with the unadapted transcript (a change one draw alone makes is outvoted)."""
    from .text import word_errors

    lang, n = language or "en", len(texts)
    apart = {(i, j): word_errors(texts[i], texts[j], lang)[0] for i in range(n) for j in range(i + 1, n)}  # symmetric
    cost = [sum(apart[min(i, j), max(i, j)] for j in range(n) if j != i) for i in range(n)]
    return cost.index(min(cost))


def foregone(before, votes: list, draws: int, language: str | None = None) -> int | None:
    """What :func:`choose` returns whatever ``draws`` adapted transcripts it is given, when that is decided already:
    ``pick`` as :func:`choose` names it (``-v`` for ``votes[-v]``, 0 for ``before``), else ``None``.

    It is decided when the unadapted candidates (``votes`` and ``before``) all say the same words and there are no
    more draws than they are: word edit distance is a metric, so a draw ``X`` costs at least ``m d(X, U)`` for the
    ``m`` unadapted candidates ``U`` plus its distances to the other draws, and by the triangle inequality that is
    no less than what the first candidate costs when ``draws <= m``; ties go to the earliest, the first vote.  (With
    beam search the source model's greedy and beam transcripts agreeing: adapting cannot change what is returned.)
    The text returned is the first vote's; :func:`choose` may name another candidate of the very same text."""
    from .text import normalize

    unadapted = list(votes) + [before]
    if not votes or draws > len(unadapted):
        return None
    lang = language or "en"
    words = normalize(unadapted[0].text, lang).split()
    if any(normalize(u.text, lang).split() != words for u in unadapted[1:]):
        return None
    texts = [u.text for u in unadapted]
    if texts[0] in texts[len(votes):]:  # as choose does: a vote saying what before says is before
        return 0
    return -len(votes)


def choose(before, drafts: list, judged: list[tuple[dict, tuple[str, str] | None]],
           language: str | None = None, votes: list = ()) -> tuple[int, tuple[dict, tuple[str, str] | None]]:
    """What one utterance returns of its adapted ``drafts`` (one per draw, :class:`fastem.decoding.Transcript`) given
    each one's ``(verdicts, fired)``: ``(pick, (verdicts, fired))``, ``pick`` 0 for the unadapted transcript
    ``before``, ``d`` for draw ``d`` and ``-v`` for ``votes[-v]``.  One draw: its transcript unless a guard fired.
    Several: a draw a guard rejected stands as the unadapted transcript, and the :func:`medoid` of ``votes`` (other
    unadapted transcripts that count as candidates, first: with beam search the source model's greedy one), the
    unadapted transcript and the draws is returned; when that is not a draw although a draw changed the transcript,
    ``("medoid", reason)`` is what fired (the verdicts are those of the draw returned, or of the first, with the
    medoid's)."""
    if len(drafts) == 1 and not votes:
        found, fired = judged[0]
        return (0 if fired else 1), (found, fired)
    candidates = list(votes) + [before] + [before if fired else t for t, (_, fired) in zip(drafts, judged)]
    texts = [c.text for c in candidates]
    pick = medoid(texts, language) - len(votes)
    if pick < 0 and texts[pick + len(votes)] in texts[len(votes):]:
        pick = texts.index(texts[pick + len(votes)], len(votes)) - len(votes)  # a vote saying what another says
    found, fired = judged[max(pick - 1, 0)]
    found = dict(found)
    found["medoid"] = None
    if pick > 0:
        return pick, (found, None)
    if pick < 0:
        found["medoid"] = "the medoid is the source model's greedy transcript"
        return pick, (found, ("medoid", found["medoid"]))
    changed = sum(c.ids != before.ids for c in candidates[len(votes) + 1:])
    if changed:
        found["medoid"] = (f"{changed} of {len(drafts)} draws changed the transcript and their medoid is the "
                           "unadapted one")
        return 0, (found, ("medoid", found["medoid"]))
    return 0, (found, fired or next((f for _, f in judged if f), None))


GUARDS: dict[str, Callable[[Evidence], str | None]] = {
    "empty": empty,
    "non_speech": non_speech,
    "repetition": repetition,
    "length": length,
    "confidence": confidence,
    "consensus": consensus,
    "likelihood": likelihood,
    "verifier": verifier,
    "agreement": agreement,
}
#: the guards that run with greedy decoding unless ``guards=`` says otherwise, in the order they are checked:
#: the cheap textual ones first, then those that need the models' scores, then the second checkpoint's vote.
#: Every guard but ``likelihood`` (on DEV it rejected more gains than harms with greedy decoding too; RESULTS.md,
#: "The likelihood guard with greedy decoding"; ask for it by name, or give the CLI a threshold) and
#: ``agreement`` (on DEV no better than the ``verifier`` vote with greedy decoding).
DEFAULT_GUARDS = ("empty", "non_speech", "repetition", "length", "confidence", "consensus", "verifier")
#: the guards that run with beam search (``num_beams > 1``) unless ``guards=`` says otherwise: the second
#: checkpoint's own transcript (``agreement``) instead of its log-prob vote (``verifier``), chosen on DEV for the
#: beam option (RESULTS.md, "The verifier's own transcript as evidence")
BEAM_GUARDS = ("empty", "non_speech", "repetition", "length", "confidence", "consensus", "agreement")
#: the guards that look at the two transcripts alone (no model): what each draw faces before the medoid of
#: ``AdaptConfig(draws=2)``
TEXTUAL_GUARDS = ("empty", "non_speech", "repetition", "length")
#: the guards that need the second checkpoint (:mod:`fastem.verifier`)
VOTED = frozenset({"verifier", "agreement"})
#: the guards that judge by the source and the adapted model's scores of both transcripts (the loop computes
#: them only when one of these is checked)
SCORED = frozenset({"confidence", "consensus", "likelihood"})


def check(ev: Evidence, names=DEFAULT_GUARDS) -> tuple[str, str] | None:
    """``(guard name, reason)`` of the first guard in ``names`` that fires, or ``None``."""
    return first_fired(verdicts(ev, names), names)


def verdicts(ev: Evidence, names=DEFAULT_GUARDS) -> dict[str, str | None]:
    """Every guard in ``names``: its reason when it fires, else ``None``."""
    out = {}
    for name in names:
        if name not in GUARDS:
            raise ValueError(f"unknown guard {name!r}; known: {sorted(GUARDS)}")
        out[name] = GUARDS[name](ev)
    return out


def first_fired(found: dict[str, str | None], names) -> tuple[str, str] | None:
    """``(guard name, reason)`` of the first guard of ``names`` whose verdict in ``found`` is a reason."""
    for name in names:
        if found.get(name) is not None:
            return name, found[name]
    return None


def gate(entropy: float, needed_fallback: bool, min_entropy: float) -> str | None:
    """Why an utterance is not adapted (``"confident"``: its greedy transcript's mean next-token entropy is
    below ``min_entropy``), or ``None``: adapt it.  A greedy transcript that needed Whisper's fallback (a
    loop, or too unlikely) is not confidence, whatever its entropy."""
    if needed_fallback or entropy >= min_entropy:
        return None
    return "confident"


def evidence(cfg, before, after, seconds: float, scores: dict, language: str | None = None) -> Evidence:
    """The :class:`Evidence` of one utterance: its unadapted and adapted transcripts
    (:class:`fastem.decoding.Transcript`), the scores the call gathered (``AdaptResult.scores``) and the
    judge's thresholds of ``cfg`` (:class:`fastem.AdaptConfig`)."""
    return Evidence(text_before=before.text, text_after=after.text, tokens_before=before.ids, tokens_after=after.ids,
                    seconds=seconds, source_logp_before=scores.get("source_before"),
                    source_logp_after=scores.get("source_after"), adapted_logp_before=scores.get("adapted_before"),
                    adapted_logp_after=scores.get("adapted_after"), verifier_logp_before=scores.get("verifier_before"),
                    verifier_logp_after=scores.get("verifier_after"), max_logp_drop=cfg.max_logp_drop,
                    max_length_ratio=cfg.max_length_ratio, max_verifier_drop=cfg.max_verifier_drop,
                    max_seq_logp_drop=cfg.seq_logp_limit, verifier_text=scores.get("verifier_text"),
                    language=language)


@dataclass
class Case:
    """One adapted utterance before the judge: its two transcripts (:class:`fastem.decoding.Transcript`),
    its audio (16 kHz mono, for the verifier), language, length, the call's scores for it (filled in) and its
    token budget (the verifier's own transcript gets the same)."""

    before: object
    after: object
    wave: object
    language: str | None
    seconds: float
    scores: dict
    budget: int | None = None


def judge(cfg, model, cases: list[Case], score_both: Callable) -> list[tuple[dict, tuple[str, str] | None]]:
    """Gather the evidence the guards of ``cfg.active_guards`` need and judge each case: ``(verdicts, fired)``.

    ``score_both(pairs)`` gives, for ``[[ids before, ids after], ...]``, the source and the adapted model's
    mean log-prob per token of each transcript (two lists of pairs); it is called only when a guard of
    :data:`SCORED` runs.  The verifier is loaded only when a transcript changed and a guard of :data:`VOTED` runs."""
    names = cfg.active_guards
    if not names or not cases:
        return [({}, None) for _ in cases]
    if SCORED & set(names):
        source, adapted = score_both([[c.before.ids, c.after.ids] for c in cases])
        for c, (a, z), (a2, z2) in zip(cases, source, adapted):
            c.scores.update(source_before=a, source_after=z, adapted_before=a2, adapted_after=z2)
    changed = [c for c in cases if c.after.ids != c.before.ids]
    if VOTED & set(names) and changed:
        _vote(cfg, model, changed, transcribe="agreement" in names)
    out = []
    for c in cases:
        found = verdicts(evidence(cfg, c.before, c.after, c.seconds, c.scores, c.language), names)
        out.append((found, first_fired(found, names)))
    return out


def _vote(cfg, model, cases: list[Case], transcribe: bool = False) -> None:
    """The second checkpoint's scores of each changed transcript, into each case's scores (``transcribe``: and
    its own transcript of the audio, ``verifier_text``, by Whisper's rules and the call's beams)."""
    from .verifier import load_verifier, resolve_verifier, verifier_scores

    speech = getattr(model.config, "model_type", None) == "whisper"  # a second Whisper checkpoint votes on speech
    name = resolve_verifier(cfg.verifier, model) if speech else None
    if name is None:
        for c in cases:
            c.scores["verifier_abstained"] = "no verifier for this model"
        return
    vmodel, vprocessor = load_verifier(name, next(model.parameters()).device)
    votes = verifier_scores(vmodel, vprocessor, [c.wave for c in cases], [[c.before.text, c.after.text] for c in cases],
                            [c.language for c in cases], task=cfg.task,
                            **(dict(rules=cfg.decode_rules, num_beams=cfg.num_beams, budgets=[c.budget for c in cases])
                               if transcribe else {}))
    for c, vote in zip(cases, votes):
        c.scores["verifier"] = name
        c.scores.update(vote)
