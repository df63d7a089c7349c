#!/usr/bin/env python
"""The beam option's transcript checked against the unadapted greedy one by the verifier's ear, offline from rows.

    python benchmarks/greedy_check.py out/dev_base_beam_agree_a.jsonl --method agree_a --as greedy_check \\
        --cache benchmarks/results/verifier_text_dev_base_beam5.jsonl --out out/dev_base_greedy_check.jsonl
    python benchmarks/paired.py out/dev_base_greedy_check.jsonl --pair greedy_check:none \\
        --pair greedy_check:agree_a@before --pair greedy_check:agree_a

For each utterance, G is the unadapted greedy transcript (the rows' ``none``), B what the beam ``--method``
returned, V the verifier checkpoint's own transcript of the audio with the method's beams (what the ``agreement``
guard reads; cached in ``--cache``, computed where missing, see :mod:`agreement`).  Where B differs from G, G is
returned if :func:`fastem.judge.agreement` fires with G as the transcript before and B as the one after (the
verifier's transcript strictly nearer G than B); otherwise B.  No threshold.  Writes every input row, then one row
per utterance under ``--as`` with ``greedy_check`` holding the verifier's transcript and the verdict.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agreement import _key, add_verifier_arguments, verifier_texts  # noqa: E402
from harness.report import score  # noqa: E402
from redecide import read_adapted, write_rows  # noqa: E402

from fastem import judge  # noqa: E402


def _utt(row: dict) -> tuple[str, str]:
    return row["domain"], row["utt_id"]


def checked(row: dict, greedy: dict, name: str, heard: str | None) -> dict:
    """``row`` (the beam method's) re-decided against the greedy transcript of ``greedy`` (its ``none`` row)."""
    g, b = greedy["hyp"], row["hyp"]
    fired = None
    if b != g:
        ev = judge.Evidence(text_before=g, text_after=b, tokens_before=g.split(), tokens_after=b.split(),
                            seconds=row.get("audio_seconds", 0.0), verifier_text=heard, language=row["language"])
        fired = judge.agreement(ev)
    hyp = g if fired else b
    verdict = {"verifier_text": heard, "fired": fired, "source": "greedy" if fired else "beam"}
    return {**row, "method": name, "hyp": hyp, "errors": score(row["ref"], hyp, row["language"])[0],
            "changed": hyp != row["text_before"], "greedy_check": verdict}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="rows of the domain benchmark holding `none` (greedy) and the beam --method")
    ap.add_argument("--method", required=True)
    ap.add_argument("--as", dest="name", required=True)
    add_verifier_arguments(ap)
    args = ap.parse_args(argv)
    rows, chosen = read_adapted(args.rows, args.method)
    greedy = {_utt(r): r for r in rows if r.get("method") == "none"}
    missing = [r for r in chosen if _utt(r) not in greedy]
    if missing:
        raise SystemExit(f"{args.rows}: {len(missing)} rows of {args.method} have no `none` row")
    # the verifier's transcript is needed wherever the beam transcript differs from the greedy one
    differ = [{**r, "text_before": greedy[_utt(r)]["hyp"], "hyp_adapted": r["hyp"]} for r in chosen]
    cache = verifier_texts(differ, Path(args.cache), args.verifier, args.data)
    new = []
    for r in chosen:
        item = cache.get(_key(r, args.verifier))
        new.append(checked(r, greedy[_utt(r)], args.name, item["text"] if item else None))
    write_rows(args.out, rows + new)
    fired = sum(bool(n["greedy_check"]["fired"]) for n in new)
    differs = sum(r["hyp"] != greedy[_utt(r)]["hyp"] for r in chosen)
    print(f"{len(new)} rows of {args.method} checked as {args.name}: {differs} differ from greedy, the greedy transcript "
          f"returned for {fired}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
