"""What a call costs over a protocol, from the rows of one run (no model needed).

    python benchmarks/call_cost.py benchmarks/results/dev_tinyen_agreed_rows.jsonl --method fastem

For each adapting method: the mean seconds per utterance, in units of the same run's unadapted greedy
transcription of the same utterances (the ``none`` rows: ``transcribe``), and how many utterances the call did not
adapt because the gate trusted the transcript (``confident``), because greedy and beam search agree (``agreed``:
nothing adapting could change), or adapted (``adapted``: it took steps).  Rows written before the runner recorded
``skipped`` say only adapted or not (``not adapted``).  A row's seconds are its share of its batch's call (the runner
divides a batch's wall time by its utterances), so only the mean over every utterance is a cost: an utterance the
gate skips shares the cost of the others adapted in its batch.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter


def kind(row: dict) -> str:
    """What the call did with the utterance: its ``skipped`` reason, ``adapted``, or ``not adapted``."""
    if row.get("steps_done", 0) > 0:
        return "adapted"
    return row.get("skipped") or "not adapted"


def cost(rows: list[dict], method: str, baseline: str = "none") -> tuple[int, float, float, dict[str, int]]:
    """``(utterances, mean seconds, the same in units of the baseline's on the same utterances, {kind: count})``
    over every utterance both methods have."""
    base = {(r["domain"], r["utt_id"]): r["seconds"] for r in rows if r["method"] == baseline}
    mine = [r for r in rows if r["method"] == method and (r["domain"], r["utt_id"]) in base]
    if not mine:
        raise SystemExit(f"no {method!r} rows paired with {baseline!r} rows")
    spent, plain = sum(r["seconds"] for r in mine), sum(base[r["domain"], r["utt_id"]] for r in mine)
    return len(mine), spent / len(mine), spent / plain, dict(Counter(kind(r) for r in mine))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rows", nargs="+", help="rows files of one run each")
    ap.add_argument("--method", action="append", help="the adapting method (repeatable; default: every one)")
    ap.add_argument("--baseline", default="none", help="the method whose seconds are the unit (default: none)")
    args = ap.parse_args(argv)
    print("| rows | method | utterances | s per utterance | in greedy transcriptions | what the calls did |")
    print("|---|---|---:|---:|---:|---|")
    for path in args.rows:
        rows = [json.loads(line) for line in open(path) if line.strip()]
        methods = args.method or sorted({r["method"] for r in rows} - {args.baseline})
        for m in methods:
            n, secs, ratio, kinds = cost(rows, m, args.baseline)
            did = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
            print(f"| {path.split('/')[-1]} | {m} | {n} | {secs:.2f} | {ratio:.2f}x | {did} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
