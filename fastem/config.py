"""What a call is asked to do (:class:`AdaptConfig`) and what it returns (:class:`AdaptResult`).

Figures behind the defaults live in ``benchmarks/RESULTS.md``, which says which run chose each one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import judge as _judge
from .decoding import DecodeRules
from .objective import BASELINES, OBJECTIVES, POLICY_OBJECTIVES
from .params import check_param_spec
from .precision import STEP_PRECISIONS

__all__ = ["AdaptConfig", "AdaptResult"]


#: What each "auto" setting of :class:`AdaptConfig` resolves to, chosen on DEV (RESULTS.md): ``steps`` in "Five steps
#: of eight samples, two draws per side"; ``min_entropy`` and ``temperature`` in "The gate, chosen leaving one domain
#: out, with T = 0.7"; ``draws`` in "Two draws and their medoid"; ``num_beams`` (with several draws) in "Beam search
#: with a greedy vote".  One recipe whatever the decoding.  A continual :class:`fastem.Adapter`, a parameter set that
#: adapts the model in place and a language model resolve ``draws`` (the first two) and ``num_beams`` to 1.
AUTO = {"steps": 5, "min_entropy": 1.4, "temperature": 0.7, "draws": 2, "num_beams": 5}
#: The "auto" settings that depend on the decoding: ``(with greedy decoding, with beam search)``.
#: ``max_seq_logp_drop`` in "The likelihood guard with greedy decoding" (named in ``guards`` to run) and "The
#: likelihood guard with beams" (None: it abstains); ``guards`` (with one draw) in "The likelihood guard with greedy
#: decoding" and "The verifier's own transcript as evidence"; with several draws the textual guards alone
#: (:data:`fastem.judge.TEXTUAL_GUARDS`: the medoid judges the rest) whatever the decoding.
AUTO_BY_DECODING = {
    "max_seq_logp_drop": (2.0, None),
    "guards": (_judge.DEFAULT_GUARDS, _judge.BEAM_GUARDS),
}


@dataclass
class AdaptConfig:
    """Settings of one adaptation call; every field is also a keyword of ``fastem.adapt``.

    **What a user sets**

    steps:          optimizer steps on each utterance: "auto" (default) takes 5 (chosen on DEV: RESULTS.md, "Five
                    steps of eight samples, two draws per side"); an integer sets them; 0 transcribes without adapting.
    stop_when_settled: stop an utterance's steps once its adapted model's greedy transcript has stayed the
                    same over the last N updates (checked at each step by one greedy row decoded beside its
                    samples, before the step scores them); the steps left are not run.  False (default) always
                    takes ``steps``; True is N = 2, an integer sets N.  Opt in: N = 3 took a third fewer of ten
                    updates on DEV but was worse on CONFIRM (RESULTS.md "Stopping when the transcript has settled").
    lr:             AdamW learning rate (2e-3).
    num_samples:    K hypotheses drawn per step (8).
    draws:          independent adaptations of each utterance (each from the source model, its own sampler seeded
                    ``seed * draws + d``, in one batch: seed 0 draws as one-draw calls with seeds 0 and 1 do, and calls
                    with other seeds share no draw); with more than one the call returns the **medoid** of the unadapted
                    transcript and the draws' adapted ones (the one nearest the others in words,
                    :func:`fastem.judge.medoid`; ties to the earlier), so a change one draw alone makes is outvoted; with
                    beam search the source model's greedy transcript votes too, first (see ``num_beams``).  "auto"
                    (default): 2 (chosen on DEV: RESULTS.md, "Two draws and their medoid"); 1 in a continual
                    :class:`fastem.Adapter` and for parameter sets that adapt the model in place.  Each draw costs the
                    steps once more.
    params:         the parameters that adapt: "layernorm" (every LayerNorm, the default),
                    "layernorm:decoder", "layernorm:encoder", "layernorm:topN", "decoder", "encoder",
                    "all", or a callable ``(name, parameter) -> bool`` (:mod:`fastem.params`).
    objective:      "em" (the exact sequence entropy, default), "entropy" (token entropy at fixed
                    prefixes), "pg" (policy gradient with the sequence entropy as cost), "suta" (SUTA),
                    "random" (policy gradient with a coin-flip reward: the control that no signal gives);
                    see :mod:`fastem.objective`.
    num_beams:      1 decodes greedily; k > 1 decodes every transcript (the source model's, each draw's adapted
                    one) by beam search with k beams, as ``generate(num_beams=k)`` does, and with several draws the
                    source model's greedy transcript joins the medoid as a vote (the candidates: greedy, unadapted beam,
                    each draw's; ``result.scores["medoid"] == -1`` when the greedy one is returned).  Where the greedy
                    and the beam transcript say the same words the medoid returns them whatever the draws say, so the
                    utterance is not adapted (``result.skipped == "agreed"``, :func:`fastem.judge.foregone`).
                    "auto" (default): 5 with several draws (chosen on DEV: RESULTS.md, "Beam search with a greedy
                    vote"), else 1 (a continual :class:`fastem.Adapter`, an in-place parameter set, a language model).
                    ``transcribe`` decodes greedily unless given ``num_beams``.
    task:           "transcribe" or "translate" (multilingual checkpoints).
    max_new_tokens: cap on generated tokens; None: 10 per second of audio + 20.
    seed:           seeds the sampler: a call is reproducible on the same device.
    episodic:       must be True: every call restores the model; continual adaptation is
                    :class:`fastem.Adapter`.

    **The judge** (:mod:`fastem.judge`): which utterances adapt and which adapted transcripts are kept

    min_entropy:    the gate: an utterance whose unadapted transcript (of the call's decoding) has a mean next-token
                    entropy below this (nats) is not adapted (``result.skipped == "confident"``); 0 adapts all, also those
                    whose greedy and beam transcripts agree (``"agreed"``, see ``num_beams``).  "auto" (default): 1.4
                    (chosen on DEV with the temperature below, leaving one domain out: RESULTS.md, "The gate, chosen
                    leaving one domain out").
    guards:         the names of every guard that runs after adaptation (:data:`fastem.judge.GUARDS`); when
                    one fires the unadapted transcript is returned (with several draws: stands in for that draw's
                    transcript before the medoid); ``()``: none.  "auto" (default): with several draws the textual
                    ones (:data:`fastem.judge.TEXTUAL_GUARDS`: empty, non-speech, repetition, length; the medoid stands
                    in for the rest); with one draw every one but "likelihood" and "agreement" with greedy decoding
                    (:data:`fastem.judge.DEFAULT_GUARDS`), and with beam search the same with "agreement" in place of
                    "verifier" (:data:`fastem.judge.BEAM_GUARDS`; RESULTS.md, "The verifier's own transcript as
                    evidence").
    max_logp_drop:  "confidence": most the source model's mean log-prob per token may fall (1.5 nats).
    max_seq_logp_drop: "likelihood" (not run by default; name it in ``guards``): most the source model's total
                    log-prob of the transcript may fall (nats);
                    "auto" (default): 2.0 with greedy decoding, off with beam search (``num_beams > 1``), where
                    the unadapted transcript is the source model's own search for its most likely one, so any
                    change lowers that likelihood by construction (RESULTS.md, "The likelihood guard with beams").
    max_length_ratio: "length": largest ratio of the two transcripts' token counts, either way (2.0).
    verifier:       "verifier": the second checkpoint that votes ("auto": a bundled one other than the
                    model, see :func:`fastem.verifier.resolve_verifier`; a bundled name, hub id or directory;
                    None: no second checkpoint, and ``guards="auto"`` leaves out the guards that need one).
    max_verifier_drop: "verifier": most the verifier's mean log-prob per token may fall (0.1 nats).
                    ("agreement", the default with beam search in place of "verifier": the verifier also
                    transcribes the audio (by Whisper's rules and the call's beams), and the adapted
                    transcript is rejected when it is further from that transcript, in words, than the
                    unadapted one; RESULTS.md, "The verifier's own transcript as evidence".)

    **Whisper's own decoding rules** (:mod:`fastem.decoding`; None switches one off)

    compression_ratio_threshold: a transcript whose text compresses more than this (2.4) is a loop.
    logprob_threshold: a transcript whose average log-prob per token is below this (-1.0) is unlikely;
                    either decodes again by the temperature fallback.
    no_speech_threshold: a window whose no-speech probability is above this (0.6) and whose transcript is
                    unlikely is silence: empty, not adapted (``result.skipped == "no_speech"``).

    **Research ablations** (the defaults are the method; change them to study it)

    baseline:       "loo" (unbiased leave-one-out, default), "mean" or "none".
    hypotheses:     "sample" (K samples), "greedy" (the greedy pseudo-label) or "auto": greedy for
                    "entropy" and "suta", samples otherwise.
    temperature:    divides the logits when sampling and scoring: the loop minimizes the entropy of the tempered
                    model.  "auto" (default): 0.7 (below 1 the samples stay nearer the mode and the entropy weighs the
                    positions where the model is really unsure; chosen on DEV).  For "suta" its entropy temperature
                    (2.5 in SUTA's paper).
    reduction:      "sum" over tokens (the exact scale) or "mean" per token.
    em_coef:        "suta" only: weight of the entropy term against minimum class confusion (0.5).
    optimizer:      "adam" (AdamW) or "sgd".
    weight_decay:   decoupled weight decay (AdamW) or L2 (SGD), 0.
    backend:        token statistics: "auto" (Triton on CUDA, PyTorch elsewhere), "torch", "triton".
    encoder_context: "full" (default): the adaptation steps run the encoder on the 30-s padded input Whisper
                    was trained on; "clip": on the clips' own length (rounded up to whole seconds, with 1 s
                    of margin), cheaper for short clips; every transcript is decoded from the full input.  In a batch
                    (``adapt_batch``) the longest clip of the batch sets that length for all of them, so a clip's
                    steps see more padding there than alone, and its result may differ from ``adapt``'s.
                    "speech": the steps run the encoder on each clip's own positions only (its length, as
                    "clip" rounds it, even in a batch), which attend over the whole 30-s input: the padding's keys
                    and values in every layer, and its output, are the source model's, computed once
                    (:class:`fastem.whisper.PaddingContext`); the encoder's work of a step shrinks as with "clip",
                    and the clip's positions see the context Whisper was trained on.  Parameter sets whose
                    convolutions adapt run the full context.
    step_precision: "model" (default): the adaptation steps compute in the model's own dtype; "bfloat16": the
                    encoder layers that adapt run under ``torch.autocast`` in bfloat16 during the steps (most of
                    a step's arithmetic); sampling, scoring, the loss, the adapted parameters, every transcript
                    and every guard's score stay in the model's own dtype; "auto": bfloat16 for a float32 model
                    on hardware that computes it natively (a CPU with AVX512-BF16 or AMX, a CUDA device with
                    bfloat16), else "model" (:mod:`fastem.precision`).
    sample_every:   1 (default) draws fresh hypotheses at every step; N > 1 draws them at every N-th step and the
                    steps between score the same hypotheses again under the updated parameters, each sample
                    weighted by how much likelier the model now finds it than when it was drawn (self-normalized
                    importance weights, :mod:`fastem.objective`), so they skip the sampling, the autoregressive
                    part of a step.  Sampled hypotheses only (not ``objective="suta"`` or greedy hypotheses).
    """

    # what a user sets
    steps: int | str = "auto"
    stop_when_settled: bool | int = False
    lr: float = 2e-3
    num_samples: int = 8
    draws: int | str = "auto"
    params: Any = "layernorm"
    objective: str = "em"
    num_beams: int | str = "auto"
    task: str = "transcribe"
    max_new_tokens: int | None = None
    seed: int = 0
    episodic: bool = True
    # the judge
    min_entropy: float | str = "auto"
    guards: tuple | str = "auto"
    max_logp_drop: float = 1.5
    max_seq_logp_drop: float | str = "auto"
    max_length_ratio: float = 2.0
    verifier: str | None = "auto"
    max_verifier_drop: float = 0.1
    # Whisper's decoding rules
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    # research ablations
    baseline: str = "loo"
    hypotheses: str = "auto"
    temperature: float | str = "auto"
    reduction: str = "sum"
    em_coef: float = 0.5
    optimizer: str = "adam"
    weight_decay: float = 0.0
    backend: str = "auto"
    encoder_context: str = "full"
    step_precision: str = "model"
    sample_every: int = 1

    def __post_init__(self):
        if self.episodic is not True:
            raise ValueError("every fastem.adapt call is episodic (the model is restored afterwards); to keep "
                             "adapting across calls use fastem.Adapter(model, processor).adapt(audio)")
        if self.steps != "auto" and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0):
            raise ValueError(f"steps must be 'auto' or an integer >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.num_beams != "auto" and (isinstance(self.num_beams, bool) or not isinstance(self.num_beams, int)
                                         or self.num_beams < 1):
            raise ValueError(f"num_beams must be 'auto' or an integer >= 1 (1: greedy), got {self.num_beams!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if not isinstance(self.stop_when_settled, (bool, int)) or self.stop_when_settled < 0:
            raise ValueError(f"stop_when_settled must be False, True or a number of updates >= 1, got "
                             f"{self.stop_when_settled!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.hypotheses not in ("auto", "sample", "greedy"):
            raise ValueError(f"hypotheses must be 'auto', 'sample' or 'greedy', got {self.hypotheses!r}")
        if self.objective in POLICY_OBJECTIVES and self.hypotheses == "greedy":
            raise ValueError(f"objective={self.objective!r} needs sampled hypotheses: its policy-gradient term "
                             "estimates nothing on the deterministic greedy hypothesis (use hypotheses='sample', "
                             "or objective='entropy')")
        if self.objective == "suta" and self.hypotheses == "sample":
            raise ValueError("objective='suta' adapts on the greedy pseudo-label (hypotheses='greedy' or 'auto')")
        if self.objective in POLICY_OBJECTIVES and self.baseline == "loo" and self.num_samples < 2:
            raise ValueError("baseline='loo' needs num_samples >= 2 (with one sample it is no baseline): raise "
                             "num_samples or pass baseline='none'")
        if self.draws != "auto" and (isinstance(self.draws, bool) or not isinstance(self.draws, int) or self.draws < 1):
            raise ValueError(f"draws must be 'auto' or an integer >= 1, got {self.draws!r}")
        if isinstance(self.sample_every, bool) or not isinstance(self.sample_every, int) or self.sample_every < 1:
            raise ValueError(f"sample_every must be an integer >= 1 (1: fresh hypotheses every step), got "
                             f"{self.sample_every!r}")
        if self.sample_every > 1 and (self.objective == "suta" or self.uses_greedy_hypotheses):
            raise ValueError(f"sample_every={self.sample_every} reuses sampled hypotheses; objective="
                             f"{self.objective!r} with hypotheses={self.hypotheses!r} adapts on the greedy pseudo-label, "
                             "which is decoded afresh each step (use sample_every=1)")
        check_param_spec(self.params)
        if self.temperature != "auto" and (isinstance(self.temperature, (str, bool)) or not self.temperature > 0):
            raise ValueError(f"temperature must be 'auto' or > 0, got {self.temperature!r}")
        if self.reduction not in ("sum", "mean"):
            raise ValueError(f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
        if not self.max_logp_drop >= 0 or not self.max_length_ratio > 1:
            raise ValueError("max_logp_drop must be >= 0 and max_length_ratio > 1, got "
                             f"{self.max_logp_drop!r}, {self.max_length_ratio!r}")
        if self.max_seq_logp_drop != "auto" and (isinstance(self.max_seq_logp_drop, (str, bool))
                                                 or self.max_seq_logp_drop is None or not self.max_seq_logp_drop >= 0):
            raise ValueError(f"max_seq_logp_drop must be 'auto' or >= 0 (nats per transcript), got "
                             f"{self.max_seq_logp_drop!r}; to switch the likelihood guard off, leave 'likelihood' out "
                             "of guards")
        if not self.max_verifier_drop >= 0:
            raise ValueError(f"max_verifier_drop must be >= 0 (nats per token), got {self.max_verifier_drop!r}")
        if self.verifier is not None and not (isinstance(self.verifier, str) and self.verifier.strip()):
            raise ValueError(f"verifier must be a checkpoint name, hub id or directory, got {self.verifier!r}")
        if self.min_entropy != "auto" and (isinstance(self.min_entropy, (str, bool)) or not self.min_entropy >= 0.0):
            raise ValueError(f"min_entropy must be 'auto' or >= 0 (nats per token; 0 adapts every utterance), got "
                             f"{self.min_entropy!r}")
        if not 0.0 <= self.em_coef <= 1.0:
            raise ValueError(f"em_coef must be in [0, 1], got {self.em_coef!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.encoder_context not in ("full", "clip", "speech"):
            raise ValueError(f"encoder_context must be 'full', 'clip' or 'speech', got {self.encoder_context!r}")
        if self.step_precision not in STEP_PRECISIONS:
            raise ValueError(f"step_precision must be one of {STEP_PRECISIONS}, got {self.step_precision!r}")
        if self.task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {self.task!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        for name in ("compression_ratio_threshold", "no_speech_threshold"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None (off) or > 0, got {value!r}")
        if self.logprob_threshold is not None and not self.logprob_threshold <= 0:
            raise ValueError(f"logprob_threshold must be None (off) or <= 0 (nats per token), got {self.logprob_threshold!r}")
        if self.guards != "auto":
            if isinstance(self.guards, str):
                self.guards = (self.guards,)
            self.guards = tuple(self.guards or ())
            unknown = [g for g in self.guards if g not in _judge.GUARDS]
            if unknown:
                raise ValueError(f"unknown guards {unknown}; known: {sorted(_judge.GUARDS)} (or 'auto')")
        for voted in [g for g in self.active_guards if g in _judge.VOTED]:
            if self.verifier is None:
                raise ValueError(f"guards names {voted!r} but verifier=None: name a checkpoint (or 'auto'), or leave "
                                 f"{voted!r} out of guards")

    @property
    def settle_updates(self) -> int:
        """How many updates in a row must leave the greedy transcript unchanged to stop (0: never stop early)."""
        if self.stop_when_settled is True:
            return 2
        return int(self.stop_when_settled)

    @property
    def uses_greedy_hypotheses(self) -> bool:
        return self.hypotheses == "greedy" or (self.hypotheses == "auto" and self.objective in ("entropy", "suta"))

    def _auto(self, field: str):
        """``field``'s value, or where it is "auto" what it resolves to (:data:`AUTO`, :data:`AUTO_BY_DECODING` with
        this call's decoding)."""
        value = getattr(self, field)
        if value != "auto":
            return value
        return AUTO_BY_DECODING[field][self.beam_count > 1] if field in AUTO_BY_DECODING else AUTO[field]

    @property
    def step_count(self) -> int:
        """The optimizer steps on each utterance: ``steps`` resolved (:data:`AUTO`)."""
        return self._auto("steps")

    @property
    def gate_entropy(self) -> float:
        """The gate's threshold this call uses: ``min_entropy`` resolved (:data:`AUTO`)."""
        return float(self._auto("min_entropy"))

    @property
    def sample_temperature(self) -> float:
        """The temperature the steps sample and score at: ``temperature`` resolved (:data:`AUTO`)."""
        return float(self._auto("temperature"))

    @property
    def draw_count(self) -> int:
        """Independent adaptations per utterance: ``draws`` resolved (:data:`AUTO`; the pipeline takes 1 where only
        one adapted copy can exist, a continual adapter or an in-place parameter set)."""
        return self._auto("draws")

    @property
    def beam_count(self) -> int:
        """The beams every transcript is decoded with: ``num_beams`` resolved (:data:`AUTO` with several draws, else
        1: the pipeline resolves "auto" to 1 for a language model)."""
        if self.num_beams != "auto":
            return self.num_beams
        return AUTO["num_beams"] if self.draw_count > 1 else 1

    @property
    def greedy_vote(self) -> bool:
        """Whether the source model's greedy transcript joins the medoid (beam search with several draws)."""
        return self.beam_count > 1 and self.draw_count > 1

    @property
    def active_guards(self) -> tuple:
        """The guards this call runs: ``guards`` resolved (:data:`AUTO_BY_DECODING`; with several draws the textual
        guards alone, each draw's transcript facing them before the medoid)."""
        if self.guards == "auto" and self.draw_count > 1:
            return _judge.TEXTUAL_GUARDS
        if self.guards == "auto" and self.verifier is None:  # "auto" with no verifier: the guards that need none
            return tuple(g for g in self._auto("guards") if g not in _judge.VOTED)
        return self._auto("guards")

    @property
    def seq_logp_limit(self) -> float | None:
        """The likelihood guard's threshold this call uses: ``max_seq_logp_drop`` resolved (:data:`AUTO`; None: the
        guard abstains)."""
        value = self._auto("max_seq_logp_drop")
        return None if value is None else float(value)

    @property
    def decode_rules(self) -> DecodeRules:
        return DecodeRules(self.compression_ratio_threshold, self.logprob_threshold, self.no_speech_threshold)


@dataclass
class AdaptResult:
    """What one call returns (per utterance or recording).

    text / tokens:               the transcript returned: the adapted one, or the unadapted one when a
                                 guard fired (with beam search and several draws, possibly the greedy one the
                                 medoid chose).
    text_before / tokens_before: the source model's transcript (before any adaptation, also in a
                                 continual :class:`fastem.Adapter`), by Whisper's rules (:mod:`fastem.decoding`).
    text_adapted / tokens_adapted: the adapted model's transcript, whether or not a guard fired (with several
                                 draws: the draw returned, or the first; every draw's is in ``scores["draws"]``).
    guard / guard_reason:        the guard that rejected the adapted transcript and why (None: accepted);
                                 "medoid": the draws changed the transcript but did not agree on a change (or,
                                 with beam search, the medoid is the greedy transcript: ``text`` is it).
    verdicts:                    every guard that ran: its reason when it fired, else None.
    scores:                      the evidence: ``entropy_before`` (the gate's), ``logprob_before`` /
                                 ``logprob_after`` (average log-prob of each transcript under the model that
                                 made it), ``no_speech_prob``, ``fallback_before`` / ``fallback_after`` (the
                                 temperature of the sample that replaced a greedy transcript needing
                                 Whisper's fallback, 0 when the greedy one was kept), ``source_before``,
                                 ``source_after``, ``adapted_before``, ``adapted_after`` (the source and the
                                 adapted model's mean log-prob of each transcript), ``verifier`` (the checkpoint
                                 that voted), ``verifier_before``, ``verifier_after`` or ``verifier_abstained``;
                                 with several draws ``draws`` (each draw's adapted transcript) and ``medoid`` (the
                                 candidate returned: 0 the unadapted transcript, d draw d, -1 the greedy vote), with
                                 beam search ``greedy`` (the source model's greedy transcript, the vote).
    language:                    the language code used (given or detected), None if unknown.
    history:                     one dict per step (of the draw returned, or of the first; ``draw``: which): loss,
                                 entropy (mean token entropy of the step's hypotheses, before the update), length,
                                 tokens, seconds, skipped (a non-finite loss or gradient: no update) and reused (the
                                 step scored hypotheses drawn at an earlier step, ``sample_every``; then also ess,
                                 their effective number under the importance weights).
    seconds:                     wall time of the call (shared by the utterances of a batch).
    sample_tokens / sample_seconds: tokens drawn by the sampling loop for the history's draw, and the time spent
                                 in it (every draw).
    skipped:                     why nothing was adapted: "silence" (digital silence), "no_speech"
                                 (Whisper's no-speech rule), "confident" (the gate), "agreed" (with a greedy
                                 vote: the source model's greedy and beam transcripts say the same words, so
                                 no draw could change what the medoid returns; ``text`` is the greedy one),
                                 else None.
    windows:                     for a recording over 30 s, the result of each window (cut at pauses,
                                 each adapted on its own); the fields above join them (``skipped``: None when a
                                 window adapted, else the first window's reason other than silence), but for
                                 ``scores`` and ``verdicts``, which are each window's own, there.
    """

    text: str
    text_before: str
    tokens: list[int]
    tokens_before: list[int]
    language: str | None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    sample_tokens: int = 0
    sample_seconds: float = 0.0
    text_adapted: str = ""
    tokens_adapted: list[int] = field(default_factory=list)
    guard: str | None = None
    guard_reason: str | None = None
    verdicts: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    skipped: str | None = None
    windows: list = field(default_factory=list)
