#!/usr/bin/env python
"""Adapted draws of the same rows composed offline into their medoid, as a new method (no model needed).

    python benchmarks/medoid_draws.py benchmarks/results/dev_base_t07_seeds_rows.jsonl \\
        --draws fastem_t07,fastem_t07_s1 --min-entropy 1.4 --as medoid --out out/dev_base_medoid.jsonl
    python benchmarks/paired.py out/dev_base_medoid.jsonl --pair medoid:none --pair medoid:fastem_t07+fastem_t07_s1

Per utterance: where the gate (``--min-entropy``, raised offline as in ``redecide.py``) lets the first draw's row
through, each draw's adapted transcript (``hyp_adapted``, whatever its guards said) faces the textual guards
(``fastem.judge.TEXTUAL_GUARDS``; failing, it is replaced by the unadapted transcript), and the row returns
``fastem.judge.medoid`` of [unadapted, draw 1, draw 2]: the candidate nearest the others by word edit distance,
ties to the unadapted.  This is what ``AdaptConfig(draws=2)`` returns for those two draws.  Writes every input row,
then one row per utterance under ``--as`` (``medoid_pick``: 0 unadapted, 1 or 2 the draw).  ``--draws`` takes any
number of draws (one: the medoid of the unadapted transcript, the greedy vote and that draw's).

``--greedy-vote`` (draws decoded with beam search, ``num_beams=5``): the rows' ``none`` transcript (the source
model's greedy one) joins the candidates first, as ``fastem.judge.choose`` takes it (``medoid_pick`` -1 when it is
returned); this is what the default, ``AdaptConfig()`` (5 beams, two draws), returns for those draws.

    python benchmarks/medoid_draws.py benchmarks/results/dev_base_adapt_beam5_recipe_rows.jsonl \
        --draws fb5g,fb5g_s1 --min-entropy 1.4 --greedy-vote --as beam_vote --out out/dev_base_beam_vote.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastem import judge  # noqa: E402
from gate_beams import greedy_gate, key  # noqa: E402
from guard_sweep import decide, normalized  # noqa: E402
from harness.report import score  # noqa: E402
from redecide import write_rows  # noqa: E402


def candidate(row: dict, unadapted: dict) -> str:
    """The draw's adapted transcript, or the unadapted one (of the row ``unadapted``) where a textual guard
    (``fastem.judge.TEXTUAL_GUARDS``: ``decide`` with no threshold but the length ratio) fires."""
    n = {**normalized(row), "before": unadapted["text_before"], "tokens_before": unadapted.get("tokens_before")}
    return decide(n, None, (row.get("adapt") or {}).get("max_length_ratio", 2.0))


def compose(draws: list[dict], name: str, min_entropy: float, greedy: str | None = None) -> dict:
    """The medoid of one utterance's ``draws`` (its rows, one per draw; the first's unadapted transcript stands for
    all).  ``greedy``: the source model's greedy transcript, a vote before the unadapted one (beam-search draws)."""
    first = draws[0]
    adapted = all(d.get("steps_done", 0) > 0 for d in draws)
    if not adapted or greedy_gate(first, min_entropy):
        hyp, pick = first["text_before"], 0
    else:  # what fastem.judge.choose returns for these candidates
        votes = [] if greedy is None else [greedy]
        texts = votes + [first["text_before"]] + [candidate(d, first) for d in draws]
        t = [SimpleNamespace(text=x, ids=None) for x in texts]
        pick, _ = judge.choose(t[len(votes)], t[len(votes) + 1:], [({}, None)] * len(draws), first.get("language"),
                               votes=t[:len(votes)])
        hyp = texts[pick + len(votes)]
    return {**first, "method": name, "hyp": hyp, "errors": score(first["ref"], hyp, first["language"])[0],
            "changed": hyp != first["text_before"], "medoid_pick": pick,
            "medoid_of": [d["method"] for d in draws], "redecided": {"min_entropy": min_entropy}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a rows file of the domain benchmark holding both draws")
    ap.add_argument("--draws", required=True, metavar="A,B",
                    help="the adapted methods (draws of one recipe), comma-separated; one or more")
    ap.add_argument("--min-entropy", type=float, default=0.0, help="the gate, raised offline (default: the rows')")
    ap.add_argument("--greedy-vote", action="store_true",
                    help="the rows' `none` transcript (greedy) votes first: draws decoded with beam search")
    ap.add_argument("--as", dest="name", required=True, help="the name of the composed method")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(args.rows) if line.strip()]
    names = args.draws.split(",")
    draws = [{key(r): r for r in rows if r.get("method") == m and r.get("hyp_adapted") is not None} for m in names]
    first = draws[0]
    if not first or any(d.keys() != first.keys() for d in draws):
        raise SystemExit(f"{args.rows}: draws {', '.join(map(repr, names))} must cover the same utterances "
                         f"({' and '.join(str(len(d)) for d in draws)} rows)")
    # Whisper's fallback samples, so where it ran the draws' unadapted transcripts can differ: the call makes
    # one, so the first draw's stands for all (the other draws' textual guards judge against it too)
    differ = sum(any(d[k]["text_before"] != r["text_before"] for d in draws[1:]) for k, r in first.items())
    none = {key(r): r["hyp"] for r in rows if r.get("method") == "none"}
    if args.greedy_vote and not first.keys() <= none.keys():
        raise SystemExit(f"{args.rows}: --greedy-vote needs a `none` row (the greedy transcript) for every utterance")
    new = [compose([d[k] for d in draws], args.name, args.min_entropy, none[k] if args.greedy_vote else None)
           for k in first]
    write_rows(args.out, rows + new)
    picks = [n["medoid_pick"] for n in new]
    print(f"{len(new)} utterances composed as {args.name}: greedy {picks.count(-1)}, unadapted {picks.count(0)}, "
          + ", ".join(f"draw {i} {picks.count(i)}" for i in range(1, len(names) + 1))
          + f"; the draws' unadapted transcripts differ on {differ} (the first's kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
