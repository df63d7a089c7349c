#!/usr/bin/env python
"""What adapting costs, as ratios measured in one run on one machine.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/adapt_speed.py --model base --out benchmarks/results/adapt_speed_cpu.json

Rows (each timed on the real path, ``fastem.adapt`` itself, medians over ``--repeats``):

* ``transcribe``: a plain greedy transcription of the clip (the unit of "recognizing").
* ``adapt``: the default ``fastem.adapt`` (``AdaptConfig()``), and its ratio to ``transcribe``
  (the cost of adapting in units of recognizing) and its real-time factor; whether the ``min_entropy``
  gate skipped the clip, and ``adapt_forced``: the same config with the gate off (a clip it adapts).
* ``step``: one adaptation step of ``adapt`` (its ``history`` seconds; one draw) with all LayerNorms and
  K = 4 (``step_*``) and with the default's K and temperature (``step8_*``), against a straightforward step
  built on ``generate``: K samples from ``generate(do_sample=True, num_return_sequences=K)``, a
  teacher-forced forward with full logits (encoder included), backward.
* ``define``: each ``--define NAME=key=value;key=value`` config (the syntax of ``wer_domains.py``), forced
  past the gate, in units of the plain transcription: a candidate default's cost beside today's.
* ``beam``: ``transcribe(num_beams=k)`` and ``adapt(num_beams=k)`` forced past the gate, in units of a
  greedy transcription (``--beams``, default 5).
* ``sampling``: fastem's K = 4 sampling loop against ``generate(do_sample=True, num_return_sequences=4)``.
* ``batch``: ``adapt_batch`` on B real clips against B separate ``adapt`` calls (same config, forced past the
  gate; the default and each ``--define``d config): time per utterance (medians of ``--repeats`` rounds, each
  timing the separate calls then the batch), and whether the transcripts are the same.

Peak resident memory (``ru_maxrss``) is reported after each row (it only grows).  Writes the rows as
JSON to ``--out`` and prints a markdown table.  ``--sections adapt,beam`` runs only those rows (the plain
transcription is always timed: it is the unit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))
sys.path.insert(0, str(_REPO / "benchmarks"))

import torch  # noqa: E402

import fastem  # noqa: E402
from fastem import sampling, whisper  # noqa: E402
from harness.naive import full_logits_backward, median_seconds  # noqa: E402
from harness.runner import parse_definition  # noqa: E402


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _clips(data_dir: Path, n: int) -> list[torch.Tensor]:
    """The first ``n`` LibriSpeech / LJSpeech DEV clips of 3-10 s (real speech)."""
    from harness.data import load_manifest, read_audio

    clips = []
    for corpus in ("librispeech", "ljspeech"):
        for utt in load_manifest(data_dir, corpus):
            if 3.0 <= utt.duration_s <= 10.0:
                clips.append(read_audio(utt.path))
            if len(clips) == n:
                return clips
    return clips


def _lang(model) -> dict:
    return {"language": "en"} if getattr(model.generation_config, "is_multilingual", False) else {}


def straightforward_step(model, feats, prompt_ids, eos, k, budget, params, temperature=1.0):
    """One step the obvious way: generate K samples, teacher-force them with full logits, backward."""
    with torch.no_grad():
        out = model.generate(feats, do_sample=True, num_return_sequences=k, max_new_tokens=budget,
                             temperature=temperature, **_lang(model))
    n = len(prompt_ids)
    gen = out[:, n:] if out.shape[1] >= n and out[0, :n].tolist() == prompt_ids else out
    ids = torch.cat([torch.tensor([prompt_ids]).expand(k, -1), gen], 1)
    for p in params:
        p.requires_grad_(True)
    logits = model(input_features=feats.expand(k, -1, -1), decoder_input_ids=ids[:, :-1]).logits[:, n - 1:]
    full_logits_backward(logits, ids[:, n:], eos, params)


def _adapt_rows(rows, model, audio, cfg, kw, seconds, repeats) -> None:
    """The default ``adapt``, forced past the gate, and with the steps' encoder on the clip's length."""
    results = []
    rows["adapt_s"] = median_seconds(lambda: results.append(fastem.adapt(model, audio, config=cfg, **kw)), repeats)
    rows["adapt_over_transcribe"] = rows["adapt_s"] / rows["transcribe_s"]
    rows["adapt_rtf"] = rows["adapt_s"] / seconds
    rows["adapt_skipped"] = str(results[-1].skipped)  # "confident": the min_entropy gate kept the transcript
    rows["entropy_before"] = results[-1].scores.get("entropy_before")
    # The same config forced to adapt (min_entropy=0): what a clip the gate lets through costs.
    _forced_rows(rows, "adapt_forced", model, audio, cfg, kw, repeats)
    # The same, with the encoder of the steps on the clip's own length (encoder_context="clip", opt in).
    _forced_rows(rows, "adapt_forced_clip", model, audio, cfg, kw, repeats, encoder_context="clip")
    rows["rss_after_adapt_MiB"] = _rss_mib()


def _forced_rows(rows, key, model, audio, cfg, kw, repeats, **overrides) -> None:
    """``<key>_s``: ``adapt`` with ``overrides``, forced past the gate (``min_entropy=0``, whatever they say);
    ``<key>_over_transcribe``: that in units of the plain transcription."""
    over = {**overrides, "min_entropy": 0.0}
    rows[f"{key}_s"] = median_seconds(lambda: fastem.adapt(model, audio, config=cfg, **over, **kw), repeats)
    rows[f"{key}_over_transcribe"] = rows[f"{key}_s"] / rows["transcribe_s"]


def _defined_rows(rows, model, audio, cfg, kw, definitions, repeats) -> None:
    """Each ``--define``'d config forced past the gate, beside the default's ``adapt_forced`` row."""
    for name, overrides in definitions.items():
        _forced_rows(rows, f"adapt_forced_{name}", model, audio, cfg, kw, repeats, **overrides)


def _source_context(model, processor, audio, seconds):
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    with torch.no_grad():
        enc = whisper.encode(model, feats)
        cross = whisper.cross_kv(model, enc)
        prompts = sampling.build_prompts(model, cross, ["en"])
    return feats, cross, prompts, int(10 * seconds) + 20


def _beam_rows(rows, model, audio, cfg, kw, k, repeats) -> None:
    """``transcribe(num_beams=k)`` and ``adapt(num_beams=k)`` forced past the gate, over a greedy transcription."""
    rows[f"transcribe_beam{k}_s"] = median_seconds(lambda: fastem.transcribe(model, audio, num_beams=k, **kw), repeats)
    rows[f"transcribe_beam{k}_over_transcribe"] = rows[f"transcribe_beam{k}_s"] / rows["transcribe_s"]
    _forced_rows(rows, f"adapt_forced_beam{k}", model, audio, cfg, kw, repeats, num_beams=k)


def _step_rows(rows, model, audio, kw, context, repeats) -> None:
    """One step, all LayerNorms, one draw: fastem's real path vs the straightforward one, with K = 4 (the
    ``step_*`` rows, as first measured) and with the default's K = 8 at its temperature (``step8_*``)."""
    feats, _, prompts, budget = context
    params = [p for _, p in fastem.params.select_parameters(model, "layernorm")]

    def fastem_step(**over) -> float:  # the median of a call's steps after the first
        res = fastem.adapt(model, audio, steps=4, params="layernorm", guards=(), min_entropy=0.0, draws=1, **over, **kw)
        return statistics.median(h["seconds"] for h in res.history[1:])

    def straightforward(k: int, temperature: float = 1.0) -> float:
        torch.manual_seed(0)
        return median_seconds(lambda: straightforward_step(model, feats, prompts[0].ids, prompts[0].eos_id, k, budget,
                                                           params, temperature=temperature), repeats)

    rows["step_fastem_s"] = fastem_step(num_samples=4)
    rows["step_fastem_clip_s"] = fastem_step(num_samples=4, encoder_context="clip")
    rows["step_straightforward_s"] = straightforward(4)
    rows["step_speedup"] = rows["step_straightforward_s"] / rows["step_fastem_s"]
    default = fastem.AdaptConfig()
    rows["step8_fastem_s"] = fastem_step(num_samples=default.num_samples)
    rows["step8_straightforward_s"] = straightforward(default.num_samples, default.sample_temperature)
    rows["step8_speedup"] = rows["step8_straightforward_s"] / rows["step8_fastem_s"]
    rows["rss_after_step_MiB"] = _rss_mib()


