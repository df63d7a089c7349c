"""Benchmark runner: work items, sharding over ranks, resumable JSONL rows, the methods.

Work list: for each selected domain (registry order), its first ``utts_per_domain`` utterances
(deterministic, see :func:`harness.data.select_utterances`).  Item ``i`` of the list belongs to
rank ``i % world_size``.  Each item loads the clean audio once, applies the domain, and runs every
method that has no row yet:

* a *method* is a named adaptation config (:data:`BUILTIN_METHODS`: ``fastem`` = ``fastem.AdaptConfig``'s
  defaults, ``entropy`` / ``pg`` / ``em`` / ``suta`` = ``objective=<name>``; user methods from
  ``RunConfig.definitions``, e.g. ``{"em_dec": {"objective": "em", "params": "decoder"}}``).  An adapted
  method calls ``fastem.adapt(model, audio, **overrides)`` where ``overrides`` are the shared options
  (``steps``, ``lr``, ..., ``adapt_options``) updated by the method's own definition (the definition
  wins); see :meth:`RunConfig.method_overrides`;
* ``none``: the unadapted transcript, decoded by the run's shared decoding rules (greedy unless the shared
  options set ``num_beams``).  It is ``AdaptResult.text_before`` of the first adapted method run for the
  item whose own decoding rules are the same (:func:`decode_settings`: the same decode of the same
  model), so it is not decoded again (nor when such a method's rows are cached: their ``text_before``);
  a method that decodes otherwise (``num_beams=5``) never stands in for it.  ``fastem.transcribe`` is
  called when no such method has run for the item (or with ``time_none=True``, which also checks that it
  equals ``text_before``).

An adapted row also records ``changed`` (text != text_before) and ``guard`` (``AdaptResult.guard``: the
guard that rejected the adaptation, None when accepted or when the package has no guards), and, when the
library reports them, ``verdicts`` (``AdaptResult.verdicts``: every check's reason, or None when it passed;
evidence only, in no hash).

A run reads one data set (:meth:`RunConfig.data_set`): DEV (``<repo>/../shared/data``, ``$FASTEM_DATA``), or
the held-out CONFIRM set (``<repo>/../shared/confirm``, ``$FASTEM_CONFIRM_DATA``) for the ``confirm_*``
domains and the ``confirm`` profile; ``data_dir`` (``--data``) overrides either.

With ``batch_size > 1`` and an engine that has ``adapt_batch(audios, languages, overrides)``, up to
``batch_size`` consecutive items of this rank's shard are adapted by one call per method; the rows are
the same as with ``batch_size=1`` (one per item and method, written when the call returns).

Rows are appended (one JSON line each, flushed) to ``<out>/shards/rank<r>.jsonl``; a row's key is
``(model, domain, utt_id, method, config_hash)`` where the hash covers everything that can change the
result (the method's name, the domain's transform spec and seed, the method's resolved adaptation
settings: changing a method's definition or a shared option never reuses stale rows).  A rerun first reads
every shard file and skips the keys it finds, so an interrupted run resumes and a finished one does no
new work.  At the end the rows of all ranks are gathered on rank 0 (``torch.distributed`` over gloo,
so no shared filesystem is needed), rescored, sorted by (domain, item, method) and written as
``rows.jsonl`` with ``summary.json``, ``results.md`` and ``wer_domains.png``: the same table whatever
the number of processes.

Under ``torchrun`` (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) the process group is initialized with
gloo on CPU or nccl on CUDA (device ``cuda:LOCAL_RANK``); collectives used here run on a gloo group.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from . import report as _report
from .data import SAMPLE_RATE, Utterance, default_data_dir, load_resources
from .domains import CONFIRM_DOMAINS, DATA_SETS, Domain, get_domain, resolve_domains

__all__ = [
    "BENCH_VERSION",
    "BUILTIN_METHODS",
    "DEV_DOMAINS",
    "DEV_METHODS",
    "CONFIRM_DOMAIN_NAMES",
    "CONFIRM_METHODS",
    "PROFILES",
    "parse_definition",
    "resolved_adapt_config",
    "config_hash",
    "RunConfig",
    "WorkItem",
    "work_items",
    "shard",
    "FastemEngine",
    "StubEngine",
    "make_engine",
    "run",
    "DistInfo",
    "dist_info",
]

BENCH_VERSION = 1
ALL_METHODS = ("none", "entropy", "pg", "em")  # the methods of the smoke / quick / full profiles

# Built-in methods: name -> fastem.adapt overrides of the method (None: no adaptation).  The shared options
# of the run apply to every adapted method unless its definition sets the same key.
BUILTIN_METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,                        # the unadapted greedy transcript
    "fastem": {},                        # what the library does by default (fastem.AdaptConfig's defaults)
    "entropy": {"objective": "entropy"},
    "pg": {"objective": "pg"},
    "em": {"objective": "em"},
    # SUTA as its research code runs it on Whisper: LayerNorms, AdamW 5e-4, 10 steps, entropy temperature
    # 2.5, em_coef 0.5 with minimum class confusion, no guards, no verifier and no confidence gate (every
    # utterance adapts).
    "suta": {"objective": "suta", "params": "layernorm", "lr": 5e-4, "steps": 10, "temperature": 2.5,
             "em_coef": 0.5, "guards": [], "min_entropy": 0.0, "verifier": None},
}
DEV_METHODS = ["none", "fastem", "entropy", "pg", "suta", "em"]
# The dev protocol's domains: clean US English, non-native English, real noise (dishes / bike / tap) at
# 5 and 0 dB, white and pink noise, both rooms, telephone, Czech, Dutch (registry order).
DEV_DOMAINS = ["clean_ljspeech", "nonnative_en", "czech", "dutch", "noise_dishes_5db", "noise_dishes_0db",
               "noise_bike_5db", "noise_tap_0db", "noise_white_5db", "noise_pink_0db", "reverb_clap", "reverb_hall",
               "telephone"]
# The held-out CONFIRM protocol (harness.domains.CONFIRM_DOMAINS, data set "confirm"): its 27 domains, and the
# methods it confirms (the library's default against the unadapted model).  Fixed before its first run.
CONFIRM_DOMAIN_NAMES = list(CONFIRM_DOMAINS)
CONFIRM_METHODS = ["none", "fastem"]

# Profiles: every field can be overridden from the command line.
PROFILES: dict[str, dict[str, Any]] = {
    # CI / end-to-end check: two domains, one short utterance each, one adaptation step.
    "smoke": dict(model="tiny.en", domains=["clean", "noise_white_5db"], utts_per_domain=1,
                  methods=list(ALL_METHODS), steps=1, num_samples=2, max_seconds=4.0),
    # A 2-core CPU in well under 15 minutes: tiny.en, 6 domains x 3 short utterances, 3 steps x 2 samples.
    "quick": dict(model="tiny.en",
                  domains=["clean", "nonnative_en", "noise_dishes_5db", "noise_pink_5db", "reverb_hall", "telephone"],
                  utts_per_domain=3, methods=list(ALL_METHODS), steps=3, num_samples=2, max_seconds=5.0),
    # For a GPU (or torchrun over several): multilingual base, every domain, 30 utterances, 10 steps.
    "full": dict(model="base", domains=["all"], utts_per_domain=30, methods=list(ALL_METHODS), steps=10,
                 num_samples=4, max_seconds=None),
    # The dev protocol that decides between recipes: base, 13 domains x 12 utterances (156), the library's
    # default steps / samples (None = fastem.AdaptConfig's), every built-in method.
    "dev": dict(model="base", domains=list(DEV_DOMAINS), utts_per_domain=12, methods=list(DEV_METHODS), steps=None,
                num_samples=None, max_seconds=None),
    # Screening: the first 3 utterances of each dev domain (a subset of dev's items and rows, same hashes).
    "screen": dict(model="base", domains=list(DEV_DOMAINS), utts_per_domain=3, methods=list(DEV_METHODS),
                   steps=None, num_samples=None, max_seconds=None),
    # CONFIRM (held out; run only after a recipe is chosen on DEV): base, the 27 CONFIRM domains x 8 utterances
    # (216), `none` and the library's default, on the CONFIRM data set (<repo>/../shared/confirm,
    # $FASTEM_CONFIRM_DATA; --data wins).  With an English-only model (--model tiny.en) the runner drops the
    # Czech and Dutch domains, as for dev: 25 domains, 200 utterances.
    "confirm": dict(model="base", domains=list(CONFIRM_DOMAIN_NAMES), utts_per_domain=8, methods=list(CONFIRM_METHODS),
                    steps=None, num_samples=None, max_seconds=None, data="confirm"),
}


def parse_definition(text: str) -> tuple[str, dict[str, Any]]:
    """``"NAME=key=value;key=value"`` -> ``(NAME, {key: value})``; values are JSON when they parse
    (``1e-3``, ``true``, ``null``, ``"x"``), else strings; ``-`` in keys becomes ``_``."""
    if "=" not in text:
        raise ValueError(f"a method definition is NAME=key=value;key=value, got {text!r}")
    name, body = text.split("=", 1)
    name = name.strip()
    _check_method_name(name)
    out: dict[str, Any] = {}
    for part in body.split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"method {name!r}: expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        k = k.strip().replace("-", "_")
        if not k:
            raise ValueError(f"method {name!r}: empty key in {part!r}")
        out[k] = _json_value(v.strip())
    return name, out


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _check_method_name(name: str) -> None:
    if not name or any(c in name for c in ",=; \t/\\"):
        raise ValueError(f"bad method name {name!r} (no spaces, ',', '=', ';' or slashes)")


@dataclass
class RunConfig:
    model: str = "tiny.en"
    domains: list[str] = field(default_factory=lambda: ["clean"])
    utts_per_domain: int = 3
    methods: list[str] = field(default_factory=lambda: list(ALL_METHODS))
    # User-defined methods: name -> fastem.adapt overrides (e.g. {"objective": "em", "lr": 1e-3}).
    definitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Adaptation settings shared by every adapted method (a method's definition wins on the same key);
    # None = fastem.AdaptConfig's default.
    steps: int | None = None
    lr: float | None = None
    num_samples: int | None = None
    params: str | None = None
    temperature: float | None = None
    seed: int | None = None
    max_new_tokens: int | None = None
    adapt_options: dict[str, Any] = field(default_factory=dict)  # any other AdaptConfig field
    # Data.
    data: str | None = None  # the data set, "dev" | "confirm" (DATA_SETS); None: the one the selected domains read
    data_dir: str | None = None  # None: the data set's default directory (harness.data.default_data_dir)
    data_seed: int = 0  # seeds the corruptions (noise offsets); independent of the adaptation seed
    max_seconds: float | None = None  # skip longer utterances (selection stays deterministic)
    # Execution.
    device: str | None = None
    dtype: str | None = None
    engine: str = "fastem"  # "fastem" | "stub" (a deterministic stand-in for tests and dry runs)
    batch_size: int = 1  # items adapted per engine.adapt_batch call (same method); 1 = one adapt call per item
    bootstrap: int = 1000  # paired bootstrap resamples of the report (0: no confidence intervals)
    bootstrap_seed: int = 0
    time_none: bool = False
    fail_fast: bool = False
    progress: bool = True
    figure: bool = True
    profile: str | None = None

    @classmethod
    def from_profile(cls, name: str, **overrides) -> "RunConfig":
        if name not in PROFILES:
            raise KeyError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
        values = dict(PROFILES[name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(profile=name, **values)

    def adapt_overrides(self) -> dict[str, Any]:
        """The shared keyword overrides of ``fastem.adapt`` (every adapted method; no ``objective``)."""
        out = {k: getattr(self, k) for k in ("steps", "lr", "num_samples", "params", "temperature", "seed",
                                             "max_new_tokens") if getattr(self, k) is not None}
        out.update(self.adapt_options)
        out.pop("objective", None)
        return out

    def method_table(self) -> dict[str, dict[str, Any] | None]:
        """Every known method: the built-ins, then the user definitions (which may not reuse a built-in name)."""
        table = dict(BUILTIN_METHODS)
        for name, definition in self.definitions.items():
            _check_method_name(name)
            if name in BUILTIN_METHODS:
                raise ValueError(f"method {name!r} is built in; give the definition another name")
            if not isinstance(definition, dict):
                raise ValueError(f"the definition of method {name!r} must be a dict, got {definition!r}")
            table[name] = {str(k).replace("-", "_"): v for k, v in definition.items()}
        return table

    def method_overrides(self, method: str) -> dict[str, Any] | None:
        """The ``fastem.adapt`` overrides of one method: the shared options updated by the method's
        definition (the definition wins); None for ``none``."""
        table = self.method_table()
        if method not in table:
            raise ValueError(f"unknown method {method!r}; known: {', '.join(table)} (add one with --define)")
        definition = table[method]
        if definition is None:
            return None
        return {**self.adapt_overrides(), **definition}

    def domain_names(self) -> list[str]:
        return resolve_domains(self.domains)

    def data_set(self) -> str:
        """The data set of the run: every selected domain must read the same one (``Domain.data``), and
        ``data`` (a profile's, e.g. ``confirm``), when set, must be that one.  No domains: ``data`` or "dev"."""
        if self.data is not None and self.data not in DATA_SETS:
            raise ValueError(f"unknown data set {self.data!r}; known: {', '.join(DATA_SETS)}")
        by_set: dict[str, list[str]] = {}
        for name in self.domain_names():
            by_set.setdefault(get_domain(name).data, []).append(name)
        if len(by_set) > 1:
            parts = "; ".join(f"{k}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}" for k, v in by_set.items())
            raise ValueError(f"the domains read different data sets ({parts}); a run reads one data set: run them "
                             f"separately")
        if by_set:
            (inferred,) = by_set
            if self.data is not None and self.data != inferred:
                raise ValueError(f"profile {self.profile!r} reads the {self.data!r} data set, but the domains "
                                 f"{', '.join(by_set[inferred][:3])} read {inferred!r}")
            return inferred
        return self.data or "dev"

    def resolved_data_dir(self) -> Path:
        """``data_dir`` (``--data``) if set, else the data set's default (:func:`harness.data.default_data_dir`:
        ``$FASTEM_DATA`` or ``<repo>/../shared/data`` for DEV, ``$FASTEM_CONFIRM_DATA`` or
        ``<repo>/../shared/confirm`` for CONFIRM)."""
        data = self.data_set()  # checks the domains' data sets even when --data is given
        return Path(self.data_dir) if self.data_dir else default_data_dir(data)


# ------------------------------------------------------------------------------------------------
# work items and sharding
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkItem:
    index: int
    domain: str
    utt: Utterance
    position: int  # position of the utterance within its domain's selection

    @property
    def utt_id(self) -> str:
        return self.utt.utt_id


def work_items(domains: Sequence[str], data_dir: str | os.PathLike, utts_per_domain: int | None, *,
               max_seconds: float | None = None) -> list[WorkItem]:
    """The global, deterministic (domain, utterance) list; identical on every rank."""
    items: list[WorkItem] = []
    for name in domains:
        dom = get_domain(name)
        for pos, utt in enumerate(dom.utterances(data_dir, utts_per_domain, max_seconds=max_seconds)):
            items.append(WorkItem(len(items), name, utt, pos))
    return items


def shard(items: Sequence, rank: int, world_size: int) -> list:
    """Item ``i`` goes to rank ``i % world_size``: disjoint, complete, balanced within one item."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad rank {rank} / world size {world_size}")
    return [it for i, it in enumerate(items) if i % world_size == rank]


# ------------------------------------------------------------------------------------------------
# keys and hashing
# ------------------------------------------------------------------------------------------------

def _hash(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha1(blob).hexdigest()[:12]


#: AdaptConfig fields added after rows were first written, with the value that changes nothing.
_NEUTRAL_SETTINGS = {"min_entropy": 0.0, "verifier": None, "max_seq_logp_drop": None, "num_beams": 1,
                     "encoder_context": "full", "sample_every": 1, "draws": 1}
#: thresholds that change nothing while the setting they belong to is off (a verifier's drop without a verifier).
_NEUTRAL_WITHOUT = {"max_verifier_drop": "verifier"}


def resolved_adapt_config(overrides: dict[str, Any]) -> dict[str, Any]:
    """The full adaptation settings a call will use, as a JSON-able dict: ``fastem.AdaptConfig(**overrides)``
    with its defaults filled in when the package accepts the keys; otherwise (no AdaptConfig, an unknown key,
    a value it rejects such as an objective it does not have yet) the overrides as given."""
    try:
        from fastem import AdaptConfig  # type: ignore

        cfg = AdaptConfig(**overrides)
        # every "auto" recorded as what the call uses (fastem.config.AUTO), so a row keeps its key whether its
        # setting was written out or left to "auto"
        d = {**dataclasses.asdict(cfg), "max_seq_logp_drop": cfg.seq_logp_limit, "steps": cfg.step_count,
             "guards": cfg.active_guards, "min_entropy": cfg.gate_entropy, "temperature": cfg.sample_temperature,
             "draws": cfg.draw_count, "num_beams": cfg.beam_count}
    except Exception:  # noqa: BLE001 - ImportError, TypeError (unknown key), ValueError (unknown value)
        d = dict(overrides)
    d.pop("backend", None)  # the kernel backend does not change the result beyond float rounding
    for key, neutral in _NEUTRAL_SETTINGS.items():  # settings added later, at their no-op value: old rows stay valid
        if key in d and d[key] == neutral:
            del d[key]
    for key, switch in _NEUTRAL_WITHOUT.items():
        if switch not in d:
            d.pop(key, None)
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in d.items()}


def config_hash(method: str, domain: Domain, data_seed: int, adapt_cfg: dict | None,
                max_new_tokens: int | None = None, decode: dict | None = None) -> str:
    """``decode``: for ``none``, the decoding rules of its transcript (Whisper's fallback and no-speech
    thresholds, :func:`decode_settings`); rows written before the library had them carry none."""
    spec = {"bench": BENCH_VERSION, "method": method, "domain_spec": domain.spec, "data_seed": data_seed}
    if method == "none":
        spec["max_new_tokens"] = max_new_tokens
        if decode is not None:
            spec["decode"] = decode
    else:
        spec["adapt"] = adapt_cfg
    return _hash(spec)


#: the library's decoding rules (AdaptConfig fields): part of the unadapted transcript's key
DECODE_FIELDS = ("compression_ratio_threshold", "logprob_threshold", "no_speech_threshold")


def decode_settings(overrides: dict[str, Any], adapted: bool = True) -> dict | None:
    """The decoding rules the unadapted transcripts of a run use (None: a library without them): an adapted
    method's (its beams resolved as the call resolves them), or with ``adapted=False`` a plain transcription's
    (``fastem.transcribe``: greedy unless ``num_beams`` is given)."""
    resolved = resolved_adapt_config(overrides)
    if not all(k in resolved for k in DECODE_FIELDS):
        return None
    out = {k: resolved[k] for k in DECODE_FIELDS}
    beams = resolved.get("num_beams", 1) if adapted else overrides.get("num_beams", 1)
    if beams not in (1, "auto"):  # beam search (greedy is left out: rows made before beams existed stay valid)
        out["num_beams"] = beams
    return out


def row_key(row: dict) -> tuple:
    return (row["model"], row["domain"], row["utt_id"], row["method"], row["config_hash"])


# ------------------------------------------------------------------------------------------------
# engines: what computes a transcript
# ------------------------------------------------------------------------------------------------

@dataclass
class AdaptOutput:
    text: str
    text_before: str
    seconds: float
    sample_tokens: int | None = None
    sample_seconds: float | None = None
    language: str | None = None
    history: list[dict] = field(default_factory=list)
    guard: str | None = None  # the guard that rejected the adaptation (AdaptResult.guard), None if accepted
    batch_items: int = 1  # items in the engine call that produced this output
    text_adapted: str | None = None  # the adapted transcript whether or not a guard fired (AdaptResult.text_adapted)
    guard_reason: str | None = None
    scores: dict = field(default_factory=dict)  # AdaptResult.scores: what the guards looked at
    tokens_before: list[int] | None = None  # token ids of text_before / text_adapted, so that the guards
    tokens_adapted: list[int] | None = None  # can be re-decided offline exactly (benchmarks/guard_sweep.py)
    # AdaptResult.verdicts: every check's verdict, {check name: reason it fired, or None when it passed};
    # None when the library does not report them (rows then have no "verdicts" key)
    verdicts: dict[str, str | None] | None = None
    skipped: str | None = None  # AdaptResult.skipped: why the utterance was not adapted ("confident", "agreed", ...)


def _output(res, wall: float, batch_items: int = 1) -> AdaptOutput:
    """An ``AdaptOutput`` from a ``fastem.AdaptResult`` (optional fields read with defaults)."""
    guard = getattr(res, "guard", None)
    return AdaptOutput(text=res.text, text_before=res.text_before,
                       # AdaptResult.seconds is the whole call's: a batch's utterances share it
                       seconds=float(getattr(res, "seconds", None) or wall * batch_items) / max(1, batch_items),
                       sample_tokens=getattr(res, "sample_tokens", None),
                       sample_seconds=getattr(res, "sample_seconds", None),
                       language=getattr(res, "language", None), history=list(getattr(res, "history", []) or []),
                       guard=None if guard is None else str(guard), batch_items=batch_items,
                       text_adapted=getattr(res, "text_adapted", None), guard_reason=getattr(res, "guard_reason", None),
                       scores=dict(getattr(res, "scores", None) or {}),
                       tokens_before=_ids(getattr(res, "tokens_before", None)),
                       tokens_adapted=_ids(getattr(res, "tokens_adapted", None)),
                       verdicts=_verdicts(getattr(res, "verdicts", None)), skipped=getattr(res, "skipped", None))


def _verdicts(verdicts) -> dict[str, str | None] | None:
    """``AdaptResult.verdicts`` as JSON: ``{check name (str): reason (str) or None}``; None if absent."""
    if verdicts is None:
        return None
    return {str(k): (None if v is None else str(v)) for k, v in dict(verdicts).items()}


def _ids(tokens) -> list[int] | None:
    return None if tokens is None else [int(t) for t in tokens]


def _torch_dtype(name: str | None):
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


class FastemEngine:
    """The real thing: ``fastem.models.load_whisper`` + ``fastem.transcribe`` / ``fastem.adapt``."""

    def __init__(self, model_name: str, *, device: str | None = None, dtype: str | None = None):
        from fastem.models import load_whisper  # type: ignore

        self.model_name = model_name
        self.model, self.processor = load_whisper(model_name, device=device, dtype=_torch_dtype(dtype))
        multi = getattr(getattr(self.model, "generation_config", None), "is_multilingual", None)
        self.english_only = (not multi) if multi is not None else model_name.endswith(".en")

    def _language(self, language: str) -> str | None:
        return None if self.english_only else language

    def transcribe(self, audio: torch.Tensor, language: str, *, max_new_tokens: int | None = None,
                   rules: dict | None = None) -> tuple[str, float]:
        """``rules``: decoding settings (:func:`decode_settings`), the library's defaults when None."""
        import fastem  # type: ignore

        kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
        kwargs.update(rules or {})
        t0 = time.perf_counter()
        text = fastem.transcribe(self.model, audio, processor=self.processor, sampling_rate=SAMPLE_RATE,
                                 language=self._language(language), **kwargs)
        return text, time.perf_counter() - t0

    def adapt(self, audio: torch.Tensor, language: str, overrides: dict) -> AdaptOutput:
        """``fastem.adapt(model, audio, **overrides)``; ``overrides`` carry the method's objective (if any)."""
        import fastem  # type: ignore

        t0 = time.perf_counter()
        res = fastem.adapt(self.model, audio, processor=self.processor, sampling_rate=SAMPLE_RATE,
                           language=self._language(language), **overrides)
        return _output(res, time.perf_counter() - t0)

    def adapt_batch(self, audios: Sequence[torch.Tensor], languages: Sequence[str], overrides: dict) -> list[AdaptOutput]:
        """``fastem.adapt_batch`` when the package has it (one call for the batch; an output's ``seconds`` is
        the result's own, else the call's wall time over the batch size), else one ``adapt`` per item."""
        import fastem  # type: ignore

        if not hasattr(fastem, "adapt_batch"):
            return [self.adapt(a, lang, overrides) for a, lang in zip(audios, languages)]
        t0 = time.perf_counter()
        results = fastem.adapt_batch(self.model, list(audios), processor=self.processor, sampling_rate=SAMPLE_RATE,
                                     language=[self._language(lang) for lang in languages], **overrides)
        wall = (time.perf_counter() - t0) / max(1, len(audios))
        results = list(results)
        if len(results) != len(audios):
            raise RuntimeError(f"fastem.adapt_batch returned {len(results)} results for {len(audios)} inputs")
        return [_output(r, wall, len(audios)) for r in results]


_STUB_WORDS = ("the of and to a in that is was he for it with as his on be at by had not are but from or have "
               "an they which one you were her all she there would their we him been has when who will more no "
               "if out so said what up its about into than them can only other new some time could these two "
               "may then do first any my now such like our over man me even most made after also did many "
               "before must through back years where much your way well down should because each just those "
               "people how too little state good very make world still own see men work long get here between "
               "both life being under never day same another know while last might us great old year off come "
               "since against go came right used take three").split()


def _stub_salt(settings: dict | None) -> str:
    """The stub's stand-in for decoding rules: beam search (``num_beams`` > 1) gives another transcript."""
    beams = int((settings or {}).get("num_beams", 1) or 1)
    return f"beams={beams}" if beams > 1 else ""


class StubEngine:
    """A deterministic stand-in for a model (tests, dry runs of the pipeline): the transcript is a
    pseudo-random word sequence keyed by the audio's bytes, about 2.5 words per second; an "adapted"
    transcript changes one word chosen by (the method's overrides, audio).  Not a recognizer."""

    english_only = False

    def __init__(self, model_name: str = "stub", **_):
        self.model_name = model_name

    @staticmethod
    def _words(audio: torch.Tensor, salt: str = "") -> list[str]:
        a = audio.detach().to("cpu", torch.float32).contiguous().numpy()
        h = zlib.crc32(a.tobytes())
        n = max(1, int(round(a.size / SAMPLE_RATE * 2.5)))
        tag = f"{h}|{salt}" if salt else str(h)  # a salt: another decoding of the same audio
        return [_STUB_WORDS[zlib.crc32(f"{tag}|{i}".encode()) % len(_STUB_WORDS)] for i in range(n)]

    def transcribe(self, audio: torch.Tensor, language: str, *, max_new_tokens: int | None = None,
                   rules: dict | None = None) -> tuple[str, float]:
        t0 = time.perf_counter()
        text = " ".join(self._words(audio, _stub_salt(rules)))
        return text, time.perf_counter() - t0

    def adapt(self, audio: torch.Tensor, language: str, overrides: dict) -> AdaptOutput:
        t0 = time.perf_counter()
        words = self._words(audio, _stub_salt(overrides))
        before = " ".join(words)
        a = audio.detach().to("cpu", torch.float32).contiguous().numpy()
        key = json.dumps({k: v for k, v in overrides.items() if k != "backend"}, sort_keys=True, default=str)
        k = zlib.crc32(key.encode() + a.tobytes())
        after = list(words)
        op = k % 3
        if op == 0 and len(after) > 1:
            del after[k % len(after)]
        elif op == 1:
            after[k % len(after)] = _STUB_WORDS[k % len(_STUB_WORDS)]
        steps = int(overrides.get("steps", 1) or 1)
        samples = int(overrides.get("num_samples", 1) or 1)
        return AdaptOutput(text=" ".join(after), text_before=before, seconds=time.perf_counter() - t0,
                           sample_tokens=steps * samples * (len(words) + 1), sample_seconds=1e-3 * steps * samples,
                           language=language, history=[{"loss": 0.0, "entropy": 0.0, "length": len(words)}] * steps)

    def adapt_batch(self, audios: Sequence[torch.Tensor], languages: Sequence[str], overrides: dict) -> list[AdaptOutput]:
        """One :meth:`adapt` per item (the batched code path of the runner, without a batched model)."""
        outs = [self.adapt(a, lang, overrides) for a, lang in zip(audios, languages)]
        for o in outs:
            o.batch_items = len(outs)
        return outs


def make_engine(cfg: RunConfig, device: str | None):
    if cfg.engine == "stub":  # rows keyed "stub:<model>" never mix with a real model's rows
        return StubEngine(cfg.model if cfg.model.startswith("stub") else f"stub:{cfg.model}")
    if cfg.engine == "fastem":
        return FastemEngine(cfg.model, device=device, dtype=cfg.dtype)
    raise ValueError(f"unknown engine {cfg.engine!r} (fastem | stub)")


# ------------------------------------------------------------------------------------------------
# distributed
# ------------------------------------------------------------------------------------------------

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False
    group: Any = None  # a gloo group for object collectives / barriers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info(device: str | None = None) -> DistInfo:
    """Read torchrun's env (RANK, WORLD_SIZE, LOCAL_RANK) and init the process group if needed."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    info = DistInfo(rank=rank, world_size=world, local_rank=local)
    if world <= 1:
        return info
    import torch.distributed as dist

    timeout = datetime.timedelta(hours=48)  # ranks can finish their shards far apart in time
    use_cuda = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timeout)
        info.initialized_here = True
    info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    info.group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
    return info


def _resolve_device(cfg: RunConfig, info: DistInfo) -> str:
    dev = cfg.device
    if dev is None or dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and info.distributed:
        dev = f"cuda:{info.local_rank}"
    return dev


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------

def _append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:  # a crash may have left a partial last line: start a fresh one
            f.seek(f.tell() - 1)
            if f.read(1) != "\n":
                f.write("\n")
        f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        f.flush()


def _history_summary(history: list[dict]) -> dict:
    out: dict[str, Any] = {"steps_done": len(history)}
    for key in ("loss", "entropy", "length"):
        vals = [h.get(key) for h in history if isinstance(h.get(key), (int, float))]
        if vals:
            out[f"{key}_first"] = float(vals[0])
            out[f"{key}_last"] = float(vals[-1])
    if history and "greedy" in history[0]:  # stop_when_settled: the greedy transcript each step started from
        out["greedy_steps"] = [h["greedy"] for h in history]
    return out


def _log(msg: str, info: DistInfo | None = None) -> None:
    prefix = f"[rank {info.rank}] " if info is not None and info.distributed else ""
    print(f"{prefix}{msg}", file=sys.stderr, flush=True)


def _sort_rows(rows: Iterable[dict], items: Sequence[WorkItem], methods: Sequence[str]) -> list[dict]:
    pos = {(it.domain, it.utt_id): it.index for it in items}
    mpos = {m: i for i, m in enumerate(methods)}
    return sorted(rows, key=lambda r: (pos.get((r["domain"], r["utt_id"]), 1 << 30), mpos.get(r["method"], 99),
                                       r["method"]))


@dataclass
class _Unit:
    """One work item being run: its audio, pending methods and the unadapted transcript once known."""
    item: WorkItem
    pending: list[str]
    dom: Domain
    audio: torch.Tensor
    base: dict
    before: str | None = None


def _check_data_dir(domain_names: Sequence[str], data_set: str, data_dir: Path) -> None:
    """Fail early when ``data_dir`` lacks a noise / rir a domain reads, or is the other data set's default
    directory (CONFIRM's natural domains would otherwise read DEV's corpora of the same name, or vice versa)."""
    for other in DATA_SETS:
        if other != data_set and data_dir.resolve() == default_data_dir(other).resolve():
            raise ValueError(f"the domains read the {data_set!r} data set, but the data dir {data_dir} is the "
                             f"{other!r} set's (pass the {data_set!r} set's directory with --data)")
    for name in domain_names:
        for kind, rid in get_domain(name).resources:
            if not (data_dir / kind / "manifest.tsv").is_file() or rid not in load_resources(data_dir, kind):
                raise FileNotFoundError(f"domain {name!r} reads {kind} {rid!r}, which {data_dir / kind / 'manifest.tsv'} "
                                        f"does not list: is {data_dir} the {data_set!r} data set?")


def run(cfg: RunConfig, out_dir: str | os.PathLike, *, engine=None) -> dict | None:
    """Run (or resume) the benchmark; returns the summary on rank 0 (None on other ranks).

    ``engine``: an object with ``transcribe``/``adapt``/``model_name``/``english_only`` and optionally
    ``adapt_batch`` (default: built from ``cfg.engine``); tests pass small stand-ins.
    """
    t_run = time.perf_counter()
    out = Path(out_dir)
    methods = list(dict.fromkeys(cfg.methods))
    table = cfg.method_table()
    bad = [m for m in methods if m not in table]
    if bad:
        raise ValueError(f"unknown methods {bad}; known: {', '.join(table)} (add one with --define NAME=key=value;...)")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {cfg.batch_size!r}")
    data_set = cfg.data_set()
    data_dir = cfg.resolved_data_dir()
    if not (data_dir / "speech").is_dir():
        env = "FASTEM_CONFIRM_DATA" if data_set == "confirm" else "FASTEM_DATA"
        raise FileNotFoundError(f"no {data_set} data at {data_dir} (expected speech/<corpus>/manifest.tsv): pass "
                                f"--data DIR or set {env}")
    domain_names = cfg.domain_names()
    _check_data_dir(domain_names, data_set, data_dir)
    adapted = [m for m in methods if m != "none"]
    overrides = {m: cfg.method_overrides(m) for m in adapted}
    adapt_cfgs = {m: resolved_adapt_config(overrides[m]) for m in adapted}

    info = dist_info(cfg.device)
    try:
        device = _resolve_device(cfg, info)
        if engine is None:
            engine = make_engine(cfg, device)
        model_name = getattr(engine, "model_name", cfg.model)
        batch_size = cfg.batch_size if hasattr(engine, "adapt_batch") else 1

        skipped = []
        if getattr(engine, "english_only", False):
            skipped = [d for d in domain_names if get_domain(d).language != "en"]
            if skipped and info.is_main:
                _log(f"model {model_name} is English-only: skipping non-English domains {skipped}")
            domain_names = [d for d in domain_names if d not in skipped]

        items = work_items(domain_names, data_dir, cfg.utts_per_domain, max_seconds=cfg.max_seconds)
        mine = shard(items, info.rank, info.world_size)

        decode = decode_settings(cfg.adapt_overrides(), adapted=False)
        # a method's unadapted transcript stands in for `none` only when it is decoded by the same rules
        stands_in = {m: decode_settings(overrides[m]) == decode for m in adapted}
        hashes = {(d, m): config_hash(m, get_domain(d), cfg.data_seed, adapt_cfgs.get(m), cfg.max_new_tokens, decode)
                  for d in domain_names for m in methods}

        shard_dir = out / "shards"
        existing = {}
        for row in _report.read_jsonl(sorted(shard_dir.glob("rank*.jsonl"))):
            try:
                existing.setdefault(row_key(row), row)
            except KeyError:
                continue
        _barrier(info)  # everyone has read the shards before anyone appends to them
        my_file = shard_dir / f"rank{info.rank}.jsonl"

        todo: list[tuple[WorkItem, list[str]]] = []
        for it in mine:
            pending = [m for m in methods if (model_name, it.domain, it.utt_id, m, hashes[(it.domain, m)]) not in existing]
            if pending:
                todo.append((it, pending))
        # The unadapted transcript of an item whose adapted rows are cached but whose `none` row is not (an
        # interrupted run): any current adapted row's text_before, so `none` needs no decode of its own.
        cached_before = {}
        for (mdl, dom_name, utt_id, m, h), row in existing.items():
            if (mdl == model_name and m != "none" and hashes.get((dom_name, m)) == h and stands_in.get(m)
                    and row.get("text_before") is not None):
                cached_before.setdefault((dom_name, utt_id), row["text_before"])
        n_units = sum(len(p) for _, p in todo)
        n_cached = sum(len(methods) for _ in mine) - n_units
        if info.is_main:
            _log(f"{len(items)} items ({len(domain_names)} domains) x {len(methods)} methods on {info.world_size} "
                 f"process(es); this rank: {len(mine)} items, {n_cached} rows cached, {n_units} to run; "
                 f"model {model_name} on {device}" + (f"; batches of {batch_size} items" if batch_size > 1 else ""))

        new_rows: list[dict] = []
        errors: list[dict] = []
        pbar = None
        if cfg.progress and info.is_main and n_units:
            from tqdm.auto import tqdm

            pbar = tqdm(total=n_units, desc=f"wer_domains[{info.rank}]", unit="run", dynamic_ncols=True,
                        file=sys.stderr)

        def record_error(u: _Unit, method: str, err: BaseException, tb: str) -> None:
            errors.append({**u.base, "method": method, "error": repr(err), "traceback": tb})
            _log(f"ERROR {u.item.domain} {u.item.utt_id} {method}: {err!r}", info)

        def record_adapted(u: _Unit, m: str, res: AdaptOutput) -> None:
            if stands_in[m]:
                if u.before is None:
                    u.before = res.text_before
                elif res.text_before != u.before:
                    why = ("expected: Whisper's fallback sampled it with each method's seed"
                           if (res.scores or {}).get("fallback_before") else "not from the fallback: check the decoding")
                    _log(f"warning: text_before differs between methods for {u.item.domain} {u.item.utt_id} ({why})", info)
            e, n = _report.score(u.item.utt.text, res.text, u.dom.language)
            eb, _ = _report.score(u.item.utt.text, res.text_before, u.dom.language)
            row = {**u.base, "method": m, "config_hash": hashes[(u.item.domain, m)], "hyp": res.text,
                   "text_before": res.text_before, "errors": e, "ref_words": n, "errors_before": eb,
                   "changed": res.text != res.text_before, "guard": res.guard, "guard_reason": res.guard_reason,
                   "hyp_adapted": res.text_adapted, "scores": res.scores,
                   "tokens_before": res.tokens_before, "tokens_adapted": res.tokens_adapted,
                   "errors_adapted": (_report.score(u.item.utt.text, res.text_adapted, u.dom.language)[0]
                                      if res.text_adapted is not None else None),
                   "seconds": res.seconds, "rtf": res.seconds / max(u.base["audio_seconds"], 1e-9),
                   "sample_tokens": res.sample_tokens, "sample_seconds": res.sample_seconds,
                   "tokens_per_s": (res.sample_tokens / res.sample_seconds
                                    if res.sample_tokens is not None and res.sample_seconds else None),
                   "batch_items": res.batch_items, "adapt": adapt_cfgs[m], **_history_summary(res.history)}
            if res.verdicts is not None:  # every check's verdict (evidence only: in no hash or key)
                row["verdicts"] = res.verdicts
            if res.skipped is not None:
                row["skipped"] = res.skipped
            _append_row(my_file, row)
            new_rows.append(row)

        for c0 in range(0, len(todo), batch_size):
            units = []
            for it, pending in todo[c0:c0 + batch_size]:
                dom = get_domain(it.domain)
                audio = dom.load(it.utt, seed=cfg.data_seed, data_dir=data_dir)
                base = {
                    "model": model_name, "domain": it.domain, "domain_kind": dom.kind, "utt_id": it.utt_id,
                    "corpus": it.utt.corpus, "speaker": it.utt.speaker, "language": dom.language, "ref": it.utt.text,
                    "audio_seconds": audio.numel() / SAMPLE_RATE, "bench_version": BENCH_VERSION,
                }
                units.append(_Unit(it, pending, dom, audio, base, cached_before.get((it.domain, it.utt_id))))
            for m in adapted:
                group = [u for u in units if m in u.pending]
                if not group:
                    continue
                if pbar is not None:
                    where = f"{group[0].item.domain} {group[0].item.utt.id}" + (f" +{len(group) - 1}" if len(group) > 1 else "")
                    pbar.set_postfix_str(f"{where} {m}", refresh=False)
                results: list[AdaptOutput] | None = None
                if len(group) > 1:
                    try:
                        results = list(engine.adapt_batch([u.audio for u in group], [u.dom.language for u in group],
                                                          dict(overrides[m])))
                        if len(results) != len(group):
                            raise RuntimeError(f"adapt_batch returned {len(results)} outputs for {len(group)} inputs")
                    except Exception as err:  # noqa: BLE001 - retried item by item below
                        if cfg.fail_fast:
                            raise
                        _log(f"warning: adapt_batch failed for {m} ({err!r}); adapting the {len(group)} items one "
                             f"at a time", info)
                        results = None
                for j, u in enumerate(group):
                    if results is not None:
                        res = results[j]
                    else:
                        try:
                            res = engine.adapt(u.audio, u.dom.language, dict(overrides[m]))
                        except Exception as err:  # noqa: BLE001 - recorded, retried on the next run
                            if cfg.fail_fast:
                                raise
                            record_error(u, m, err, traceback.format_exc())
                            if pbar is not None:
                                pbar.update(1)
                            continue
                    record_adapted(u, m, res)
                    if pbar is not None:
                        pbar.update(1)
            for u in units:
                if "none" not in u.pending:
                    continue
                try:
                    if u.before is not None and not cfg.time_none:
                        hyp, secs, source = u.before, None, "adapt.text_before"
                    else:
                        hyp, secs = engine.transcribe(u.audio, u.dom.language, max_new_tokens=cfg.max_new_tokens,
                                                      rules=decode)
                        source = "transcribe"
                        if u.before is not None and hyp != u.before:
                            _log(f"warning: transcribe != text_before for {u.item.domain} {u.item.utt_id}", info)
                except Exception as err:  # noqa: BLE001
                    if cfg.fail_fast:
                        raise
                    record_error(u, "none", err, traceback.format_exc())
                else:
                    e, n = _report.score(u.item.utt.text, hyp, u.dom.language)
                    row = {**u.base, "method": "none", "config_hash": hashes[(u.item.domain, "none")], "hyp": hyp,
                           "errors": e, "ref_words": n, "seconds": secs,
                           "rtf": None if secs is None else secs / max(u.base["audio_seconds"], 1e-9),
                           "sample_tokens": None, "sample_seconds": None, "tokens_per_s": None, "source": source}
                    _append_row(my_file, row)
                    new_rows.append(row)
                if pbar is not None:
                    pbar.update(1)
        if pbar is not None:
            pbar.close()
        if errors:
            for err in errors:
                _append_row(out / "errors" / f"rank{info.rank}.jsonl", err)

        # Rows of this rank's items: cached + new.
        wanted = {(model_name, it.domain, it.utt_id, m, hashes[(it.domain, m)]) for it in mine for m in methods}
        my_rows = {k: r for k, r in existing.items() if k in wanted}
        for r in new_rows:
            my_rows[row_key(r)] = r
        gathered = _gather(list(my_rows.values()), info)
        n_errors = sum(_gather([len(errors)], info) or [0]) if info.distributed else len(errors)
        if not info.is_main:
            return None

        rows = _report.rescore_rows(_sort_rows(gathered, items, methods))
        missing = len(items) * len(methods) - len(rows)
        (out).mkdir(parents=True, exist_ok=True)
        with open(out / "rows.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
        meta = {
            "model": model_name, "profile": cfg.profile, "data": data_set, "engine": cfg.engine, "device": device,
            "world_size": info.world_size, "domains": domain_names, "skipped_domains": skipped,
            "utts_per_domain": cfg.utts_per_domain, "methods": methods,
            "steps": cfg.steps, "lr": cfg.lr, "num_samples": cfg.num_samples, "params": cfg.params,
            "temperature": cfg.temperature, "seed": cfg.seed, "data_seed": cfg.data_seed,
            "max_seconds": cfg.max_seconds, "max_new_tokens": cfg.max_new_tokens,
            "adapt_options": cfg.adapt_options, "definitions": cfg.definitions,
            "method_overrides": overrides, "method_configs": adapt_cfgs, "batch_size": batch_size,
            "items": len(items), "rows": len(rows), "missing_rows": missing, "errors": n_errors,
            "data_dir": str(data_dir), "bench_version": BENCH_VERSION,
            "run_seconds": round(time.perf_counter() - t_run, 1),
        }
        summary = _report.write_report(rows, out, domains=domain_names, methods=methods, meta=meta, figure=cfg.figure,
                                       n_boot=cfg.bootstrap, boot_seed=cfg.bootstrap_seed)
        return summary
    finally:
        if info.initialized_here:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.distributed:
        import torch.distributed as dist

        dist.barrier(group=info.group)


def _gather(obj: list, info: DistInfo) -> list:
    """Concatenate every rank's list on rank 0 (rank order); other ranks get []."""
    if not info.distributed:
        return list(obj)
    import torch.distributed as dist

    parts: list | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, parts, dst=0, group=info.group)
    if not info.is_main:
        return []
    return [x for part in parts for x in (part or [])]
