#!/usr/bin/env python
"""Beams only where the gate adapts, composed offline from the rows of two runs (no model needed).

    python benchmarks/gate_beams.py benchmarks/results/dev_base_adapt_beam5_k8_rows.jsonl --beam-method fastem_b5k8 \\
        --greedy benchmarks/results/dev_base_k8s5_rows.jsonl --greedy-method fastem_k8s5 --as gate_beams \\
        --out out/dev_base_gate_beams.jsonl
    python benchmarks/paired.py out/dev_base_gate_beams.jsonl --pair gate_beams:none \\
        --pair gate_beams:fastem_b5k8@before --pair gate_beams:fastem_b5k8

The policy: decode greedily; a clip the gate finds confident (``fastem.judge.gate`` on the greedy
transcript's mean next-token entropy and whether it needed Whisper's fallback, at the beam rows'
``min_entropy``) or silent returns its greedy transcript (the beam run's ``none`` row); every other clip
returns what the beam run's method returned for it (``adapt(num_beams=...)``: its own beam transcript,
gate, adaptation and judge).  The gate's evidence comes from the rows of a greedy adapted run
(``--greedy``, any greedy method: ``scores.entropy_before``, ``scores.fallback_before``, a ``no_speech``
skip), whose source transcript must be the ``none`` transcript of the beam run (checked: a mismatch is an
error, as it would be a different greedy decoding).  Writes every row of the beam run, then one row per
utterance under ``--as``, with ``source`` saying which transcript it returned (``greedy`` or ``beam``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastem import judge  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness.report import score  # noqa: E402


def key(row: dict) -> tuple[str, str]:
    """The utterance a row is about."""
    return row["domain"], row["utt_id"]


def _rows(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def greedy_gate(row: dict, min_entropy: float) -> str | None:
    """Why the greedy default would not adapt this utterance (``"confident"``, ``"no_speech"``) or ``None``."""
    if row.get("guard") == "no_speech":
        return "no_speech"
    s = row.get("scores") or {}
    if "entropy_before" not in s:
        raise ValueError(f"{row['domain']}/{row['utt_id']}: a greedy row without the gate's entropy")
    return judge.gate(s["entropy_before"], "fallback_before" in s, min_entropy)


def compose(beam_rows: list[dict], greedy_rows: list[dict], beam_method: str, greedy_method: str, name: str) -> list[dict]:
    """One row per utterance of ``beam_method``: the greedy ``none`` transcript where the greedy gate does
    not adapt, the beam method's returned transcript elsewhere."""
    none = {key(r): r for r in beam_rows if r["method"] == "none"}
    greedy = {key(r): r for r in greedy_rows if r["method"] == greedy_method}
    out = []
    for r in beam_rows:
        if r["method"] != beam_method or r.get("errors") is None:
            continue
        k = key(r)
        if k not in none or k not in greedy:
            raise ValueError(f"{k}: no `none` row in the beam run or no {greedy_method!r} row in the greedy run")
        g, n = greedy[k], none[k]
        if g["text_before"] != n["hyp"]:
            raise ValueError(f"{k}: the greedy run's source transcript is not the beam run's `none` transcript "
                             f"({g['text_before']!r} != {n['hyp']!r})")
        skip = greedy_gate(g, float(r["adapt"]["min_entropy"]))
        chosen = n if skip else r
        out.append({**r, "method": name, "hyp": chosen["hyp"], "errors": chosen["errors"],
                    "source": "greedy" if skip else "beam", "greedy_gate": skip,
                    "entropy_greedy": g["scores"].get("entropy_before")})
    if not out:
        raise ValueError(f"no rows of method {beam_method!r}")
    return out


def confident_beam(beam_rows: list[dict], greedy_rows: list[dict], beam_method: str, greedy_method: str, name: str,
                   min_entropy: float) -> list[dict]:
    """The other way round: one row per utterance of ``greedy_method`` (a greedy adapted run), returning the beam
    run's *unadapted* beam transcript (``beam_method``'s ``text_before``) where the greedy gate at ``min_entropy``
    trusts the clip, and the greedy method's returned transcript elsewhere."""
    beam = {key(r): r for r in beam_rows if r["method"] == beam_method}
    out = []
    for g in greedy_rows:
        if g["method"] != greedy_method or g.get("errors") is None:
            continue
        k = key(g)
        if k not in beam:
            raise ValueError(f"{k}: no {beam_method!r} row in the beam run")
        skip = greedy_gate(g, min_entropy)
        b = beam[k]
        hyp = b["text_before"] if skip else g["hyp"]
        out.append({**g, "method": name, "hyp": hyp, "errors": score(g["ref"], hyp, g["language"])[0],
                    "source": "beam" if skip else "greedy", "greedy_gate": skip})
    if not out:
        raise ValueError(f"no rows of method {greedy_method!r}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="the beam run's rows (with its `none` rows)")
    ap.add_argument("--beam-method", required=True, help="the beam run's adapted method (num_beams > 1)")
    ap.add_argument("--greedy", required=True, help="rows of a greedy adapted run of the same utterances")
    ap.add_argument("--greedy-method", required=True, help="its method, whose rows carry the gate's evidence")
    ap.add_argument("--as", dest="name", default="gate_beams", help="the composed method's name")
    ap.add_argument("--confident-beam", type=float, default=None, metavar="GATE",
                    help="the other policy: the unadapted beam transcript where the greedy gate at GATE nats trusts the "
                         "clip, the greedy method's returned transcript elsewhere (writes the greedy run's rows too)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    beam_rows, greedy_rows = _rows(args.rows), _rows(args.greedy)
    try:
        if args.confident_beam is not None:
            new = confident_beam(beam_rows, greedy_rows, args.beam_method, args.greedy_method, args.name,
                                 args.confident_beam)
            kept = greedy_rows
        else:
            new = compose(beam_rows, greedy_rows, args.beam_method, args.greedy_method, args.name)
            kept = beam_rows
    except ValueError as e:
        raise SystemExit(f"gate_beams: {e}") from None
    with open(args.out, "w") as f:
        for r in kept + new:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    beams = sum(r["source"] == "beam" for r in new)
    print(f"{len(new)} utterances: {len(new) - beams} greedy, {beams} beam")
    return 0


if __name__ == "__main__":
    sys.exit(main())