def _sampling_rows(rows, model, context, repeats) -> None:
    """Sampling K = 4: fastem's loop vs generate."""
    feats, cross, prompts, budget = context
    with torch.no_grad():
        gen = [torch.Generator().manual_seed(0)]
        rows["sampling_fastem_s"] = median_seconds(
            lambda: sampling.decode(model, cross, prompts, num_samples=4, max_new_tokens=budget, generators=gen), repeats)
        rows["sampling_generate_s"] = median_seconds(
            lambda: model.generate(feats, do_sample=True, num_return_sequences=4, max_new_tokens=budget,
                                   **_lang(model)), repeats)
    rows["sampling_speedup"] = rows["sampling_generate_s"] / rows["sampling_fastem_s"]


def _batch_rows(rows, model, kw, args, definitions: dict) -> None:
    """adapt_batch vs separate adapt calls on real clips, forced past the gate: the default, and each ``--define``d
    config (``batch{B}_{name}``); ``args.repeats`` rounds, each timing the separate calls then the batch, medians."""
    configs = {"": {}, **{f"_{name}": over for name, over in definitions.items()}}
    for b in [int(x) for x in args.batch_sizes.split(",") if x]:
        clips = _clips(Path(args.data), b)
        if len(clips) < b:
            rows[f"batch{b}"] = "not enough clips"
            continue
        for suffix, over in configs.items():
            forced = dict(kw, **over, min_entropy=0.0)  # every clip adapted: the batching itself is what is timed
            t_alone, t_batch = [], []
            for _ in range(max(1, args.repeats)):
                t0 = time.perf_counter()
                alone = [fastem.adapt(model, c, **forced) for c in clips]
                t_alone.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                batched = fastem.adapt_batch(model, clips, **forced)
                t_batch.append(time.perf_counter() - t0)
            alone_s, batch_s = statistics.median(t_alone), statistics.median(t_batch)
            rows[f"batch{b}{suffix}"] = {"alone_s_per_utt": alone_s / b, "batch_s_per_utt": batch_s / b,
                                         "speedup": alone_s / batch_s, "rounds": len(t_alone),
                                         "same_transcripts": sum(a.text == c.text for a, c in zip(alone, batched)),
                                         "audio_s": sum(c.numel() for c in clips) / 16000, "rss_MiB": _rss_mib()}


