#!/usr/bin/env python
"""A stream of real utterances from one domain: WER with no adaptation, episodic ``adapt`` and a
continual :class:`fastem.Adapter`, how often the Adapter rolls back and resets, and that nothing
becomes non-finite.

    OMP_NUM_THREADS=2 OMP_WAIT_POLICY=PASSIVE python benchmarks/stream.py --model tiny.en --n 200 \\
        --modes none,continual:steps=2,episodic --out benchmarks/results/stream_tinyen_rows.jsonl

The stream: the first ``--n`` speechocean762 utterances (Mandarin-L1 children and adults reading
English) in the benchmark's fixed pseudo-random order, each mixed with real kitchen noise
(``doing_the_dishes``; ``--noise``) at ``--snr`` dB, as the domain benchmark mixes it.  With ``--data`` set to
the CONFIRM set and a CONFIRM noise, the same stream is built from held-out speakers and noise.  A mode is ``none``,
``episodic`` or ``continual``, optionally with AdaptConfig overrides (``continual:steps=2,lr=1e-3``).

Rows (one JSON object per utterance and mode) are appended to ``--out`` as they finish, so a run
that stops resumes where it stopped: episodic rows are independent; the continual adapter's state is
saved beside the rows after every utterance (``<out>.<mode>.pt``) and loaded on resume.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_REPO))


def _split(text: str) -> list[str]:
    """Split at the commas outside brackets (a JSON list value keeps its own commas)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p]


def parse_mode(spec: str) -> tuple[str, str, dict]:
    """``"continual:steps=2,lr=1e-3"`` -> ``("continual:steps=2,lr=1e-3", "continual", {...})``; a value may be
    JSON, lists included (``guards=["empty","length"]``)."""
    kind, _, rest = spec.partition(":")
    if kind not in ("none", "episodic", "continual"):
        raise SystemExit(f"unknown mode {kind!r} (none, episodic, continual)")
    overrides = {}
    for item in _split(rest):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return spec, kind, overrides


def parse_modes(text: str) -> list[tuple[str, str, dict]]:
    """``"none,continual:steps=2,lr=1e-3,episodic"``: a new mode starts at each known kind."""
    specs: list[str] = []
    for part in _split(text):
        if part.split(":")[0] in ("none", "episodic", "continual") or not specs:
            specs.append(part)
        else:
            specs[-1] += "," + part
    return [parse_mode(spec) for spec in specs]


def build_stream(data_dir: Path, n: int, snr: float, noise: str = "doing_the_dishes"):
    from harness.data import select_utterances
    from harness.domains import Domain, make_noise_transform

    domain = Domain(f"stream_nonnative_{noise}_{snr:g}db", ("speechocean762",), "en", "noise",
                    f"speechocean762 with {noise} at {snr:g} dB", f"add_noise(noise={noise},snr_db={snr:g})",
                    make_noise_transform(noise, snr), resources=(("noise", noise),))
    utts = select_utterances(data_dir, domain.corpora, n)
    if len(utts) < n:
        raise SystemExit(f"only {len(utts)} utterances in speechocean762, asked for {n}")
    return domain, utts


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def finite_model(model) -> bool:
    import torch

    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def run_mode(spec, kind, overrides, model, processor, domain, utts, data_dir, out: Path, done: set, batch_size: int,
             model_name: str = ""):
    import torch
    from tqdm import tqdm

    import fastem

    todo = [(i, u) for i, u in enumerate(utts) if (spec, i) not in done]
    if not todo:
        return
    bar = tqdm(total=len(utts), initial=len(utts) - len(todo), desc=spec, file=sys.stderr)

    def evidence(r) -> dict:
        """What an offline guard study needs: the step-0 and last-step entropies and the source scores."""
        steps = [h for h in r.history if not h.get("skipped")]
        return {"entropy_first": steps[0]["entropy"] if steps else None,
                "entropy_last": steps[-1]["entropy"] if steps else None,
                "scores": {k: v for k, v in r.scores.items() if isinstance(v, (int, float))}}

    def row(i, u, text, before, seconds, **extra):
        return {"model": model_name, "domain": domain.name, "mode": spec, "index": i, "utt_id": u.id,
                "reference": u.text, "text": text,
                "text_before": before, "seconds": round(seconds, 3), **extra}

    if kind == "none":
        for i, u in todo:
            t0 = time.perf_counter()
            text = fastem.transcribe(model, domain.load(u, data_dir=data_dir), processor=processor, language="en")
            append(out, row(i, u, text, text, time.perf_counter() - t0))
            bar.update()
    elif kind == "episodic":
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            t0 = time.perf_counter()
            results = fastem.adapt_batch(model, [domain.load(u, data_dir=data_dir) for _, u in chunk],
                                         processor=processor, language="en", **overrides)
            seconds = (time.perf_counter() - t0) / len(chunk)
            for (i, u), r in zip(chunk, results):
                append(out, row(i, u, r.text, r.text_before, seconds, text_adapted=r.text_adapted, guard=r.guard,
                                guard_reason=r.guard_reason, **evidence(r)))
            bar.update(len(chunk))
    else:
        ckpt = out.with_name(out.name + "." + spec.replace(":", "_").replace(",", "_").replace("=", "") + ".pt")
        with fastem.Adapter(model, processor, **overrides) as adapter:
            first = todo[0][0]
            if first > 0:
                if not ckpt.exists():
                    raise SystemExit(f"{spec}: {first} rows exist but the adapter state {ckpt} is missing")
                state = torch.load(ckpt, weights_only=False)
                if state["index"] != first - 1:
                    raise SystemExit(f"{spec}: adapter state is after utterance {state['index']}, rows stop at {first - 1}")
                adapter.load_state_dict(state["adapter"])
            for i, u in todo:
                t0 = time.perf_counter()
                r = adapter.adapt(domain.load(u, data_dir=data_dir), language="en")
                seconds = time.perf_counter() - t0
                state = adapter.state_dict()
                values_finite = all(bool(torch.isfinite(v).all()) for v in state["values"])
                append(out, row(i, u, r.text, r.text_before, seconds, text_adapted=r.text_adapted, guard=r.guard,
                                guard_reason=r.guard_reason, reset=bool(r.scores.get("reset", False)),
                                resets=adapter.resets, rollbacks=adapter.rollbacks, finite=values_finite,
                                **evidence(r)))
                torch.save({"index": i, "adapter": state}, ckpt)
                bar.update()
        if not finite_model(model):
            raise SystemExit("the model holds non-finite values after the Adapter closed")
    bar.close()


