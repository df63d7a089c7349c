"""The front door: every call (``adapt``, ``adapt_batch``, ``transcribe``, a continual :class:`fastem.Adapter`)
enters through :func:`_run_recordings`, which cuts recordings over 30 s into windows, answers digital
silence at once and runs the rest through one pipeline, :func:`_run`, a batch of ``B`` windows at a time.

The pipeline's phases, each a function with one job:

1. **prepare**: features, token budgets, the adapted parameters and the encoder split;
2. **transcribe (source)**: the source model's transcript by Whisper's rules (:mod:`fastem.decoding`), greedy or
   by beam search;
3. **gate**: which utterances adapt (:func:`fastem.judge.gate`);
4. **adapt**: the optimizer steps (:mod:`fastem.loop`), on each of ``cfg.draws`` independent copies per utterance;
5. **transcribe (adapted)**: each copy's transcript, by the same rules;
6. **judge**: the guards' evidence and verdicts (:func:`fastem.judge.judge`) and, with several draws, their
   medoid (:func:`fastem.judge.choose`; with beam search the source model's greedy transcript is decoded and
   votes too);

then the results.  Every call restores the model exactly (a continual :class:`fastem.Adapter` keeps its
learnt values outside the model, or restores the model when it closes); a call that fails always does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from . import judge as _judge
from .config import AdaptConfig, AdaptResult
from .decoding import Transcript, transcripts
from .loop import Encoder, Settling, State, make_optimizer, step
from .params import Binding, ModelSnapshot, cross_kv_fixed, first_adapted_encoder_layer, select_parameters
from .sampling import Head, Prompt, build_prompts, mean_logp
from .whisper import CrossKV, clip_frames, features

__all__ = ["AdaptConfig", "AdaptResult", "adapt", "adapt_batch", "transcribe", "transcribe_batch"]


# ------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------

def _resolve_processor(model, processor):
    if processor is not None:
        return processor
    attached = getattr(model, "fastem_processor", None)
    if attached is not None:
        return attached
    name = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if name:
        from transformers import WhisperProcessor

        try:
            return WhisperProcessor.from_pretrained(name)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise ValueError(f"no processor given and none could be loaded for {name!r} ({err}); pass "
                             "processor=WhisperProcessor.from_pretrained(...)") from err
    raise ValueError("no processor given: pass processor=WhisperProcessor.from_pretrained(...) or load the model "
                     "with fastem.load_whisper")


def _wave(audio, sampling_rate) -> torch.Tensor:
    from .audio import MAX_LONG_SECONDS, load_audio

    if isinstance(audio, (str, os.PathLike)):  # a file carries its own sampling rate
        return load_audio(audio, allow_silence=True, max_seconds=MAX_LONG_SECONDS)
    return load_audio(audio, sampling_rate=sampling_rate, allow_silence=True, max_seconds=MAX_LONG_SECONDS)


def _languages(language, n: int) -> list[str | None]:
    if language is None or isinstance(language, str):
        return [language] * n
    language = list(language)
    if len(language) != n:
        raise ValueError(f"{len(language)} languages for {n} utterances")
    return language


_LOCKS: "weakref.WeakKeyDictionary[torch.nn.Module, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class _Exclusive:
    """One adaptation call at a time per model: a second thread gets a clear error, never a mixed model."""

    def __init__(self, model):
        with _LOCKS_GUARD:
            self.lock = _LOCKS.setdefault(model, threading.Lock())

    def __enter__(self):
        if not self.lock.acquire(blocking=False):
            raise RuntimeError("another thread is adapting or transcribing this model right now; fastem calls on one "
                               "model must not overlap (use one model per thread, or serialize the calls)")
        return self

    def __exit__(self, *exc):
        self.lock.release()


# ------------------------------------------------------------------------------------------------
# the pipeline
# ------------------------------------------------------------------------------------------------

@dataclass
class _Call:
    """One pass of the pipeline over ``B`` windows: its inputs and what the phases hand each other."""

    model: torch.nn.Module
    processor: object
    cfg: AdaptConfig
    state: State | None
    waves: list                    # Whisper: 16 kHz mono waves; a language model: prompt token ids
    languages: list[str | None]
    seconds: list[float]
    budgets: list[int]
    binding: Binding
    snapshot: ModelSnapshot
    source: ModelSnapshot | None   # direct parameter sets: the source values, swapped in where the source speaks
    learnt: bool                   # a continual adapter whose model holds learnt values
    head: Head
    inputs: object = None          # how the context is built: _WhisperInputs or fastem.lm.LMInputs
    encoder: Encoder | None = None
    prompts: list[Prompt] | None = None
    scores: list[dict] | None = None
    sample_seconds: float = 0.0
    slots: list[int] | None = None  # the utterance each adapted copy belongs to (``draws`` copies per active one)
    source_cross: CrossKV | None = None  # every utterance's source cross-attention keys/values (before the gate)
    votes: dict = dataclasses.field(default_factory=dict)     # utterance -> the source's greedy Transcript (a vote)
    foregone: dict = dataclasses.field(default_factory=dict)  # utterance -> the medoid's pick, decided before adapting

    def source_model(self, active: bool = True):
        """Inside the block the model speaks with its source values."""
        return self.source.swapped(active) if self.source is not None else contextlib.nullcontext()


class _WhisperInputs:
    """How Whisper's context is built: log-mel features, the encoder split, Whisper's prompts and decoding rules."""

    def seconds(self, waves) -> list[float]:
        from .audio import SAMPLE_RATE

        return [w.numel() / SAMPLE_RATE for w in waves]

    def budgets(self, cfg: AdaptConfig, seconds: list[float]) -> list[int]:
        return [cfg.max_new_tokens if cfg.max_new_tokens is not None else int(10 * s) + 20 for s in seconds]

    def rules(self, cfg: AdaptConfig):
        return cfg.decode_rules

    def encode(self, call: "_Call") -> None:
        model, names = call.model, [name for name, _ in call.binding.named]
        feats = features(model, call.processor, call.waves)
        embed = any(n.split(".")[-2] in ("conv1", "conv2") for n in names if ".encoder." in f".{n}")
        with torch.no_grad(), call.source_model(call.learnt):
            context, total = call.cfg.encoder_context, feats.shape[-1]
            short = clip_frames(call.seconds, total) if context == "clip" else None
            speech = [clip_frames([s], total) for s in call.seconds] if context == "speech" else None
            call.encoder = Encoder.build(model, feats, first_adapted_encoder_layer(model, names), embed,
                                         cross_kv_fixed(call.binding.named), short, speech)
            call.prompts = build_prompts(model, call.encoder.cross, call.languages, task=call.cfg.task, head=call.head)


WHISPER = _WhisperInputs()


def _prepare(model, processor, waves, languages, cfg: AdaptConfig, state: State | None, inputs) -> _Call:
    """Phase 1a, before the snapshot is taken: token budgets and the adapted parameters (this call's copies,
    or a continual adapter's)."""
    binding = state.binding if state is not None else Binding(model, select_parameters(model, cfg.params), len(waves))
    one_copy = state is not None or binding.direct
    if one_copy and cfg.draws not in ("auto", 1):
        raise ValueError(f"draws={cfg.draws} needs a copy of the adapted parameters per draw: "
                         + ("a continual Adapter keeps one" if state is not None else
                            f"params={cfg.params!r} adapts the model in place") + " (use draws=1)")
    cfg = dataclasses.replace(cfg, draws=1 if one_copy else cfg.draw_count)
    # "auto" beams go with the medoid of several draws on speech; a language model decodes greedily unless asked
    cfg = dataclasses.replace(cfg, num_beams=cfg.beam_count if inputs is WHISPER or cfg.num_beams != "auto" else 1)
    snapshot = ModelSnapshot(model, binding.direct_params)
    source = (state.source if state is not None and state.source is not None else snapshot) if binding.direct else None
    learnt = state is not None and state.source is not None and state.steps_taken > 0
    seconds = inputs.seconds(waves)
    return _Call(model, processor, cfg, state, waves, languages, seconds, inputs.budgets(cfg, seconds), binding,
                 snapshot, source, learnt, Head(model), inputs)


def _encode(call: _Call) -> None:
    """Phase 1b: the context the transcripts are decoded from (Whisper: the source encoder once, split where
    adaptation starts, and the prompts, language given or detected; a language model: its prompts)."""
    call.inputs.encode(call)


def _transcribe_source(call: _Call) -> list[Transcript]:
    """Phase 2: the source model's transcripts (what adaptation is judged against, also for a continual
    adapter that has learnt a lot), by Whisper's rules."""
    with torch.no_grad(), call.source_model(call.learnt):
        before = transcripts(call.model, call.processor, call.encoder.cross, call.prompts, call.budgets,
                             call.inputs.rules(call.cfg), seed=call.cfg.seed, head=call.head, num_beams=call.cfg.num_beams)
    call.scores = []
    for t in before:
        sc = {"entropy_before": t.entropy, "logprob_before": t.avg_logprob}
        if t.no_speech_prob is not None:
            sc["no_speech_prob"] = t.no_speech_prob
        if t.fallback:
            sc["fallback_before"] = t.temperature
        call.scores.append(sc)
    return before


def _gate(call: _Call, before: list[Transcript]) -> list[str | None]:
    """Phase 3: why each utterance that does not adapt does not (None: it adapts); each one that adapts gets
    ``cfg.draws`` copies of the adapted parameters (``call.slots``).  With a greedy vote (beam search, several draws)
    the source model's greedy transcripts are decoded here (``call.votes``), and an utterance whose greedy and beam
    transcripts say the same words is not adapted: the medoid would return them whatever the draws said
    (``"agreed"``, :func:`fastem.judge.foregone`); ``min_entropy=0`` adapts it all the same."""
    skipped: list[str | None] = []
    for t in before:
        if not call.cfg.step_count:
            skipped.append(None)
        elif t.silence:
            skipped.append("no_speech")
        else:
            skipped.append(_judge.gate(t.entropy, t.fallback, call.cfg.gate_entropy))
    active = [b for b in range(len(before)) if call.cfg.step_count and skipped[b] is None]
    call.source_cross = call.encoder.cross
    if call.cfg.greedy_vote and active:
        call.votes = dict(zip(active, _greedy_votes(call, active)))
        if call.cfg.gate_entropy > 0:  # (min_entropy=0 adapts every utterance)
            for b in active:
                pick = _judge.foregone(before[b], [call.votes[b]], call.cfg.draws, call.prompts[b].language)
                if pick is not None:
                    skipped[b], call.foregone[b] = "agreed", pick
            active = [b for b in active if skipped[b] is None]
    call.slots = [b for b in active for _ in range(call.cfg.draws)]
    if call.slots and call.slots != list(range(len(before))):  # some not adapted, or several draws of each
        call.binding = Binding(call.model, call.binding.named, len(call.slots))
        call.encoder = call.encoder.select(call.slots)
    return skipped


def _adapt(call: _Call) -> list[list[dict]]:
    """Phase 4: ``cfg.step_count`` optimizer steps on every adapted copy (``call.slots``; fewer for one whose greedy
    transcript has settled, with ``cfg.stop_when_settled``); each copy's history.  Draw ``d`` of an utterance samples
    from its own generator seeded ``cfg.seed * cfg.draws + d`` (so calls with other seeds share no draw).  Fresh
    hypotheses are drawn every ``cfg.sample_every`` steps, and whenever the copies still stepping have changed since
    the last draw."""
    slots = call.slots
    histories: list[list[dict]] = [[] for _ in slots]
    if not slots:
        return histories
    cfg, state = call.cfg, call.state
    optimizer = state.optimizer if state is not None else make_optimizer(cfg, call.binding.tensors)
    device = call.head.weight.device
    generators = [torch.Generator(device=device).manual_seed(cfg.seed * cfg.draws + j % cfg.draws)
                  for j in range(len(slots))]
    prompts, budgets = [call.prompts[b] for b in slots], [call.budgets[b] for b in slots]
    # the rule can fire only with more steps than the updates it waits for
    watch = Settling(len(slots), cfg.settle_updates) if 0 < cfg.settle_updates < cfg.step_count else None
    frozen = watch.frozen if watch is not None else [False] * len(slots)
    drawn, drawn_for = None, None  # the last hypotheses drawn, and the frozen flags they were drawn under
    for i in range(cfg.step_count):
        flags = tuple(frozen)
        reuse = drawn if i % cfg.sample_every and drawn_for == flags else None
        hyps, entries = step(call.model, cfg, call.binding, optimizer, call.encoder, prompts, budgets, generators,
                             call.head, frozen=frozen, watch=watch, reuse=reuse)
        if hyps is None:  # every utterance has settled
            break
        if reuse is None:
            call.sample_seconds += hyps.seconds
            drawn, drawn_for = hyps, flags
        for j, entry in enumerate(entries):
            if not frozen[j]:
                histories[j].append({"step": i, **entry, **({"draw": j % cfg.draws} if cfg.draws > 1 else {})})
    if state is not None:
        state.steps_taken += max(len(h) for h in histories)
    return histories


def _transcribe_adapted(call: _Call) -> tuple[list[Transcript], CrossKV | None]:
    """Phase 5: each adapted copy's transcript (the same rules, without the no-speech test: the source decided
    that); the adapted cross-attention keys/values, for the judge."""
    if not call.slots:
        return [], None
    rules = dataclasses.replace(call.inputs.rules(call.cfg), no_speech=None)
    with torch.no_grad():
        cross = call.encoder.adapted_cross(call.model, call.binding.over)
        adapted = transcripts(call.model, call.processor, cross, [call.prompts[b] for b in call.slots],
                              [call.budgets[b] for b in call.slots], rules, seed=call.cfg.seed, head=call.head,
                              over=call.binding.over, num_beams=call.cfg.num_beams)
    return adapted, cross


def _greedy_votes(call: _Call, utterances: list[int]) -> list[Transcript]:
    """With beam search and several draws, in the gate: the source model's greedy transcript of ``utterances`` (Whisper's
    rules without the no-speech test: the source's beam transcript decided that), a vote in the medoid."""
    rules = dataclasses.replace(call.inputs.rules(call.cfg), no_speech=None)
    with torch.no_grad(), call.source_model(call.learnt):
        return transcripts(call.model, call.processor, call.source_cross.select(utterances),
                           [call.prompts[b] for b in utterances], [call.budgets[b] for b in utterances], rules,
                           seed=call.cfg.seed, head=call.head)


def _judge_phase(call: _Call, before: list[Transcript], adapted: list[Transcript], cross) -> tuple[list, list, dict]:
    """Phase 6: the judge on every adapted copy, then per utterance its adapted transcript (the draw chosen, with
    several), the transcript it returns and ``{b: (verdicts, fired)}``."""
    after, kept = list(before), list(before)
    for b, pick in call.foregone.items():  # decided at the gate: the greedy vote, or the beam transcript itself
        kept[b] = call.votes[b] if pick < 0 else before[b]
        call.scores[b].update(medoid=pick, greedy=call.votes[b].text)
    if not call.slots:
        return after, kept, {}
    prompts = [call.prompts[b] for b in call.slots]

    def score_both(pairs):
        with torch.no_grad():
            adapted = mean_logp(call.model, cross, prompts, pairs, call.head, over=call.binding.over)
            with call.source_model():
                source = mean_logp(call.model, call.encoder.cross, prompts, pairs, call.head)
        return source, adapted

    draws = call.cfg.draws
    scores = [call.scores[b] if draws == 1 else {} for b in call.slots]
    cases = [_judge.Case(before[b], t, call.waves[b], call.prompts[b].language, call.seconds[b], sc, call.budgets[b])
             for b, t, sc in zip(call.slots, adapted, scores)]
    verdicts = _judge.judge(call.cfg, call.model, cases, score_both)
    judged = {}
    for lo in range(0, len(call.slots), draws):
        b, own = call.slots[lo], range(lo, lo + draws)
        vote = [call.votes[b]] if b in call.votes else []
        pick, judged[b] = _judge.choose(before[b], [adapted[j] for j in own], [verdicts[j] for j in own],
                                        call.prompts[b].language, votes=vote)
        chosen = lo + max(pick - 1, 0)  # the draw returned, or the first where an unadapted transcript is
        after[b] = adapted[chosen]
        kept[b] = vote[pick] if pick < 0 else before[b] if judged[b][1] else after[b]
        if draws > 1:
            call.scores[b].update(scores[chosen], medoid=pick, draws=[t.text for t in adapted[lo:lo + draws]])
            if vote:
                call.scores[b]["greedy"] = vote[0].text
        call.scores[b]["logprob_after"] = after[b].avg_logprob
        if after[b].fallback:
            call.scores[b]["fallback_after"] = after[b].temperature
    return after, kept, judged


def _run(model, processor, waves: list, languages: list[str | None], cfg: AdaptConfig, state: State | None = None,
         inputs=WHISPER) -> list[AdaptResult]:
    """The pipeline on ``B = len(waves)`` windows (or a language model's prompts; see the module docstring)."""
    t_start = time.perf_counter()
    call = _prepare(model, processor, waves, languages, cfg, state, inputs)  # call.cfg: cfg with its draws resolved
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        _encode(call)
        before = _transcribe_source(call)
        skipped = _gate(call, before)
        histories = _adapt(call)
        adapted, cross = _transcribe_adapted(call)
        after, kept, judged = _judge_phase(call, before, adapted, cross)
    finally:
        call.snapshot.restore(values=call.binding.direct and state is None)
    return _results(call, before, after, kept, skipped, histories, judged, time.perf_counter() - t_start)


def _results(call: _Call, before, after, kept, skipped, histories, judged, elapsed: float) -> list[AdaptResult]:
    """Per window: what the judge returns (the adapted transcript, or an unadapted one where a guard or the medoid
    chose it) and the evidence; the history (and sampled tokens) of the draw returned, or of the first."""
    results = []
    for b in range(len(call.waves)):
        found, fired = judged.get(b, ({}, None))
        own = [h for j, h in zip(call.slots, histories) if j == b]
        history = own[max(call.scores[b].get("medoid", 1), 1) - 1] if own else []
        results.append(AdaptResult(
            text=kept[b].text, text_before=before[b].text, tokens=kept[b].ids, tokens_before=before[b].ids,
            language=call.prompts[b].language, history=history, seconds=elapsed,
            sample_tokens=sum(h["tokens"] for h in history if not h.get("reused")), sample_seconds=call.sample_seconds,
            text_adapted=after[b].text, tokens_adapted=after[b].ids, guard=fired[0] if fired else None,
            guard_reason=fired[1] if fired else None, verdicts=found, scores=call.scores[b], skipped=skipped[b]))
    return results


def _prepare_inputs(model, processor, audios, sampling_rate, language, tokenizer=None):
    """``(processor, items, languages, inputs)``: waves for Whisper, prompt token ids for a language model."""
    from .lm import LMInputs, TokenizerProcessor, is_causal_lm, lm_prompt_ids

    if is_causal_lm(model):
        if tokenizer is None:  # passed as the processor (Adapter(model, tokenizer)), or wrapped by an earlier call
            tokenizer = processor.tokenizer if isinstance(processor, TokenizerProcessor) else processor
        if tokenizer is None or not callable(getattr(tokenizer, "decode", None)):
            raise ValueError("a language model needs its tokenizer: fastem.adapt(model, prompt, tokenizer=tokenizer)")
        return TokenizerProcessor(tokenizer), [lm_prompt_ids(tokenizer, p) for p in audios], [None] * len(audios), \
            LMInputs()
    from .checks import require_whisper

    require_whisper(model)
    processor = _resolve_processor(model, processor)
    waves = [_wave(a, sampling_rate) for a in audios]
    return processor, waves, _languages(language, len(waves)), WHISPER


#: Utterances (or windows of a long recording) adapted together when no batch size is given: bounds the
#: memory of a long recording or a large list, whatever its length.
MAX_BATCH = 8


def _join(parts: list[AdaptResult]) -> AdaptResult:
    """One result for a recording transcribed as several windows (each window adapted on its own)."""
    if len(parts) == 1:
        return parts[0]
    fired = [(i, r) for i, r in enumerate(parts) if r.guard is not None]
    joined = AdaptResult(
        text=" ".join(r.text for r in parts if r.text).strip(),
        text_before=" ".join(r.text_before for r in parts if r.text_before).strip(),
        tokens=[t for r in parts for t in r.tokens], tokens_before=[t for r in parts for t in r.tokens_before],
        language=next((r.language for r in parts if r.language), None),
        history=parts[0].history, seconds=max(r.seconds for r in parts),
        sample_tokens=sum(r.sample_tokens for r in parts), sample_seconds=max(r.sample_seconds for r in parts),
        text_adapted=" ".join(r.text_adapted for r in parts if r.text_adapted).strip(),
        tokens_adapted=[t for r in parts for t in r.tokens_adapted],
        guard=fired[0][1].guard if fired else None,
        guard_reason="; ".join(f"window {i}: {r.guard_reason}" for i, r in fired) or None,
        skipped=_joined_skip([r.skipped for r in parts]))
    joined.windows = parts
    return joined


def _joined_skip(reasons: list[str | None]) -> str | None:
    """Why a recording's windows were not adapted: None when one was; else the first reason other than silence (the
    gaps between speech), or "silence" when every window was silent."""
    if any(r is None for r in reasons):
        return None
    return next((r for r in reasons if r != "silence"), "silence")


def _run_recordings(model, processor, waves, languages, cfg: AdaptConfig, batch_size: int | None,
                    run: Callable | None = None, inputs=WHISPER) -> list[AdaptResult]:
    """The front door: digital silence answered at once; recordings over 30 s cut into windows at pauses;
    every window through the pipeline (``run``, default :func:`_run`), ``batch_size`` at a time (one at a
    time for parameter sets that cannot adapt per utterance in a batch); the windows' results joined per
    recording.  A language model's prompts go through as they are."""
    from .audio import is_silent, split_windows

    speech = inputs is WHISPER
    pieces: list[tuple[int, object]] = []  # (recording, window wave or prompt)
    for i, w in enumerate(waves):
        for lo, hi in split_windows(w) if speech else [(None, None)]:
            pieces.append((i, w[lo:hi] if speech else w))
    results: list[AdaptResult | None] = [None] * len(pieces)
    todo = []
    for j, (i, w) in enumerate(pieces):
        if speech and is_silent(w):
            results[j] = AdaptResult(text="", text_before="", tokens=[], tokens_before=[], language=languages[i],
                                     skipped="silence")
        else:
            todo.append(j)
    if run is None:
        run = _run
        per_utterance = Binding.batchable(model, select_parameters(model, cfg.params))
        size = max(1, batch_size or MAX_BATCH) if per_utterance else 1
    else:
        size = 1
    for lo in range(0, len(todo), size):
        idx = todo[lo:lo + size]
        out = run(model, processor, [pieces[j][1] for j in idx], [languages[pieces[j][0]] for j in idx], cfg,
                  inputs=inputs)
        for j, r in zip(idx, out):
            results[j] = r
    return [_join([r for (i, _), r in zip(pieces, results) if i == k]) for k in range(len(waves))]


def _config(config: AdaptConfig | None, overrides: dict) -> AdaptConfig:
    if overrides.get("episodic", True) is not True:
        raise ValueError("fastem.adapt is episodic (the model is restored after every call); to keep adapting across "
                         "calls use fastem.Adapter(model, processor).adapt(audio)")
    return dataclasses.replace(config or AdaptConfig(), **overrides)


def adapt(model, audio, *, processor=None, sampling_rate: int | None = 16000, language: str | None = None,
          config: AdaptConfig | None = None, tokenizer=None, **overrides) -> AdaptResult:
    """Adapt ``model`` on one utterance by entropy minimization and return its transcripts.

    ``audio``: a 1-D float array/tensor at ``sampling_rate`` (resampled to 16 kHz if needed) or a path.
    For a decoder-only language model (:mod:`fastem.lm`), a prompt instead (a string or chat messages)
    with its ``tokenizer``; the result's ``text_before`` / ``text`` are its answers.
    ``config`` and keyword ``overrides`` (any :class:`AdaptConfig` field) set the method.  The call leaves
    every parameter value, ``requires_grad`` flag, ``.grad`` and train/eval mode exactly as they were
    (buffers are never written), also when it raises.  Digital silence returns an empty transcript without
    adapting (``result.skipped == "silence"``).  To keep adapting over a stream, use :class:`fastem.Adapter`.
    """
    cfg = _config(config, overrides)
    with _Exclusive(model):
        processor, items, languages, inputs = _prepare_inputs(model, processor, [audio], sampling_rate, language,
                                                              tokenizer)
        return _run_recordings(model, processor, items, languages, cfg, 1, inputs=inputs)[0]


def adapt_batch(model, audios, *, processor=None, sampling_rate: int | None = 16000, language=None,
                config: AdaptConfig | None = None, batch_size: int | None = None, tokenizer=None,
                **overrides) -> list[AdaptResult]:
    """Adapt on each of several utterances independently, ``batch_size`` at a time in one batched pipeline
    (default: :data:`MAX_BATCH`, 8).

    Each utterance has its own copy of the adapted parameters, its own optimizer state, sampler and
    guards: each result is what :func:`adapt` returns for that utterance alone (up to float rounding
    of batched matrix products).  ``language``: one for all, or one per utterance (None: detect).
    LayerNorm parameter sets batch; other sets run one utterance at a time through the same pipeline.
    """
    cfg = _config(config, overrides)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    audios = list(audios)
    if not audios:
        return []
    with _Exclusive(model):
        processor, items, languages, inputs = _prepare_inputs(model, processor, audios, sampling_rate, language,
                                                              tokenizer)
        return _run_recordings(model, processor, items, languages, cfg, batch_size, inputs=inputs)


def _decode_config(max_new_tokens, rules: dict) -> AdaptConfig:
    """A transcription: no steps, greedy unless ``num_beams`` is given."""
    rules = {**rules, "num_beams": 1 if rules.get("num_beams", "auto") == "auto" else rules["num_beams"]}
    return AdaptConfig(steps=0, max_new_tokens=max_new_tokens, guards=(), **rules)


def transcribe_batch(model, audios, *, processor=None, sampling_rate: int | None = 16000, language=None,
                     max_new_tokens: int | None = None, tokenizer=None, **rules) -> list[str]:
    """Transcripts without adaptation (the decoding path ``adapt`` uses: greedy, or ``num_beams=k`` beam
    search, with Whisper's fallback and no-speech rules, whose thresholds ``compression_ratio_threshold``,
    ``logprob_threshold`` and ``no_speech_threshold`` can be given, None switching one off), all utterances
    in one batch.  A causal language model takes prompts and its ``tokenizer`` instead (greedy answers)."""
    audios = list(audios)
    if not audios:
        return []
    cfg = _decode_config(max_new_tokens, rules)
    with _Exclusive(model):
        processor, items, languages, inputs = _prepare_inputs(model, processor, audios, sampling_rate, language,
                                                              tokenizer)
        with torch.no_grad():
            return [r.text for r in _run_recordings(model, processor, items, languages, cfg, None, inputs=inputs)]


def transcribe(model, audio, *, processor=None, sampling_rate: int | None = 16000, language: str | None = None,
               max_new_tokens: int | None = None, tokenizer=None, **rules) -> str:
    """The transcript of one utterance (or a language model's answer to one prompt), no adaptation (see
    :func:`transcribe_batch`)."""
    return transcribe_batch(model, [audio], processor=processor, sampling_rate=sampling_rate, language=language,
                            max_new_tokens=max_new_tokens, tokenizer=tokenizer, **rules)[0]
