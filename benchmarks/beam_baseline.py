#!/usr/bin/env python
"""The unadapted model with beam search: how much a better search alone gives, on the items of a dev run.

    python benchmarks/beam_baseline.py benchmarks/results/dev_base_rows.jsonl --model base \\
        --out benchmarks/results/dev_base_beam5_rows.jsonl        # resumes; ~5.5 s per utterance on 2 cores
    python benchmarks/beam_baseline.py out/confirm/rows.jsonl --model base \\
        --out benchmarks/results/confirm_base_beam5_rows.jsonl    # CONFIRM rows: audio from the CONFIRM data
    python benchmarks/beam_baseline.py out/confirm/rows.jsonl --model base --limit 2 --out out/beam_check.jsonl

For every ``none`` row of the rows file (same audio: the row's domain and utterance, rebuilt as the domain
benchmark builds it), transcribes with ``transformers``' own ``generate``: greedy (checked against the
row's transcript) and beam search with ``--beams`` beams, the language given, no timestamps, and writes one
JSON line per utterance with both transcripts and their word errors (the library's scorer).  Prints macro
WER (mean over domains of each domain's corpus WER) of beam search and, when the rows file has them, of
``--compare`` (default: fastem), each paired against greedy (``harness.report.paired_comparison``).

The audio is read from ``--data`` when given, else from the default directory of the data set each row's
domain reads (DEV: ``$FASTEM_DATA`` or ``<repo>/../shared/data``; CONFIRM domains, ``confirm_*``:
``$FASTEM_CONFIRM_DATA`` or ``<repo>/../shared/confirm``).  ``--limit N`` transcribes at most N more
utterances in this call (a check, or a run in slices: the output file resumes).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.report import score  # noqa: E402
from harness.rerun import add_rerun_args, paired_line, pending_none_rows  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_rerun_args(ap)
    ap.add_argument("--beams", type=int, default=5)
    ap.add_argument("--compare", default="fastem")
    args = ap.parse_args(argv)

    import torch

    import fastem
    from benchmarks.guard_sweep import _audio

    rows, todo = pending_none_rows(args)
    out = Path(args.out)
    model, processor = fastem.load_whisper(args.model)
    kw = {"task": "transcribe"} if model.generation_config.is_multilingual else {}
    with torch.no_grad(), open(out, "a") as f:
        for r in todo:
            feats = processor.feature_extractor(_audio(r, args.data).numpy(), sampling_rate=16000,
                                                return_tensors="pt").input_features
            start = time.perf_counter()
            lang = {"language": r["language"]} if kw else {}
            texts = {b: processor.batch_decode(model.generate(feats, num_beams=b, do_sample=False, **kw, **lang),
                                               skip_special_tokens=True)[0].strip() for b in (1, args.beams)}
            f.write(json.dumps({"domain": r["domain"], "utt_id": r["utt_id"], "language": r["language"],
                                "model": args.model, "ref": r["ref"], "ref_words": r["ref_words"], "beams": args.beams,
                                "greedy": texts[1], "errors_greedy": score(r["ref"], texts[1], r["language"])[0],
                                "beam": texts[args.beams],
                                "errors_beam": score(r["ref"], texts[args.beams], r["language"])[0],
                                "same_as_row": texts[1] == r["hyp"].strip(),
                                "seconds": time.perf_counter() - start}, ensure_ascii=False, sort_keys=True) + "\n")
            f.flush()
    got = [json.loads(line) for line in open(out)]
    print(f"{len(got)} utterances ({sum(g['same_as_row'] for g in got)} greedy transcripts equal to the rows')")
    table = [{"method": method, "domain": g["domain"], "utt_id": g["utt_id"], "errors": g[key],
              "ref_words": g["ref_words"]} for method, key in (("none", "errors_greedy"), ("beam", "errors_beam"))
             for g in got] + [r for r in rows if r["method"] == args.compare]
    for method in ("beam", args.compare):
        line = paired_line(table, method, "none")  # against greedy, on the utterances both have
        if line is not None:
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
