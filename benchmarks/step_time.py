#!/usr/bin/env python
"""Where one adaptation step of ``fastem.adapt`` spends its time, per phase, on a real model and clip.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_time.py --model base --params layernorm --steps 4

Times the real path: ``fastem.adapt`` itself runs, the gate forced open (``min_entropy=0``: the bundled
clip is confident, and a benchmark that times adapting must adapt), with timers wrapped around the
functions its loop (``fastem.loop``) calls (encoder layers, cross-attention keys/values, sampling,
scoring + loss); "backward + optimizer" is the rest of each step (``history`` seconds minus the timed
phases).  Prints the median over the steps after the first of each phase and of the whole step.

``--call N``: also where a whole call of the default goes (``fastem.adapt`` with its defaults, the gate forced
open), by the pipeline's phases (:mod:`fastem.adapt`), in seconds and in greedy transcriptions of the clip timed in
the same process; N calls after a warm one, the median of each phase.
"""
from __future__ import annotations

import argparse
import collections
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastem  # noqa: E402
from harness.naive import median_seconds  # noqa: E402

loop_module = importlib.import_module("fastem.loop")
PHASES = {"encoder_layers": "encoder (adapted layers, with grad)", "cross_kv": "cross-attention K/V",
          "decode": "sampling (KV cache)", "_losses": "scoring forward + loss"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--audio", default=None, help="default: the bundled clean sample clip")
    ap.add_argument("--num-samples", type=int, default=8, help="K (default: the default's 8)")
    ap.add_argument("--params", default="layernorm")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--device", default=None)
    ap.add_argument("--step-precision", default="model", help="AdaptConfig.step_precision: model or bfloat16")
    ap.add_argument("--ops", type=int, default=0, metavar="N",
                    help="also profile the steps after the first (torch.profiler) and print the N operators with the "
                         "most self time, by input shape: which matrix products, attention passes and copies a step is")
    ap.add_argument("--call", type=int, default=0, metavar="N",
                    help="also time N whole calls of the default (the gate forced open) by the pipeline's phases")
    args = ap.parse_args(argv)

    from fastem.samples import sample_paths

    model, processor = fastem.load_whisper(args.model, device=args.device)
    audio = fastem.load_audio(args.audio or sample_paths().speech)
    if args.call:
        _call_phases(model, processor, audio, args.call)
    spent: dict[str, list[float]] = collections.defaultdict(list)
    current: dict[str, float] = collections.defaultdict(float)
    for name in PHASES:
        _time_calls(loop_module, name, lambda name, sec: current.__setitem__(name, current[name] + sec))
    real_losses = loop_module._losses

    def step_marker(*a, **k):  # _losses runs once per step: close the previous step's phase sums
        out = real_losses(*a, **k)
        for name in PHASES:
            spent[name].append(current[name])
            current[name] = 0.0
        return out

    loop_module._losses = step_marker
    kw = dict(processor=processor, language="en", params=args.params, num_samples=args.num_samples, guards=(),
              min_entropy=0.0, step_precision=args.step_precision, draws=1)  # one draw's step (the default runs two)
    res = fastem.adapt(model, audio, steps=args.steps, **kw)
    if len(res.history) < 2:
        raise SystemExit(f"only {len(res.history)} step(s) ran: pass --steps 2 or more")
    steps = [h["seconds"] for h in res.history][1:]
    rows = {}
    for name, label in PHASES.items():
        rows[label] = statistics.median(spent[name][1:len(steps) + 1]) if spent[name] else 0.0
    step = statistics.median(steps)
    rows["backward + optimizer"] = max(0.0, step - sum(rows.values()))
    print(f"{args.model}, params={args.params}, K={args.num_samples}, step_precision={args.step_precision}, "
          f"{audio.numel() / 16000:.1f} s clip, "
          f"{torch.get_num_threads()} threads; median of {len(steps)} steps after the first")
    print("| phase | seconds | share |\n|---|---:|---:|")
    for label, sec in rows.items():
        print(f"| {label} | {sec:.3f} | {sec / step:.0%} |")
    print(f"| **step** | **{step:.3f}** | |")
    if args.ops:
        _operators(model, audio, args, kw)


#: The pipeline's phases (:func:`fastem.adapt._run`), as a call of the default runs them.
CALL_PHASES = {"_encode": "source encoder", "_transcribe_source": "source transcript (5-beam search)",
               "_gate": "gate (with the greedy vote's decode)", "_adapt": "adaptation steps (both draws)",
               "_transcribe_adapted": "adapted transcripts (5-beam search, both draws)", "_judge_phase": "judge"}


def _time_calls(module, name: str, record) -> None:
    """Replace ``module.name`` by a wrapper that calls ``record(name, seconds)`` after each call."""
    real = getattr(module, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            record(name, time.perf_counter() - t0)

    setattr(module, name, timed)


def _call_phases(model, processor, audio, calls: int) -> None:
    """Median seconds of each phase over ``calls`` default calls forced past the gate, after a warm one."""
    pipeline = importlib.import_module("fastem.adapt")
    spent: dict[str, list[float]] = collections.defaultdict(list)
    reals = {name: getattr(pipeline, name) for name in CALL_PHASES}
    kw = dict(processor=processor, language="en")
    fastem.transcribe(model, audio, **kw)  # warm
    one = median_seconds(lambda: fastem.transcribe(model, audio, **kw), calls)
    fastem.adapt(model, audio, min_entropy=0, **kw)  # warm
    try:
        for name in CALL_PHASES:
            _time_calls(pipeline, name, lambda name, sec: spent[name].append(sec))
        total = median_seconds(lambda: fastem.adapt(model, audio, min_entropy=0, **kw), calls)
    finally:
        for name, real in reals.items():
            setattr(pipeline, name, real)
    print(f"A call of the default forced past the gate, median of {calls}; a greedy transcription {one:.2f} s")
    print("| phase | seconds | greedy transcriptions |\n|---|---:|---:|")
    for name, label in CALL_PHASES.items():
        sec = statistics.median(spent[name])
        print(f"| {label} | {sec:.2f} | {sec / one:.1f}x |")
    print(f"| **call** | **{total:.2f}** | **{total / one:.1f}x** |\n")


def _operators(model, audio, args, kw: dict) -> None:
    """The top operators of a call of ``args.steps - 1`` steps with the timed call's settings ``kw`` (after it, so
    warm), per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        res = fastem.adapt(model, audio, steps=args.steps - 1, **kw)
    n = max(1, len(res.history))
    events = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    print(f"\nTop {args.ops} operators by self time, per step (the profiled call: {n} steps, its transcripts included; "
          "profiling slows every operator)")
    print("| operator | input shapes | calls per step | ms per step |\n|---|---|---:|---:|")
    for e in events[:args.ops]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes if s) or "-"
        print(f"| {e.key} | {shapes} | {e.count / n:.0f} | {e.self_cpu_time_total / 1e3 / n:.1f} |")


if __name__ == "__main__":
    main()
