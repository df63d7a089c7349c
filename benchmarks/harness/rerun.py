"""Re-running the unadapted utterances of a domain-benchmark run another way (beam search, other decoding
rules): the command-line options such scripts share, and the ``none`` rows still to do (resumable output)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterator

__all__ = ["add_rerun_args", "paired_line", "pending_none_rows"]


def add_rerun_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("rows", help="rows.jsonl of a domain-benchmark run (its 'none' rows are the utterances)")
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="JSONL output; a rerun resumes from it")
    ap.add_argument("--data", "--data-dir", dest="data", default=None,
                    help="data dir of the rows' audio (default: per row, its domain's data set's default directory)")
    ap.add_argument("--limit", type=int, default=None, help="at most this many new utterances")


def pending_none_rows(args) -> tuple[list[dict], Iterator[dict]]:
    """``(all rows, the 'none' rows of args.model that args.out does not hold yet, at most args.limit)``."""
    rows = [json.loads(line) for line in open(args.rows) if line.strip()]
    out = Path(args.out)
    done = {(r["domain"], r["utt_id"]) for r in map(json.loads, open(out))} if out.exists() else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    todo = [r for r in rows if r["method"] == "none" and r["model"] == args.model
            and (r["domain"], r["utt_id"]) not in done]
    return rows, iter(todo[:args.limit] if args.limit is not None else todo)


def paired_line(rows: list[dict], method: str, baseline: str) -> str | None:
    """One line: ``method`` against ``baseline`` on the utterances both have (macro WER, 95% interval,
    worse / better), or None when they share none."""
    from .report import paired_comparison

    p = paired_comparison(rows, method, baseline=baseline)
    if p is None:
        return None
    return (f"{method}: macro WER {p['wer']:.2%} vs {baseline} {p['wer_baseline']:.2%} ({p['rel_change']:+.1%}, "
            f"95% CI [{p['ci_low']:+.1%}, {p['ci_high']:+.1%}]); worse / better {p['worse']} / {p['better']} "
            f"of {p['items']}")
