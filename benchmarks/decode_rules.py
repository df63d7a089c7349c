"""Whisper's decoding rules (temperature fallback, no-speech) against plain greedy decoding, on the rows of a
domain-benchmark run: each ``none`` row's utterance is transcribed again with each variant of
``fastem.transcribe``'s rules, and each variant is paired against plain greedy decoding.

    OMP_NUM_THREADS=2 python benchmarks/decode_rules.py benchmarks/results/dev_base_rows.jsonl --model base \\
        --out benchmarks/results/dev_base_decode_rules_rows.jsonl

Variants: ``greedy`` (every rule off), ``whisper`` (fastem's defaults: compression ratio 2.4, log-prob -1.0,
no-speech 0.6), ``no_nospeech`` (the fallback without the no-speech rule).  The output holds one JSON line
per utterance and variant (resumable: a rerun skips what it holds); ``--limit`` caps the new utterances.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report import score  # noqa: E402
from harness.rerun import add_rerun_args, paired_line, pending_none_rows  # noqa: E402

VARIANTS = {
    "greedy": dict(compression_ratio_threshold=None, logprob_threshold=None, no_speech_threshold=None),
    "whisper": {},
    "no_nospeech": dict(no_speech_threshold=None),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rerun_args(ap)
    args = ap.parse_args(argv)

    import fastem
    from benchmarks.guard_sweep import _audio

    rows, todo = pending_none_rows(args)
    out = Path(args.out)
    model, processor = fastem.load_whisper(args.model)
    english_only = not model.generation_config.is_multilingual
    with open(out, "a") as f:
        for r in todo:
            audio = _audio(r, args.data)
            for name, rules in VARIANTS.items():
                t0 = time.perf_counter()
                text = fastem.transcribe(model, audio, processor=processor,
                                         language=None if english_only else r["language"], **rules)
                f.write(json.dumps({"domain": r["domain"], "utt_id": r["utt_id"], "language": r["language"],
                                    "model": args.model, "method": name, "ref": r["ref"], "ref_words": r["ref_words"],
                                    "hyp": text, "errors": score(r["ref"], text, r["language"])[0],
                                    "seconds": time.perf_counter() - t0}, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
    got = [json.loads(line) for line in open(out)]
    n = len({(g["domain"], g["utt_id"]) for g in got})
    print(f"{n} utterances")
    for name in VARIANTS:
        if name == "greedy":
            continue
        line = paired_line(got, name, "greedy")
        if line is not None:
            secs = [g["seconds"] for g in got if g["method"] == name]
            base = [g["seconds"] for g in got if g["method"] == "greedy"]
            print(f"{line}; {sum(secs) / max(sum(base), 1e-9):.2f}x greedy's time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
