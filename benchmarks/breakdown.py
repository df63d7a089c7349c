"""Where a recipe helps and where it breaks, from the rows of a domain-benchmark run (no model needed).

    python benchmarks/breakdown.py benchmarks/results/dev_base_rows.jsonl --method fastem

For the rows of one adapted method it reports, overall and by condition (the domain's kind, and its SNR
for noise):
* the gate: utterances not adapted, and how many of them had a wrong transcript (errors > 0);
* the adaptation itself, before any guard: of the utterances adapted, how many transcripts changed and
  whether the unfiltered adapted transcript was better or worse than the unadapted one (word errors);
* each guard, judged on its own (every guard of the row's settings, not only the first that fired): how
  many changed transcripts it rejects, its precision (rejected that were really worse) and recall (worse
  ones it rejects), and the gains it throws away (rejected that were better);
* the result returned, against the unadapted transcript;
* what the adaptation changed: on the changed transcripts made worse and on those made better, the word
  substitutions, deletions and insertions against the reference, adapted minus unadapted (rows with ``ref``).
A guard's verdict is the row's own (``verdicts``) where the row has it, else re-decided with
``fastem.judge`` from the row's scores and token ids (exactly what the library decides).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.report import condition  # noqa: E402


def guard_names(row: dict) -> tuple[str, ...]:
    """The guards the row's call ran, from its recorded ``adapt`` settings."""
    guards = row.get("adapt", {}).get("guards", "()")
    names = tuple(ast.literal_eval(guards)) if isinstance(guards, str) else tuple(guards)
    if "verdicts" in row:  # rows that record verdicts were written since `guards` names every guard that runs
        return names
    adapt = row.get("adapt", {})
    extra = []  # rows written before `guards` named every guard: their settings switched these on
    if adapt.get("max_seq_logp_drop") is not None and "likelihood" not in names and names:
        extra.append("likelihood")
    if adapt.get("verifier") is not None and "verifier" not in names and names:
        extra.append("verifier")
    return names + tuple(extra)


def verdicts(row: dict) -> dict[str, str | None]:
    """Every guard's verdict on the row's adapted transcript."""
    if row.get("verdicts"):
        return row["verdicts"]
    from fastem import judge

    adapt, s = row.get("adapt", {}), row.get("scores", {})
    tb = row.get("tokens_before") or row["text_before"].split()
    ta = row.get("tokens_adapted") or row["hyp_adapted"].split()
    ev = judge.Evidence(text_before=row["text_before"], text_after=row["hyp_adapted"], tokens_before=tb, tokens_after=ta,
                        seconds=row.get("audio_seconds", 0.0), source_logp_before=s.get("source_before"),
                        source_logp_after=s.get("source_after"), adapted_logp_before=s.get("adapted_before"),
                        adapted_logp_after=s.get("adapted_after"), verifier_logp_before=s.get("verifier_before"),
                        verifier_logp_after=s.get("verifier_after"),
                        max_logp_drop=adapt.get("max_logp_drop", 1.5), max_length_ratio=adapt.get("max_length_ratio", 2.0),
                        max_verifier_drop=adapt.get("max_verifier_drop", 0.1),
                        max_seq_logp_drop=adapt.get("max_seq_logp_drop"))
    return judge.verdicts(ev, guard_names(row))


def _pct(a: int, b: int) -> str:
    return f"{a / b:.0%}" if b else "-"


def breakdown(rows: list[dict], method: str) -> str:
    mine = [r for r in rows if r["method"] == method]
    if not mine:
        raise SystemExit(f"no rows of method {method!r}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in mine:
        groups["all"].append(r)
        groups[condition(r["domain"])].append(r)
    out = [f"method {method}: {len(mine)} utterances, {len({r['domain'] for r in mine})} domains", "",
           "| condition | n | gated | gated & wrong | adapted | changed | adapted better | adapted worse | "
           "returned better | returned worse |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in ["all"] + sorted(k for k in groups if k != "all"):
        g = groups[name]
        gated = [r for r in g if not r.get("steps_done")]
        adapted = [r for r in g if r.get("steps_done")]
        changed = [r for r in adapted if r["hyp_adapted"] != r["text_before"]]
        better = sum(r["errors_adapted"] < r["errors_before"] for r in changed)
        worse = sum(r["errors_adapted"] > r["errors_before"] for r in changed)
        out.append(f"| {name} | {len(g)} | {len(gated)} | {sum(r['errors_before'] > 0 for r in gated)} | {len(adapted)} | "
                   f"{len(changed)} | {better} | {worse} | {sum(r['errors'] < r['errors_before'] for r in g)} | "
                   f"{sum(r['errors'] > r['errors_before'] for r in g)} |")
    changed = [r for r in mine if r.get("steps_done") and r["hyp_adapted"] != r["text_before"]]
    worse_all = [r for r in changed if r["errors_adapted"] > r["errors_before"]]
    fired: dict[str, list[dict]] = defaultdict(list)
    for r in changed:
        for name, reason in verdicts(r).items():
            if reason is not None:
                fired[name].append(r)
    out += ["", f"Guards on the {len(changed)} changed transcripts ({len(worse_all)} worse, "
            f"{sum(r['errors_adapted'] < r['errors_before'] for r in changed)} better before any guard), each on its own:",
            "", "| guard | rejects | of them worse (precision) | of the worse, rejected (recall) | of them better (gains lost) |",
            "|---|---:|---:|---:|---:|"]
    names = sorted({n for r in changed for n in verdicts(r)}, key=lambda n: -len(fired[n]))
    for name in names:
        f = fired[name]
        w = sum(r["errors_adapted"] > r["errors_before"] for r in f)
        b = sum(r["errors_adapted"] < r["errors_before"] for r in f)
        out.append(f"| {name} | {len(f)} | {w} ({_pct(w, len(f))}) | {w} of {len(worse_all)} ({_pct(w, len(worse_all))}) | "
                   f"{b} ({_pct(b, len(f))}) |")
    out += edit_table(changed)
    return "\n".join(out)


def edit_table(changed: list[dict]) -> list[str]:
    """Substitutions, deletions and insertions added by the adaptation (adapted minus unadapted, against the
    reference) on the changed transcripts made worse and on those made better."""
    rows = [r for r in changed if r.get("ref") is not None]
    if not rows:
        return []
    from fastem.text import word_edits

    out = ["", "What the adaptation changed, word edits against the reference, adapted minus unadapted:", "",
           "| changed transcripts | n | substitutions | deletions | insertions |", "|---|---:|---:|---:|---:|"]
    for name, keep in (("made worse", lambda r: r["errors_adapted"] > r["errors_before"]),
                       ("made better", lambda r: r["errors_adapted"] < r["errors_before"])):
        group = [r for r in rows if keep(r)]
        delta = [0, 0, 0]
        for r in group:
            lang = r.get("language") or "en"
            after, before = word_edits(r["ref"], r["hyp_adapted"], lang), word_edits(r["ref"], r["text_before"], lang)
            delta = [d + a - b for d, a, b in zip(delta, after, before)]
        out.append(f"| {name} | {len(group)} | {delta[0]:+d} | {delta[1]:+d} | {delta[2]:+d} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--method", default="fastem")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for path in args.rows for line in open(path) if line.strip()]
    print(breakdown(rows, args.method))
    return 0


if __name__ == "__main__":
    sys.exit(main())
