#!/usr/bin/env python
"""Rows of an adapted method re-decided offline under other guard thresholds, as a new method (no model needed).

    python benchmarks/redecide.py benchmarks/results/confirm_base_2_beam5_rows.jsonl --method fastem_beam5 \\
        --as fastem_beam5_auto --set max_seq_logp_drop=off --out out/confirm_beam_auto.jsonl
    python benchmarks/paired.py out/confirm_beam_auto.jsonl --pair fastem_beam5_auto:fastem_beam5@before

Writes every input row, then one row per ``--method`` row under the name ``--as``: the transcript the
library's guards (:func:`guard_sweep.decide`, through :mod:`fastem.judge`) return at the row's own
thresholds with the ``--set`` ones changed, re-scored against the reference.  The rows keep every guard's
evidence (``hyp_adapted``, ``scores``, token ids), so this is what the library would have returned had the
call used those thresholds; the adaptation itself is the same.  ``--set`` keys: ``max_seq_logp_drop``
(``off``: the likelihood guard abstains), ``max_verifier_drop``, ``max_logp_drop``, ``max_length_ratio``, and
``min_entropy`` (the gate: an utterance whose unadapted transcript's mean entropy is below it returns that
transcript; exact when raised, since the gate decides before adapting and each utterance adapts alone; it cannot
be lowered below the run's own, whose gated utterances were never adapted).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakdown import guard_names  # noqa: E402
from guard_sweep import decide, normalized  # noqa: E402
from harness.report import score  # noqa: E402

KEYS = ("max_seq_logp_drop", "max_verifier_drop", "max_logp_drop", "max_length_ratio", "min_entropy")


def thresholds(row: dict, changes: dict[str, float | None]) -> dict[str, float | None]:
    """The row's own thresholds (its recorded ``adapt`` settings; a guard it did not run is off) with ``changes``."""
    adapt, names = row.get("adapt") or {}, guard_names(row)
    own = {"max_logp_drop": adapt.get("max_logp_drop") if "confidence" in names else None,
           "max_length_ratio": adapt.get("max_length_ratio") if "length" in names else None,
           "max_verifier_drop": adapt.get("max_verifier_drop") if "verifier" in names else None,
           "max_seq_logp_drop": adapt.get("max_seq_logp_drop") if "likelihood" in names else None,
           "min_entropy": adapt.get("min_entropy") or 0.0}
    gate = changes.get("min_entropy", own["min_entropy"])
    if gate is None or gate < own["min_entropy"]:
        raise ValueError(f"min_entropy={gate}: the run gated below {own['min_entropy']:g} and never adapted those "
                         "utterances; the gate can only be raised offline")
    return {**own, **changes}


def redecide(row: dict, name: str, changes: dict[str, float | None]) -> dict:
    t = thresholds(row, changes)
    hyp = decide(normalized(row), t["max_logp_drop"], t["max_length_ratio"], t["min_entropy"],
                 consensus=0.0 if "consensus" in guard_names(row) else None, verifier_drop=t["max_verifier_drop"],
                 seq_drop=t["max_seq_logp_drop"])
    return {**row, "method": name, "hyp": hyp, "errors": score(row["ref"], hyp, row["language"])[0],
            "changed": hyp != row["text_before"], "redecided": {k: t[k] for k in KEYS}}


def read_adapted(path: str, method: str) -> tuple[list[dict], list[dict]]:
    """Every row of the rows file ``path``, and those of the adapted ``method`` (refused when it has none)."""
    rows = [json.loads(line) for line in open(path) if line.strip()]
    chosen = [r for r in rows if r.get("method") == method and r.get("hyp_adapted") is not None]
    if not chosen:
        raise SystemExit(f"{path}: no adapted rows of method {method!r}")
    return rows, chosen


def write_rows(path: str, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")


def parse_set(text: str) -> tuple[str, float | None]:
    key, sep, value = text.partition("=")
    if not sep or key not in KEYS:
        raise argparse.ArgumentTypeError(f"--set {text!r}: expected KEY=VALUE with KEY among {', '.join(KEYS)}")
    return key, None if value.strip().lower() == "off" else float(value)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a rows file of the domain benchmark")
    ap.add_argument("--method", required=True, help="the adapted method whose rows are re-decided")
    ap.add_argument("--as", dest="name", required=True, help="the name of the re-decided method")
    ap.add_argument("--set", action="append", type=parse_set, default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows, chosen = read_adapted(args.rows, args.method)
    new = [redecide(r, args.name, dict(args.set)) for r in chosen]
    write_rows(args.out, rows + new)
    moved = sum(n["hyp"] != r["hyp"] for n, r in zip(new, chosen))
    print(f"{len(new)} rows of {args.method} re-decided as {args.name}: {moved} return another transcript")
    return 0


if __name__ == "__main__":
    sys.exit(main())