SECTIONS = ("adapt", "define", "beam", "step", "sampling", "batch")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-sizes", default="4,8")
    ap.add_argument("--data", default=str(_REPO.parent / "shared" / "data"))
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--define", action="append", default=[], metavar="NAME=KEY=VALUE;KEY=VALUE",
                    help="a config to time forced past the gate (sections define and batch; repeatable)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, among {', '.join(SECTIONS)}")
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    if sections - set(SECTIONS):
        ap.error(f"unknown sections {sorted(sections - set(SECTIONS))}")

    from fastem.demo import noisy_sample

    model, processor = fastem.load_whisper(args.model, device=args.device)
    audio, _, what = noisy_sample(0.0)
    seconds = audio.numel() / 16000
    cfg = fastem.AdaptConfig()
    rows: dict = {"model": args.model, "clip": what, "clip_seconds": seconds, "config": repr(cfg),
                  "device": args.device or "cpu", "machine": platform.processor() or platform.machine(),
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    kw = dict(processor=processor, language="en")

    fastem.transcribe(model, audio, **kw)  # warm-up
    rows["transcribe_s"] = median_seconds(lambda: fastem.transcribe(model, audio, **kw), args.repeats)
    rows["rss_after_transcribe_MiB"] = _rss_mib()

    if "adapt" in sections:
        _adapt_rows(rows, model, audio, cfg, kw, seconds, args.repeats)
    definitions = dict(parse_definition(text) for text in args.define)
    if definitions:
        rows["definitions"] = definitions
    if "define" in sections and definitions:
        _defined_rows(rows, model, audio, cfg, kw, definitions, args.repeats)
    if "beam" in sections:
        _beam_rows(rows, model, audio, cfg, kw, args.beams, args.repeats)
    if sections & {"step", "sampling"}:  # the source model's encoder output and prompts, computed once
        context = _source_context(model, processor, audio, seconds)
        if "step" in sections:
            _step_rows(rows, model, audio, kw, context, args.repeats)
        if "sampling" in sections:
            _sampling_rows(rows, model, context, args.repeats)
    if "batch" in sections:
        _batch_rows(rows, model, kw, args, definitions)

    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"| measure ({args.model}, {rows['device']}, {rows['threads']} threads) | value |\n|---|---:|")
    for key, value in rows.items():
        if isinstance(value, float):
            print(f"| {key} | {value:.3f} |")
        elif isinstance(value, dict):
            print(f"| {key} | " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in value.items()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
