#!/usr/bin/env python
"""Long recordings: WER with and without adaptation, and peak memory as the recording grows.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/long_audio.py --model base --minutes 0.5,2,10 \
        --adapt-minutes 2 --out benchmarks/results/long_audio_cpu.json

A long recording is built from real DEV clips of one corpus (Kathleen, US English, read speech), in
manifest order, joined with 0.4 s pauses; its reference is the clips' texts joined.  Each measurement
runs in a fresh process so its peak resident memory (``ru_maxrss``) is its own: ``transcribe`` for every
length in ``--minutes``, ``adapt`` (the default config: every window adapted on its own) for the lengths
in ``--adapt-minutes``, ``across`` (the windows in order through one ``fastem.Adapter``, adapted values
and optimizer state carried from window to window) for ``--across-minutes``.  ``--corpus`` and
``--snr`` (real dish noise over the whole recording) make harder recordings; ``--min-entropy 0``
adapts every window (for memory figures, or where the gate would skip them).

    OMP_NUM_THREADS=2 python benchmarks/long_audio.py --model tiny.en --corpus speechocean762 --snr 5 \
        --minutes "" --adapt-minutes 2 --across-minutes 2 --out benchmarks/results/long_audio_modes_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))


def add_noise(wave, snr_db: float, data_dir: Path, noise_id: str = "doing_the_dishes"):
    """The whole recording mixed with real kitchen noise, as the domain benchmark mixes a clip."""
    import numpy as np

    from harness.domains import make_noise_transform

    mixed = make_noise_transform(noise_id, snr_db)(wave.double(), np.random.default_rng(0), data_dir)
    return mixed.float().clamp(-1, 1)


def build_recording(data_dir: Path, minutes: float, corpus: str = "kathleen"):
    import torch

    from harness.data import load_manifest, read_audio

    parts, texts, total = [], [], 0
    gap = torch.zeros(int(0.4 * 16000))
    target = int(minutes * 60 * 16000)
    utts = load_manifest(data_dir, corpus)
    i = 0
    while total < target:
        utt = utts[i % len(utts)]
        wave = read_audio(utt.path)
        parts += [wave, gap]
        texts.append(utt.text)
        total += wave.numel() + gap.numel()
        i += 1
    return torch.cat(parts), " ".join(texts), i


def measure(args) -> dict:
    """One measurement in this process (called in a child process)."""
    import fastem
    from fastem.text import word_errors

    from fastem.audio import split_windows

    model, processor = fastem.load_whisper(args.model)
    wave, reference, clips = build_recording(Path(args.data), args.one, args.corpus)
    if args.snr is not None:
        wave = add_noise(wave, args.snr, Path(args.data))
    overrides = {} if args.min_entropy is None else {"min_entropy": args.min_entropy}
    t0 = time.perf_counter()
    if args.mode == "transcribe":
        text = fastem.transcribe(model, wave, processor=processor, language="en")
        before = text
        windows = len(split_windows(wave))
    elif args.mode == "adapt":  # fastem.adapt: every window adapted on its own (episodic)
        res = fastem.adapt(model, wave, processor=processor, language="en", **overrides)
        text, before, windows = res.text, res.text_before, len(res.windows) or 1
    else:  # "across": the windows of the recording in order through one Adapter (state carried over)
        cuts = split_windows(wave)
        with fastem.Adapter(model, processor, **overrides) as adapter:
            parts = [adapter.adapt(wave[lo:hi], language="en") for lo, hi in cuts]
        text = " ".join(r.text for r in parts if r.text)
        before = " ".join(r.text_before for r in parts if r.text_before)
        windows = len(cuts)
    seconds = time.perf_counter() - t0
    e_after, n = word_errors(reference, text, "en")
    e_before, _ = word_errors(reference, before, "en")
    return {"mode": args.mode, "model": args.model, "corpus": args.corpus, "snr": args.snr,
            "min_entropy": args.min_entropy, "minutes": args.one, "audio_s": wave.numel() / 16000, "clips": clips,
            "windows": windows, "seconds": seconds, "rtf": seconds / (wave.numel() / 16000),
            "wer_before": e_before / n, "wer_after": e_after / n, "ref_words": n,
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--minutes", default="0.5,2,10")
    ap.add_argument("--adapt-minutes", default="2")
    ap.add_argument("--across-minutes", default="", help="lengths adapted across windows (one Adapter)")
    ap.add_argument("--corpus", default="kathleen", help="DEV corpus the recording is built from")
    ap.add_argument("--snr", type=float, default=None, help="mix the recording with dish noise at this SNR (dB)")
    ap.add_argument("--min-entropy", type=float, default=None, help="the gate (default: the library's)")
    ap.add_argument("--data", default=str(_REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:  # child
        print(json.dumps(measure(args)))
        return 0
    plan = [("transcribe", float(m)) for m in args.minutes.split(",") if m]
    plan += [("adapt", float(m)) for m in args.adapt_minutes.split(",") if m]
    plan += [("across", float(m)) for m in args.across_minutes.split(",") if m]
    common = ["--model", args.model, "--data", args.data, "--corpus", args.corpus]
    common += ["--snr", str(args.snr)] if args.snr is not None else []
    common += ["--min-entropy", str(args.min_entropy)] if args.min_entropy is not None else []
    rows = []
    for mode, minutes in plan:
        out = subprocess.run([sys.executable, __file__, *common, "--mode", mode, "--one", str(minutes)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| mode | minutes | windows | seconds | RTF | WER before | WER after | peak RSS MiB |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['minutes']:g} | {r['windows'] or '-'} | {r['seconds']:.1f} | {r['rtf']:.2f} | "
              f"{r['wer_before']:.1%} | {r['wer_after']:.1%} | {r['peak_rss_MiB']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
