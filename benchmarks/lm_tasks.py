"""Does adapting a language model by entropy minimization answer checkable problems better?

SmolLM2-135M-Instruct (bundled, offline) on the 200 generated problems of :mod:`harness.tasks` (eight
families of small arithmetic and word problems, integer answers, asked after three worked examples).
Per problem, in one process:

* ``greedy``: the unadapted model's greedy answer (the unit of cost);
* ``adapt:<objective>`` for ``em`` (fastem's default), ``entropy``, ``pg`` and ``random`` (the coin-flip
  reward: the control for gains that come from updating at all rather than from the signal):
  ``fastem.adapt`` with ``--steps`` steps of ``--samples`` samples, the gate open (``min_entropy=0``) and
  the default guards; each row keeps the returned answer and the unfiltered adapted one;
* ``self_consistency``: the majority vote over as many answers sampled from the unadapted model
  (``generate``, temperature 1, no top-k/top-p) as adaptation draws (steps x samples).

Rows go to ``--rows`` (JSON lines, one per problem and method, resumable: a row already there for the
same settings is not recomputed).  ``--report`` prints the tables (accuracy, the paired bootstrap of the
difference with greedy, problems fixed and broken, cost in greedy answers) from the rows alone::

    OMP_NUM_THREADS=2 python benchmarks/lm_tasks.py --rows benchmarks/results/lm_tasks_smollm2_rows.jsonl
    python benchmarks/lm_tasks.py --rows benchmarks/results/lm_tasks_smollm2_rows.jsonl --report
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.tasks import extract_answer, majority, messages, paired_accuracy, problems  # noqa: E402

OBJECTIVES = ("em", "entropy", "pg", "random")
METHODS = ("greedy",) + tuple(f"adapt:{o}" for o in OBJECTIVES) + ("self_consistency",)


def settings(args) -> dict:
    return {"model": args.model, "steps": args.steps, "samples": args.samples, "new_tokens": args.new_tokens,
            "lr": args.lr, "seed": args.seed}


def _read(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _self_consistency(model, tok, chat, n: int, new_tokens: int, seed: int) -> list[str]:
    import torch

    from fastem.lm import lm_prompt_ids

    ids = torch.tensor([lm_prompt_ids(tok, chat)])
    torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=n,
                             max_new_tokens=new_tokens, pad_token_id=eos if isinstance(eos, int) else eos[0])
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def run(args) -> int:
    import torch

    import fastem

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    rows_path = Path(args.rows)
    conf = settings(args)
    done = {(r["id"], r["method"]) for r in _read(rows_path) if r.get("settings") == conf}
    todo = problems(args.per_family, args.data_seed)[: args.limit or None]
    if all((p["id"], m) in done for p in todo for m in METHODS):
        print(f"all {len(todo)} problems done in {rows_path}")
        return 0
    model, tok = fastem.load_lm(args.model)
    from tqdm import tqdm

    rows_path.parent.mkdir(parents=True, exist_ok=True)
    with rows_path.open("a") as sink:
        def write(row):
            sink.write(json.dumps(row) + "\n")
            sink.flush()

        for p in tqdm(todo, desc="problems"):
            chat = messages(p["question"])
            base = {"id": p["id"], "family": p["family"], "answer": p["answer"], "settings": conf}
            if (p["id"], "greedy") not in done:
                t0 = time.perf_counter()
                text = fastem.transcribe(model, chat, tokenizer=tok, max_new_tokens=args.new_tokens)
                got = extract_answer(text)
                write({**base, "method": "greedy", "text": text, "pred": got, "correct": got == p["answer"],
                       "seconds": time.perf_counter() - t0})
            for objective in OBJECTIVES:
                method = f"adapt:{objective}"
                if (p["id"], method) in done:
                    continue
                t0 = time.perf_counter()
                r = fastem.adapt(model, chat, tokenizer=tok, steps=args.steps, num_samples=args.samples,
                                 max_new_tokens=args.new_tokens, lr=args.lr, seed=args.seed, min_entropy=0.0,
                                 objective=objective)
                seconds = time.perf_counter() - t0
                got, raw = extract_answer(r.text), extract_answer(r.text_adapted)
                write({**base, "method": method, "text": r.text, "text_before": r.text_before,
                       "text_adapted": r.text_adapted, "pred": got, "correct": got == p["answer"],
                       "pred_adapted": raw, "correct_adapted": raw == p["answer"], "guard": r.guard,
                       "entropy": [h["entropy"] for h in r.history], "sample_tokens": r.sample_tokens,
                       "seconds": seconds})
            if (p["id"], "self_consistency") not in done:
                t0 = time.perf_counter()
                texts = _self_consistency(model, tok, chat, args.steps * args.samples, args.new_tokens, args.seed)
                answers = [extract_answer(t) for t in texts]
                got = majority(answers)
                write({**base, "method": "self_consistency", "texts": texts, "answers": answers, "pred": got,
                       "correct": got == p["answer"], "seconds": time.perf_counter() - t0})
    return 0


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def report(rows: list[dict]) -> str:
    """The markdown tables of the task benchmark, from its rows (the newest settings in the file)."""
    if not rows:
        return "no rows"
    conf = rows[-1]["settings"]
    rows = [r for r in rows if r["settings"] == conf]
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["id"]] = r
    ids = sorted(set.intersection(*(set(v) for v in by.values())))
    greedy = [by["greedy"][i]["correct"] for i in ids]
    g_sec = sum(by["greedy"][i]["seconds"] for i in ids)
    lines = [f"{len(ids)} problems (every method), settings {json.dumps(conf)}", "",
             "| method | accuracy | vs greedy, points [95% CI] | fixed / broken | cost (greedy answers) |",
             "|---|---|---|---|---|"]

    def line(name, correct, seconds):
        c = paired_accuracy(correct, greedy)
        cost = seconds / g_sec if g_sec else float("nan")
        lines.append(f"| {name} | {100 * c['accuracy']:.1f}% | {_pts(c['diff'])} [{_pts(c['ci_low'])}, "
                     f"{_pts(c['ci_high'])}] | {c['fixed']} / {c['broken']} | {cost:.1f} |")

    lines.append(f"| greedy | {100 * sum(greedy) / len(ids):.1f}% | | | 1.0 |")
    for m in METHODS[1:]:
        if m not in by:
            continue
        rs = [by[m][i] for i in ids]
        sec = sum(r["seconds"] for r in rs)
        if m.startswith("adapt:"):
            line(f"{m} (returned)", [r["correct"] for r in rs], sec)
            line(f"{m} (unfiltered)", [r["correct_adapted"] for r in rs], sec)
        else:
            line(m, [r["correct"] for r in rs], sec)
    families = sorted({by["greedy"][i]["family"] for i in ids})
    lines += ["", "| family | " + " | ".join(m for m in METHODS if m in by) + " |",
              "|---|" + "---|" * sum(m in by for m in METHODS)]
    for f in families:
        fi = [i for i in ids if by["greedy"][i]["family"] == f]
        cells = []
        for m in METHODS:
            if m in by:
                key = "correct_adapted" if m.startswith("adapt:") else "correct"
                cells.append(f"{100 * sum(by[m][i][key] for i in fi) / len(fi):.0f}%")
        lines.append(f"| {f} ({len(fi)}) | " + " | ".join(cells) + " |")
    lines += ["", "(the family table counts the unfiltered adapted answers)", "",
              "| objective | mean token entropy, first step -> last | guard rejected |", "|---|---|---|"]
    for o in OBJECTIVES:
        m = f"adapt:{o}"
        if m in by:
            rs = [by[m][i] for i in ids]
            first = sum(r["entropy"][0] for r in rs) / len(rs)
            last = sum(r["entropy"][-1] for r in rs) / len(rs)
            lines.append(f"| {o} | {first:.3f} -> {last:.3f} | {sum(r['guard'] is not None for r in rs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", required=True)
    ap.add_argument("--report", action="store_true", help="print the tables from the rows and stop")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--per-family", type=int, default=25)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="only the first N problems (0: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.report:
        print(report(_read(Path(args.rows))))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
