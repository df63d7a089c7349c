"""``fastem.adapt``: test-time adaptation of a Whisper model on one utterance.

The loop, per step: encode (once), draw ``K`` hypotheses with the KV cache, score them teacher-forced
(per-token entropy and log-prob), take the surrogate loss of the chosen objective, one optimizer
step on the adapted parameters.  Then decode greedily with the adapted model.  In episodic mode
(the default) the model is restored bit-for-bit afterwards; a call that fails always restores it.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .objective import BASELINES, OBJECTIVES, em_loss
from .params import PARAM_SETS, MasterWeights, ModelSnapshot, select_parameters, touches_encoder
from .sampling import Hypotheses, Prompt, build_prompt, decode, encode, score

__all__ = ["AdaptConfig", "AdaptResult", "adapt", "transcribe"]


@dataclass
class AdaptConfig:
    """Settings of one adaptation call.

    steps:          optimizer steps on the utterance (10).
    lr:             AdamW learning rate, 1e-4.  Measured with ``benchmarks/lr_sweep.py`` (bundled
                    LibriSpeech clip + real dish noise, Whisper base, 10 steps, K=4): at -3 dB SNR
                    1e-5 changed nothing (WER 23.5%), 1e-4 fixed a word (17.6%), 1e-3 broke the
                    transcript (41.2%); at 0 dB none of the three changed the 11.8%.  See
                    benchmarks/RESULTS.md for the domain benchmark at this setting.
    num_samples:    K hypotheses drawn per step (4); the leave-one-out baseline needs K >= 2.
    objective:      "em" (exact sequence entropy), "entropy" (token entropy at fixed prefixes) or "pg"
                    (policy gradient with the sequence entropy as cost); see :mod:`fastem.objective`.
    baseline:       "loo" (unbiased leave-one-out), "mean" or "none".
    hypotheses:     "sample" (K samples), "greedy" (the greedy pseudo-label, one row) or "auto":
                    greedy for objective="entropy" (the SUTA-style method), samples otherwise.
    params:         "layernorm" (every LayerNorm, as SUTA), "decoder", "encoder", "all" or a callable.
    episodic:       restore the model after the call (True), or keep adapting across calls (False).
    temperature:    divides the logits when sampling and scoring (1.0 = the model's own distribution).
    max_new_tokens: cap on generated tokens; None = 10 per second of audio + 20, at most what fits.
    seed:           seeds the sampler (a call is reproducible on the same device).
    backend:        token statistics: "auto" (Triton on CUDA, PyTorch elsewhere), "torch", "triton".
    optimizer:      "adam" or "sgd".
    weight_decay:   decoupled weight decay (AdamW) or L2 (SGD).
    """

    steps: int = 10
    lr: float = 1e-4
    num_samples: int = 4
    objective: str = "em"
    baseline: str = "loo"
    hypotheses: str = "auto"
    params: Any = "layernorm"
    episodic: bool = True
    temperature: float = 1.0
    max_new_tokens: int | None = None
    seed: int = 0
    backend: str = "auto"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    task: str = "transcribe"

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {self.num_samples!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.hypotheses not in ("auto", "sample", "greedy"):
            raise ValueError(f"hypotheses must be 'auto', 'sample' or 'greedy', got {self.hypotheses!r}")
        if not callable(self.params) and self.params not in PARAM_SETS:
            raise ValueError(f"params must be one of {PARAM_SETS} or a callable, got {self.params!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")

    @property
    def uses_greedy_hypotheses(self) -> bool:
        return self.hypotheses == "greedy" or (self.hypotheses == "auto" and self.objective == "entropy")


@dataclass
class AdaptResult:
    """What one call returns.

    text / tokens:               greedy transcript after adaptation (token ids without the prompt and EOS).
    text_before / tokens_before: greedy transcript of the unadapted model.
    language:                    the language code used (given or detected), None if unknown.
    history:                     one dict per step: loss, entropy (mean token entropy of the step's
                                 hypotheses, before the update), length (mean tokens per hypothesis), seconds.
    seconds:                     wall time of the whole call.
    sample_tokens / sample_seconds: tokens drawn by the sampling loop and the time spent in it.
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


def _features(model, processor, audio, sampling_rate) -> tuple[torch.Tensor, float]:
    from .audio import SAMPLE_RATE, load_audio

    if isinstance(audio, (str, os.PathLike)):
        wave = load_audio(audio)  # a file carries its own sampling rate
    else:
        wave = load_audio(audio, sampling_rate=sampling_rate)
    feats = processor.feature_extractor(wave.numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
    param = next(model.parameters())
    return feats.to(device=param.device, dtype=param.dtype), wave.numel() / SAMPLE_RATE


def _token_budget(cfg_max: int | None, seconds: float) -> int:
    return cfg_max if cfg_max is not None else int(10 * seconds) + 20


def _text(processor, prompt: Prompt, hyps: Hypotheses) -> tuple[str, list[int]]:
    ids = hyps.row(0, eos_id=prompt.eos_id)
    return processor.tokenizer.decode(ids, skip_special_tokens=True).strip(), ids


def _make_optimizer(cfg: AdaptConfig, params):
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def transcribe(model, audio, *, processor=None, sampling_rate: int | None = 16000, language: str | None = None,
               max_new_tokens: int | None = None) -> str:
    """Greedy transcript of one utterance, no adaptation (the same decoding path ``adapt`` uses)."""
    processor = _resolve_processor(model, processor)
    feats, seconds = _features(model, processor, audio, sampling_rate)
    with torch.no_grad():
        enc = encode(model, feats)
        prompt = build_prompt(model, enc, language)
        hyps = decode(model, enc, prompt, greedy=True, max_new_tokens=_token_budget(max_new_tokens, seconds))
    return _text(processor, prompt, hyps)[0]


def adapt(model, audio, *, processor=None, sampling_rate: int | None = 16000, language: str | None = None,
          config: AdaptConfig | None = None, **overrides) -> AdaptResult:
    """Adapt ``model`` on one utterance by entropy minimization and return its transcripts.

    ``audio``: a 1-D float array/tensor at ``sampling_rate`` (resampled to 16 kHz if needed) or a path.
    ``config`` and keyword ``overrides`` (any :class:`AdaptConfig` field) set the method.  Episodic
    calls leave every parameter, buffer, ``requires_grad`` flag, ``.grad`` and train/eval mode exactly
    as they were; continual calls (``episodic=False``) keep the adapted parameter values.  If the call
    raises, the model is restored in both modes.
    """
    t_start = time.perf_counter()
    cfg = dataclasses.replace(config or AdaptConfig(), **overrides)
    processor = _resolve_processor(model, processor)
    feats, seconds = _features(model, processor, audio, sampling_rate)
    named = select_parameters(model, cfg.params)
    adapted = [p for _, p in named]
    encoder_trains = touches_encoder(named)
    budget = _token_budget(cfg.max_new_tokens, seconds)

    snapshot = ModelSnapshot(model, adapted)
    ok = False
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in adapted:
            p.requires_grad_(True)
            p.grad = None  # the user's own .grad (kept by the snapshot) must not be accumulated into
        with torch.no_grad():
            enc_fixed = encode(model, feats)
            prompt = build_prompt(model, enc_fixed, language, task=cfg.task)
            before = decode(model, enc_fixed, prompt, greedy=True, max_new_tokens=budget)
        text_before, tokens_before = _text(processor, prompt, before)

        masters = MasterWeights(adapted)
        optimizer = _make_optimizer(cfg, masters.masters)
        generator = torch.Generator(device=feats.device).manual_seed(cfg.seed)
        history, sample_tokens, sample_seconds = [], 0, 0.0
        for step in range(cfg.steps):
            t0 = time.perf_counter()
            with torch.enable_grad():
                enc = encode(model, feats) if encoder_trains else enc_fixed
                hyps = decode(model, enc.detach(), prompt, num_samples=cfg.num_samples,
                              greedy=cfg.uses_greedy_hypotheses, temperature=cfg.temperature,
                              max_new_tokens=budget, generator=generator)
                sample_tokens += int(hyps.lengths.sum())
                sample_seconds += hyps.seconds
                entropy, logp, mask = score(model, enc, prompt, hyps, temperature=cfg.temperature,
                                            backend=cfg.backend)
                loss = em_loss(entropy, logp, mask, objective=cfg.objective, baseline=cfg.baseline)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"adaptation loss is not finite at step {step} ({loss.item()})")
                loss.backward()
            masters.pull_grads()
            optimizer.step()
            masters.push_values()
            masters.zero_grad()
            n_tok = mask.sum().clamp_min(1)
            history.append({"step": step, "loss": float(loss.detach()),
                            "entropy": float((entropy.detach() * mask).sum() / n_tok),
                            "length": float(hyps.lengths.float().mean()), "seconds": time.perf_counter() - t0})

        if cfg.steps:
            with torch.no_grad():
                enc_after = encode(model, feats) if encoder_trains else enc_fixed
                after = decode(model, enc_after, prompt, greedy=True, max_new_tokens=budget)
            text, tokens = _text(processor, prompt, after)
        else:
            text, tokens = text_before, tokens_before
        ok = True
    finally:
        snapshot.restore(values=cfg.episodic or not ok)

    return AdaptResult(text=text, text_before=text_before, tokens=tokens, tokens_before=tokens_before,
                       language=prompt.language, history=history, seconds=time.perf_counter() - t_start,
                       sample_tokens=sample_tokens, sample_seconds=sample_seconds)
