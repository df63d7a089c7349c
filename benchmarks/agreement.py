#!/usr/bin/env python
"""Rows of an adapted method re-decided offline with the ``agreement`` guard (the verifier's own transcript).

    python benchmarks/agreement.py out/dev_base_2_nolik.jsonl --method fastem_nolik --variant replace \\
        --as agree_a --cache benchmarks/results/verifier_text_dev_base.jsonl --out out/dev_base_agree_a.jsonl
    python benchmarks/paired.py out/dev_base_agree_a.jsonl --pair agree_a:none --pair agree_a:fastem_nolik

For every row of ``--method`` whose adapted transcript differs from the unadapted one, the verifier checkpoint
(the library's ``verifier="auto"`` choice for the row's model, or ``--verifier``) transcribes the row's audio as
the library's judge does (:func:`fastem.verifier.verifier_scores` with the default decoding rules and the row's
beams); those transcripts are cached in ``--cache`` (one JSON line each, resumable, small enough to commit).
Each row is then re-decided by :func:`guard_sweep.decide` at its own thresholds (with its ``redecided`` changes,
if :mod:`redecide` made it), the ``verifier`` guard left out (``--variant replace``) or kept (``add``), and then
:func:`fastem.judge.agreement`.  The adaptation is the same; only the choice between the two transcripts moves.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from breakdown import guard_names  # noqa: E402
from guard_sweep import _audio, decide, normalized  # noqa: E402
from harness.report import score  # noqa: E402
from redecide import read_adapted, thresholds, write_rows  # noqa: E402

from fastem import judge  # noqa: E402

VERIFIER_OF = {"base": "tiny.en", "tiny.en": "base"}  # what verifier="auto" picks for the bundled checkpoints


def _verifier(row: dict, verifier: str | None) -> str:
    """The checkpoint that verifies the row: ``verifier``, or what ``verifier="auto"`` picks for the row's model."""
    return verifier or VERIFIER_OF[row["model"]]


def _key(row: dict, verifier: str | None) -> str:
    return f"{row['domain']}|{row['utt_id']}|{_verifier(row, verifier)}|{_beams(row)}"


def verifier_texts(rows: list[dict], cache_path: Path, verifier: str | None, data_dir: str | None) -> dict[str, dict]:
    """The verifier's transcript (or why it abstains) of every changed row, computed where the cache lacks it."""
    cache = {}
    if cache_path.exists():
        for line in cache_path.open():
            if line.strip():
                item = json.loads(line)
                cache[item["key"]] = item
    todo = [r for r in rows if r["hyp_adapted"] != r["text_before"]]
    missing = [r for r in todo if _key(r, verifier) not in cache]
    if missing:
        import torch

        from fastem import AdaptConfig
        from fastem.adapt import WHISPER
        from fastem.verifier import load_verifier, verifier_scores

        with cache_path.open("a") as f:
            for i, r in enumerate(missing):
                name = _verifier(r, verifier)
                model, processor = load_verifier(name, torch.device("cpu"))
                cfg = AdaptConfig(max_new_tokens=(r.get("adapt") or {}).get("max_new_tokens"))
                wave = _audio(r, data_dir)
                vote = verifier_scores(model, processor, [wave], [[r["text_before"], r["hyp_adapted"]]], [r["language"]],
                                       rules=cfg.decode_rules, num_beams=_beams(r),
                                       budgets=WHISPER.budgets(cfg, WHISPER.seconds([wave])))[0]
                item = {"key": _key(r, verifier), "verifier": name, "text": vote.get("verifier_text"),
                        "abstained": vote.get("verifier_abstained")}
                cache[item["key"]] = item
                f.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
                f.flush()
                print(f"[{i + 1}/{len(missing)}] {r['domain']} {r['utt_id']}: {item['text'] or item['abstained']!r}",
                      file=sys.stderr)
    return cache


def add_verifier_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of a script that reads the verifier's transcripts through :func:`verifier_texts`, and --out."""
    ap.add_argument("--cache", required=True, help="JSON lines of the verifier's transcripts (read and extended)")
    ap.add_argument("--verifier", default=None, help="default: what verifier='auto' picks for the row's model")
    ap.add_argument("--data", default=None, help="the data directory (default: the rows' data set's)")
    ap.add_argument("--out", required=True)


def _beams(row: dict) -> int:
    return int((row.get("adapt") or {}).get("num_beams", 1) or 1)


def redecide_with_agreement(row: dict, name: str, variant: str, heard: str | None) -> dict:
    t = thresholds(row, row.get("redecided") or {})
    if variant == "replace":
        t["max_verifier_drop"] = None
    hyp = decide(normalized(row), t["max_logp_drop"], t["max_length_ratio"], 0.0,
                 consensus=0.0 if "consensus" in guard_names(row) else None, verifier_drop=t["max_verifier_drop"],
                 seq_drop=t["max_seq_logp_drop"])
    fired = None
    if hyp != row["text_before"]:
        ev = judge.Evidence(text_before=row["text_before"], text_after=row["hyp_adapted"],
                            tokens_before=row.get("tokens_before") or row["text_before"].split(),
                            tokens_after=row.get("tokens_adapted") or row["hyp_adapted"].split(),
                            seconds=row.get("audio_seconds", 0.0), verifier_text=heard, language=row["language"])
        fired = judge.agreement(ev)
        if fired:
            hyp = row["text_before"]
    return {**row, "method": name, "hyp": hyp, "errors": score(row["ref"], hyp, row["language"])[0],
            "changed": hyp != row["text_before"], "agreement": {"variant": variant, "verifier_text": heard,
                                                                 "fired": fired}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", help="a rows file of the domain benchmark (or of redecide.py)")
    ap.add_argument("--method", required=True)
    ap.add_argument("--as", dest="name", required=True)
    ap.add_argument("--variant", choices=("replace", "add"), required=True,
                    help="replace: agreement instead of the verifier guard; add: after it")
    add_verifier_arguments(ap)
    args = ap.parse_args(argv)
    rows, chosen = read_adapted(args.rows, args.method)
    cache = verifier_texts(chosen, Path(args.cache), args.verifier, args.data)
    new = []
    for r in chosen:
        item = cache.get(_key(r, args.verifier))
        new.append(redecide_with_agreement(r, args.name, args.variant, item["text"] if item else None))
    write_rows(args.out, rows + new)
    moved = sum(n["hyp"] != r["hyp"] for n, r in zip(new, chosen))
    fired = sum(bool(n["agreement"]["fired"]) for n in new)
    print(f"{len(new)} rows of {args.method} re-decided as {args.name} ({args.variant}): agreement fired on {fired}, "
          f"{moved} return another transcript than {args.method}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
