"""Learning-rate sweep on the bundled noisy sample: how the default ``AdaptConfig.lr`` was chosen.

    python benchmarks/lr_sweep.py --model base --snr 0 -3 --lr 1e-5 1e-4 1e-3 --steps 10

Prints, per (SNR, lr), the WER before and after adaptation, the per-step mean token entropy and the
adapted transcript.  The domain benchmark (benchmarks/wer_domains.py) is the broader check.
"""
from __future__ import annotations

import argparse

import fastem
from fastem.demo import noisy_sample
from fastem.models import load_whisper
from fastem.text import word_errors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--snr", type=float, nargs="+", default=[0.0, -3.0])
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--objective", default="em")
    args = ap.parse_args(argv)
    model, processor = load_whisper(args.model)
    for snr in args.snr:
        audio, ref, _ = noisy_sample(snr)
        for lr in args.lr:
            r = fastem.adapt(model, audio, processor=processor, language="en", lr=lr, steps=args.steps,
                             objective=args.objective)
            e0, n = word_errors(ref, r.text_before, "en")
            e1, _ = word_errors(ref, r.text, "en")
            ent = " ".join(f"{h['entropy']:.2f}" for h in r.history)
            print(f"snr={snr:g} lr={lr:g}: WER {e0 / n:.3f} -> {e1 / n:.3f}  entropy [{ent}]  | {r.text}", flush=True)


if __name__ == "__main__":
    main()