def summarize(rows: list[dict], n: int, language: str = "en") -> str:
    """The table: WER overall and by half, the change against ``none`` with its paired 95% bootstrap interval
    (utterances resampled, ``harness.report.paired_comparison``), worse / better, and the Adapter's counters."""
    from harness.report import paired_comparison

    from fastem.text import word_errors

    by_mode: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["index"]] = r
    errs = {m: {i: word_errors(r["reference"], r["text"], language) for i, r in rs.items()} for m, rs in by_mode.items()}
    base = errs.get("none", {})
    lines = ["| mode | utterances | WER | first half | second half | rel. vs none | worse / better | guard fired | "
             "rollbacks | resets | non-finite | s / utt |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def wer_of(e, idx):
        num = sum(e[i][0] for i in idx)
        den = sum(e[i][1] for i in idx)
        return num / den if den else float("nan")

    for mode, rs in by_mode.items():
        idx = sorted(rs)
        e = errs[mode]
        w = wer_of(e, idx)
        half = n // 2
        first = wer_of(e, [i for i in idx if i < half])
        second = wer_of(e, [i for i in idx if i >= half])
        common = [i for i in idx if i in base]
        # over the rows both have (a partial run's rows are a prefix of the stream)
        rel = (wer_of(e, common) / wer_of(base, common) - 1) if common and mode != "none" else float("nan")
        p = None
        if common and mode != "none":  # the paired bootstrap of the domain benchmark, over the stream's utterances
            pairs = [{"method": m, "domain": "stream", "utt_id": i, "errors": src[i][0], "ref_words": src[i][1]}
                     for m, src in (("none", base), (mode, e)) for i in common]
            p = paired_comparison(pairs, mode)
        ci = f" [{p['ci_low']:+.1%}, {p['ci_high']:+.1%}]" if p and p["ci_low"] is not None else ""
        worse, better = (p["worse"], p["better"]) if p else (0, 0)
        guards = sum(1 for i in idx if rs[i].get("guard"))
        last = rs[idx[-1]]
        nonfinite = sum(1 for i in idx if rs[i].get("finite") is False)
        secs = sum(rs[i]["seconds"] for i in idx) / len(idx)
        lines.append(f"| {mode} | {len(idx)} | {w:.1%} | {first:.1%} | {second:.1%} | "
                     f"{'' if mode == 'none' else f'{rel:+.1%}{ci}'} | {'' if mode == 'none' else f'{worse} / {better}'} | "
                     f"{guards if mode != 'none' else ''} | {last.get('rollbacks', '')} | {last.get('resets', '')} | "
                     f"{nonfinite if 'finite' in last else ''} | {secs:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, block: int = 20, language: str = "en") -> None:
    """WER per block of ``block`` consecutive utterances, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastem.text import word_errors

    by_mode: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_mode.setdefault(r["mode"], {})[r["index"]] = r
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for mode, rs in by_mode.items():
        xs, ys = [], []
        for lo in range(0, max(rs) + 1, block):
            idx = [i for i in range(lo, lo + block) if i in rs]
            errs = [word_errors(rs[i]["reference"], rs[i]["text"], language) for i in idx]
            words = sum(n for _, n in errs)
            if words:
                xs.append(lo + block / 2)
                ys.append(100 * sum(e for e, _ in errs) / words)
        ax.plot(xs, ys, marker="o", label=mode)
    ax.set_xlabel(f"position in the stream (blocks of {block} utterances)")
    ax.set_ylabel("WER %")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--snr", type=float, default=5.0)
    ap.add_argument("--noise", default="doing_the_dishes",
                    help="the noise's id in <data>/noise (a CONFIRM stream: --data ../shared/confirm --noise sb_noise1)")
    ap.add_argument("--modes", default="none,continual:steps=2,episodic")
    ap.add_argument("--batch-size", type=int, default=8, help="episodic: utterances adapted at once")
    ap.add_argument("--data", default=str(_REPO.parent / "shared" / "data"))
    ap.add_argument("--out", default="out/stream/rows.jsonl")
    ap.add_argument("--report-only", action="store_true", help="print the table from the rows and stop")
    ap.add_argument("--plot", default=None, help="write WER per block of 20 utterances to this PNG")
    args = ap.parse_args(argv)
    out = Path(args.out)
    modes = parse_modes(args.modes)
    if not args.report_only:
        import fastem

        data_dir = Path(args.data)
        domain, utts = build_stream(data_dir, args.n, args.snr, args.noise)
        model, processor = fastem.load_whisper(args.model)
        for spec, kind, overrides in modes:
            done = {(r["mode"], r["index"]) for r in read_rows(out)}
            run_mode(spec, kind, overrides, model, processor, domain, utts, data_dir, out, done, args.batch_size,
                     model_name=args.model)
    print(summarize(read_rows(out), args.n))
    if args.plot:
        plot(read_rows(out), args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
