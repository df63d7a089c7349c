#!/usr/bin/env python
"""What ``stop_when_settled=N`` would have returned, from rows that recorded each step's greedy transcript.

    python benchmarks/settle.py out/dev_tinyen_traj/rows.jsonl --method fastem_traj --updates 1 2 3 \\
        --out out/dev_tinyen_settle.jsonl
    python benchmarks/paired.py out/dev_tinyen_settle.jsonl --pair settle2_pess:fastem_traj --pair settle2_pess:none

The rows come from a run with ``stop_when_settled`` set high (``greedy_steps``: the greedy transcript at the
start of each step).  For each ``N`` the script finds the step at which the rule would have stopped each
adapted utterance (N updates in a row leaving its greedy transcript unchanged).  Where it would not have
stopped before the run ended, or stops on the transcript the run adapted to, the run's returned transcript is
kept.  Where it stops on another transcript, what the judge would have returned is not known: method
``settleN_pess`` takes the worse (more word errors) of the unadapted and the settled transcript, ``settleN_opt``
the better, and ``settleN_adapted`` is the settled transcript itself (before any guard).  Every input row is
written too, so ``paired.py`` can compare them with the run's own methods.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.report import score  # noqa: E402
from redecide import read_adapted, write_rows  # noqa: E402


def trajectory(row: dict) -> list[tuple[int, ...]]:
    """The greedy transcript at the start of each step the run took, and at the step where it stopped (the
    run's own rule fired there: the same transcript as the step before)."""
    seen = [tuple(g) for g in row["greedy_steps"]]
    if seen and row["steps_done"] < row["adapt"]["steps"]:
        seen.append(seen[-1])
    return seen


def stop_step(seen: list[tuple[int, ...]], updates: int) -> int | None:
    """The first step at which ``updates`` updates in a row have left the transcript unchanged, if any."""
    for i in range(updates, len(seen)):
        if len(set(seen[i - updates:i + 1])) == 1:
            return i
    return None


def simulate(row: dict, updates: int, decode_text) -> dict:
    """The rows of ``settleN_pess``, ``_opt`` and ``_adapted`` for one adapted row, and what happened to it."""
    seen = trajectory(row)
    i = stop_step(seen, updates)
    base = {"settle_updates": updates}
    if i is None or i >= row["steps_done"] or list(seen[i]) == list(row["tokens_adapted"]):
        taken = row["steps_done"] if i is None or i >= row["steps_done"] else i
        case = "ran to the end" if i is None or i >= row["steps_done"] else "stopped, same transcript"
        same = {**base, "steps_done": taken, "settle_case": case}
        return {"pess": {**row, **same}, "opt": {**row, **same},
                "adapted": {**row, **same, "hyp": row["hyp_adapted"], "errors": row["errors_adapted"]}}
    text = decode_text(list(seen[i]))
    errors = score(row["ref"], text, row["language"])[0]
    before = (row["text_before"], row["errors_before"])
    worse, better = sorted([before, (text, errors)], key=lambda p: p[1], reverse=True)
    common = {**base, "steps_done": i, "settle_case": "stopped, other transcript", "settled_text": text}
    return {"pess": {**row, **common, "hyp": worse[0], "errors": worse[1]},
            "opt": {**row, **common, "hyp": better[0], "errors": better[1]},
            "adapted": {**row, **common, "hyp": text, "errors": errors}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a rows file of the domain benchmark with greedy_steps")
    ap.add_argument("--method", required=True, help="the method that recorded the trajectories")
    ap.add_argument("--updates", type=int, nargs="+", default=[1, 2, 3], help="the N to simulate")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows, chosen = read_adapted(args.rows, args.method)
    adapted = [r for r in chosen if r.get("steps_done")]
    missing = [r["utt_id"] for r in adapted if not r.get("greedy_steps")]
    if missing:
        raise SystemExit(f"{len(missing)} adapted rows have no greedy_steps (run with stop_when_settled): {missing[:3]}")
    import fastem
    _, processor = fastem.load_whisper(chosen[0]["model"])

    def decode_text(ids):
        return processor.tokenizer.decode(ids, skip_special_tokens=True).strip()

    out = list(rows)
    for n in args.updates:
        cases, updates = Counter(), []
        for r in chosen:
            if not r.get("steps_done"):
                sim = {"pess": r, "opt": r, "adapted": {**r, "hyp": r["hyp_adapted"], "errors": r["errors_adapted"]}}
            else:
                sim = simulate(r, n, decode_text)
                cases[sim["pess"]["settle_case"]] += 1
                updates.append(sim["pess"]["steps_done"])
            for kind, row in sim.items():
                out.append({**row, "method": f"settle{n}_{kind}"})
        mean = sum(updates) / max(len(updates), 1)
        print(f"N = {n}: {len(updates)} adapted utterances, {mean:.2f} updates on average "
              f"(the run: {sum(r['steps_done'] for r in adapted) / max(len(adapted), 1):.2f}); "
              + ", ".join(f"{k}: {v}" for k, v in sorted(cases.items())))
    write_rows(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
