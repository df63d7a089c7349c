"""Transcripts the way Whisper's own decoders make them: greedy, with the temperature fallback and the
no-speech check that users of openai-whisper and faster-whisper know.

A greedy transcript *needs a fallback* when it is too repetitive (zlib compression ratio of its text
above ``compression_ratio``, 2.4) or too unlikely (average log-prob per token, end of text included,
below ``logprob``, -1.0).  It is then decoded again by sampling ``BEST_OF`` candidates at each of
:data:`TEMPERATURES` in turn; at each temperature the candidate with the highest average log-prob
(under the model's own distribution) is taken, and the first that passes both tests replaces the
greedy transcript.  When none passes, the most likely candidate that is not repetitive is kept (the
greedy one included), as faster-whisper does.  A window whose no-speech probability (of Whisper's
no-speech token right after the start token) is above ``no_speech`` *and* whose greedy transcript is
unlikely (below ``logprob``) is silence: no fallback, and its transcript is empty.

A legitimate repetition ("yes yes yes yes", counting) compresses little at its length and is said
with confidence, so it is left alone; a real loop ("la la la ..." to the token budget) is caught by its
compression ratio.  Each threshold can be switched off (``None``): with all three off, a transcript is
plain greedy decoding.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from .sampling import Head, Hypotheses, Prompt, decode

__all__ = ["DecodeRules", "Transcript", "TEMPERATURES", "BEST_OF", "compression_ratio", "transcripts"]

#: the temperatures of the fallback, in order (openai-whisper's)
TEMPERATURES = (0.2, 0.4, 0.6, 0.8, 1.0)
#: candidates sampled per utterance at each fallback temperature (openai-whisper's ``best_of``)
BEST_OF = 5


def compression_ratio(text: str) -> float:
    """Bytes of ``text`` over bytes of its zlib compression (Whisper flags > 2.4 as a repetition loop)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


@dataclass(frozen=True)
class DecodeRules:
    """Whisper's thresholds (None switches a test off); see the module docstring."""

    compression_ratio: float | None = 2.4
    logprob: float | None = -1.0
    no_speech: float | None = 0.6

    def needs_fallback(self, t: "Transcript") -> bool:
        return ((self.compression_ratio is not None and t.compression_ratio > self.compression_ratio)
                or (self.logprob is not None and t.avg_logprob < self.logprob))

    def is_silence(self, t: "Transcript") -> bool:
        """openai-whisper's rule: the no-speech probability above its threshold, unless the transcript is likelier
        than the log-prob threshold (with that test off, the no-speech probability alone)."""
        return (self.no_speech is not None and t.no_speech_prob is not None and t.no_speech_prob > self.no_speech
                and (self.logprob is None or t.avg_logprob <= self.logprob))

    def repetitive(self, t: "Transcript") -> bool:
        return self.compression_ratio is not None and t.compression_ratio > self.compression_ratio


@dataclass
class Transcript:
    """One utterance's transcript and what Whisper's rules look at.

    ``ids``: token ids without the end of text; ``avg_logprob``: mean log-prob per token (end of text
    included) under the model's own distribution; ``entropy``: mean next-token entropy along the greedy
    transcript (the gate's evidence; the greedy decode's, also when a fallback replaced it);
    ``temperature``: 0 for the greedy transcript, else the fallback temperature of the sample kept;
    ``fallback``: whether the greedy transcript needed one; ``silence``: judged silence (text empty).
    """

    text: str
    ids: list[int]
    avg_logprob: float
    entropy: float | None = None
    no_speech_prob: float | None = None
    temperature: float = 0.0
    fallback: bool = False
    silence: bool = False

    @property
    def compression_ratio(self) -> float:
        return compression_ratio(self.text)


def _row_transcript(processor, prompt: Prompt, hyps: Hypotheses, row: int) -> tuple[str, list[int], float]:
    ids = hyps.row(row, eos_id=prompt.eos_id)
    n = max(int(hyps.lengths[row]), 1)
    avg = float(hyps.logp[row, :n].sum()) / n
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, avg


def no_speech_token(model) -> int | None:
    """Whisper's no-speech token (the one before no-timestamps, as transformers and openai-whisper take it)."""
    no_ts = getattr(model.generation_config, "no_timestamps_token_id", None)
    return None if no_ts is None else int(no_ts) - 1


@torch.no_grad()
def transcripts(model, processor, cross, prompts: list[Prompt], budgets: list[int], rules: DecodeRules, *,
                seed: int = 0, head: Head | None = None, over=None, num_beams: int = 1) -> list[Transcript]:
    """Each utterance's transcript by Whisper's rules (see the module docstring).

    ``cross``: the utterances' cross-attention keys/values; ``over``: per-utterance adapted LayerNorms
    (the adapted model's transcripts); ``num_beams > 1``: the first transcript is decoded by beam search
    (:func:`fastem.beam.beam_search`) instead of greedily, as openai-whisper's ``beam_size`` does; the
    fallback still samples.  The fallback samples only the utterances that need it, each from a generator
    seeded by ``seed``, so a transcript does not depend on the batch it is in.
    """
    head = head or Head(model)
    ns_id = no_speech_token(model) if rules.no_speech is not None else None
    if num_beams > 1:
        from .beam import beam_search

        greedy = beam_search(model, cross, prompts, num_beams=num_beams, max_new_tokens=budgets, over=over, head=head,
                             no_speech_id=ns_id)
    else:
        greedy = decode(model, cross, prompts, greedy=True, max_new_tokens=budgets, over=over, head=head,
                        no_speech_id=ns_id)
    entropies = greedy.mean_entropy()
    out = []
    for b, p in enumerate(prompts):
        text, ids, avg = _row_transcript(processor, p, greedy, greedy.rows_of(b).start)
        out.append(Transcript(text, ids, avg, entropy=entropies[b],
                              no_speech_prob=greedy.no_speech[b] if greedy.no_speech is not None else None))
    todo = []
    for b, t in enumerate(out):
        if rules.is_silence(t):
            out[b] = Transcript("", [], t.avg_logprob, t.entropy, t.no_speech_prob, silence=True)
        elif rules.needs_fallback(t):
            t.fallback = True
            todo.append(b)
    candidates: dict[int, list[Transcript]] = {b: [out[b]] for b in todo}
    device = cross.device
    for temperature in TEMPERATURES:
        if not todo:
            break
        hyps = decode(model, cross.select(todo), [prompts[b] for b in todo], num_samples=BEST_OF, temperature=temperature,
                      max_new_tokens=[budgets[b] for b in todo], over=over, over_rows=todo, head=head, model_logp=True,
                      generators=[torch.Generator(device=device).manual_seed(seed) for _ in todo])
        still = []
        for i, b in enumerate(todo):
            rows = hyps.rows_of(i)
            drawn = [_row_transcript(processor, prompts[b], hyps, r) for r in range(rows.start, rows.stop)]
            text, ids, avg = max(drawn, key=lambda d: d[2])
            best = Transcript(text, ids, avg, entropy=out[b].entropy, no_speech_prob=out[b].no_speech_prob,
                              temperature=temperature, fallback=True)
            if rules.needs_fallback(best):
                candidates[b].append(best)
                still.append(b)
            else:
                out[b] = best
        todo = still
    for b in todo:  # no temperature passed: the most likely candidate that does not loop (greedy if all loop)
        calm = [c for c in candidates[b] if not rules.repetitive(c)] or candidates[b][:1]
        out[b] = max(calm, key=lambda c: c.avg_logprob)
    return out

