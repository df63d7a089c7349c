"""Paired comparisons across the rows of one or several runs (no model needed).

    python benchmarks/paired.py out/dev_beam/rows.jsonl dev=benchmarks/results/dev_base_rows.jsonl \\
        --pair fastem_beam5:none --pair fastem_beam5@before:none --pair fastem_beam5:fastem_beam5@before \\
        --pair fastem_beam5:dev/fastem

Each ``ROWS`` argument is a rows file of the domain benchmark, or ``LABEL=PATH``: then its methods are
named ``LABEL/method`` (two runs may both have a ``none`` or a ``fastem``).  A file written by
``beam_baseline.py`` gives the methods ``hf_greedy`` and ``hf_beam`` (``transformers``' ``generate``); one written
by ``stream.py`` gives its modes (``continual:steps=1`` as ``continual[steps=1]``), each utterance of the stream
named by its position (English scoring).

A method in ``--pair A:B`` may carry a suffix naming another transcript of the same adapted rows:
``@before`` (the unadapted transcript the call compared against: greedy, or beam search with
``num_beams``) or ``@adapted`` (the adapted transcript before any guard).  Each pair prints one line:
macro WER of A against B on the utterances both have, the paired 95% bootstrap interval of the relative
change, and worse / better counts (``harness.report.paired_comparison``).  With ``--by-condition`` each
pair is followed by the same line for each kind of shift (``natural``, ``noise 0 dB``, ``noise 5 dB``,
``reverb``, ``channel``: ``harness.report.condition``), macro WER over that kind's domains.

A method may also be a pool of several, ``A+B`` (for example one recipe's two draws of the sampler,
``fastem+fastem_s1``, against another's, ``k8+k8_s1``; against the unadapted rows, ``none+none``): per
utterance its word errors and reference words are the sums over its parts, on the utterances every part
has, so its macro WER is the mean of the parts' and the paired bootstrap resamples an utterance with all
of its draws inside.  One draw of the sampler moves a recipe's macro WER by a few points (RESULTS.md,
"Stopping when the transcript has settled"); pooling draws is how two close recipes are compared.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report import condition  # noqa: E402
from harness.rerun import paired_line  # noqa: E402

SUFFIXES = {"@before": "errors_before", "@adapted": "errors_adapted"}


def load(specs: list[str]) -> list[dict]:
    """The rows of every ``ROWS`` / ``LABEL=PATH`` argument, each reduced to what a paired comparison reads."""
    rows: list[dict] = []
    for spec in specs:
        label, _, path = spec.partition("=") if "=" in spec else ("", "", spec)
        prefix = f"{label}/" if label else ""
        for line in open(path):
            if not line.strip():
                continue
            r = json.loads(line)
            if "errors_beam" in r:  # a beam_baseline.py row: two methods
                for name, key in (("hf_greedy", "errors_greedy"), ("hf_beam", "errors_beam")):
                    rows.append({"method": prefix + name, "domain": r["domain"], "utt_id": r["utt_id"],
                                 "errors": r[key], "ref_words": r["ref_words"]})
                continue
            if "mode" in r and "reference" in r:  # a stream.py row: its mode is the method, its index the utterance
                from fastem.text import word_errors

                e, n = word_errors(r["reference"], r["text"], "en")
                kind, _, settings = r["mode"].partition(":")  # "continual:steps=1" -> "continual[steps=1]"
                rows.append({"method": prefix + (f"{kind}[{settings}]" if settings else kind), "domain": r["domain"],
                             "utt_id": r["index"], "errors": e, "ref_words": n})
                continue
            if r.get("errors") is None:  # a failed call
                continue
            keep = {"domain": r["domain"], "utt_id": r["utt_id"], "ref_words": r["ref_words"]}
            rows.append({**keep, "method": prefix + r["method"], "errors": r["errors"]})
            for suffix, key in SUFFIXES.items():
                if r.get(key) is not None:
                    rows.append({**keep, "method": prefix + r["method"] + suffix, "errors": r[key]})
    return rows


def pool(rows: list[dict], name: str) -> list[dict]:
    """The rows of the pooled method ``name`` (``A+B+...``): each utterance's errors and reference words
    summed over the parts, on the utterances every part has (a part may be named twice)."""
    parts = name.split("+")
    by_part = [{(r["domain"], r["utt_id"]): r for r in rows if r["method"] == p} for p in parts]
    out = []
    for key in by_part[0]:
        if all(key in b for b in by_part):
            out.append({"method": name, "domain": key[0], "utt_id": key[1],
                        "errors": sum(int(b[key]["errors"]) for b in by_part),
                        "ref_words": sum(int(b[key]["ref_words"]) for b in by_part)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+", metavar="ROWS", help="a rows file, or LABEL=PATH")
    ap.add_argument("--pair", action="append", required=True, metavar="A:B", help="A against B (repeatable)")
    ap.add_argument("--by-condition", action="store_true", help="also each kind of shift on its own")
    args = ap.parse_args(argv)
    rows = load(args.rows)
    names = sorted({r["method"] for r in rows})
    for pair in args.pair:
        a, sep, b = pair.partition(":")
        missing = [m for m in (a, b) for part in m.split("+") if part not in names]
        if not sep or missing:
            raise SystemExit(f"--pair {pair!r}: expected A:B with methods among {', '.join(names)} "
                             "(or pools of them, A+B)")
        for m in {a, b}:
            if "+" in m and m not in names:
                rows = rows + pool(rows, m)
                names.append(m)
        print(paired_line(rows, a, b) or f"{a}: no utterance in common with {b}")
        if args.by_condition:
            for kind in sorted({condition(r["domain"]) for r in rows}):
                line = paired_line([r for r in rows if condition(r["domain"]) == kind], a, b)
                if line:
                    print(f"  {kind}: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
