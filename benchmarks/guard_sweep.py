#!/usr/bin/env python
"""Re-decide the guards and the confidence gate offline from result rows: WER and harm for other settings.

    python benchmarks/guard_sweep.py benchmarks/results/screen_base_rows.jsonl --method fastem
    python benchmarks/guard_sweep.py benchmarks/results/stream_tinyen_rows.jsonl --method episodic \\
        --gates 0,0.3,0.5,0.8
    python benchmarks/guard_sweep.py out/dev_tinyen_scores/rows.jsonl --method fastem --consensus -0.1,0,0.1,0.2
    python benchmarks/guard_sweep.py benchmarks/results/dev_base_rows.jsonl --method fastem --tradeoff 1.5,0.5,0.2,0
    python benchmarks/guard_sweep.py benchmarks/results/dev_base_rows.jsonl --method fastem --seq-drops 2,1,0.5,0
    python benchmarks/guard_sweep.py benchmarks/results/dev_tinyen_rows.jsonl --method fastem --backfill ../shared/data \
        --verifier base --save out/tinyen_verified.jsonl --verifier-drops 0,0.1,0.2
    python benchmarks/guard_sweep.py benchmarks/results/dev_tinyen_rows.jsonl --method fastem_verifier_base \
        --verifier-drops 0,0.1,0.2,0.3 --seq-drops 0,1,2,3,4,5 --grid      # the two guards added last, together
    python benchmarks/guard_sweep.py benchmarks/results/dev_base_rows.jsonl --method fastem \
        --verifier-drops 0,0.05,0.1,0.2,0.3,0.5 --seq-drops 0,0.5,1,2,3,5 --lodo   # how far choosing them fits DEV
    python benchmarks/guard_sweep.py benchmarks/results/dev_base_t07_seeds_rows.jsonl --method fastem_t07+fastem_t07_s1 \
        --gates 1.0,1.2,1.4,1.6,2.0 --lodo --max-worse 0.05 --drops none --ratios none   # the gate, two draws pooled

The "off" rows are the decisions the rows were written with (every default but the likelihood and the
verifier guard, which are swept here).

Every adapted row records the adapted transcript whether or not a guard fired (``hyp_adapted`` in the
domain benchmark's rows, ``text_adapted`` in the stream's), the unadapted one (``text_before``) and the
evidence: the source model's mean log-probs of both (``scores.source_before/after``) and the mean
next-token entropy of the unadapted greedy transcript (``scores.entropy_before``).  So the "confidence"
threshold, the text guards (empty, non-speech, repetition, length: on the token ids where rows carry
them, ``tokens_before`` / ``tokens_adapted``, else on words) and the
``min_entropy`` gate (below it the unadapted transcript is kept and adaptation is not run at all) can be
re-applied without re-running adaptation.  Rows written before ``entropy_before`` was recorded get it
with ``--backfill DATA_DIR`` (one greedy transcription per utterance with the row's model and domain).

Prints, per setting: corpus WER over the rows, the macro WER over domains (when rows name several),
relative changes against the unadapted transcripts, utterances worse / better, how often the unadapted
transcript was kept, and the share of utterances that would be adapted (the gate's cost).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastem import AdaptConfig, judge  # noqa: E402
from harness.report import score  # noqa: E402


def normalized(row: dict) -> dict:
    """The domain benchmark's and the stream's rows under one set of names."""
    return {"ref": row.get("ref", row.get("reference")), "before": row["text_before"],
            "adapted": row.get("hyp_adapted", row.get("text_adapted")), "scores": row.get("scores") or {},
            "language": row.get("language", "en"), "domain": row.get("domain", ""),
            "seconds": row.get("audio_seconds", 0.0),
            # token ids where the row has them (the library's length and repetition guards count tokens);
            # older rows have words only, so a few decisions can differ from the library's by a word count
            "tokens_before": row.get("tokens_before"), "tokens_adapted": row.get("tokens_adapted")}


def decide(row: dict, max_drop: float | None, max_ratio: float | None, min_entropy: float = 0.0,
           consensus: float | None = None, verifier_drop: float | None = None,
           seq_drop: float | None = None) -> str:
    """The transcript the guards would return.  ``consensus``: also require the adapted model's preference for
    its transcript to exceed the source model's for its own by this margin (0: the library's ``consensus``
    guard); rows without the adapted model's scores keep the adapted transcript.  ``verifier_drop``: the
    ``verifier`` guard at this threshold, on the rows' ``scores.verifier_before/after`` (``--verifier``).
    ``seq_drop``: the ``likelihood`` guard (``max_seq_logp_drop``); it needs the rows' token ids (the total
    log-prob is the mean times the token count), rows without them keep their decision."""
    before, after, s = row["before"], row["adapted"], row["scores"]
    if min_entropy > 0 and judge.gate(s["entropy_before"], "fallback_before" in s, min_entropy) is not None:
        return before  # the library's gate: a transcript that needed Whisper's fallback adapts whatever its entropy
    exact = row.get("tokens_before") is not None and row.get("tokens_adapted") is not None
    ev = judge.Evidence(text_before=before, text_after=after,
                         tokens_before=row["tokens_before"] if exact else before.split(),
                         tokens_after=row["tokens_adapted"] if exact else after.split(), seconds=row["seconds"],
                         source_logp_before=s.get("source_before"), source_logp_after=s.get("source_after"),
                         adapted_logp_before=s.get("adapted_before"), adapted_logp_after=s.get("adapted_after"),
                         max_logp_drop=max_drop if max_drop is not None else float("inf"),
                         max_length_ratio=max_ratio if max_ratio is not None else float("inf"),
                         consensus_margin=consensus or 0.0, verifier_logp_before=s.get("verifier_before"),
                         verifier_logp_after=s.get("verifier_after"),
                         max_verifier_drop=verifier_drop if verifier_drop is not None else float("inf"),
                         max_seq_logp_drop=seq_drop if exact else None)
    names = ("empty", "non_speech", "repetition") + (("length",) if max_ratio else ()) + (
        ("confidence",) if max_drop is not None else ()) + (("consensus",) if consensus is not None else ()) + (
        ("verifier",) if verifier_drop is not None else ()) + (("likelihood",) if seq_drop is not None else ())
    return before if judge.check(ev, names) else after


def library_rule(lib: AdaptConfig, **override):
    """``decide`` with the library's thresholds (``lib``: the gate, ``confidence``, ``length``, ``consensus``), any of
    them replaced by ``override`` (``decide``'s keywords: ``max_drop``, ``min_entropy``, ``verifier_drop``, ...)."""
    kw = dict(max_drop=lib.max_logp_drop, max_ratio=lib.max_length_ratio, min_entropy=lib.gate_entropy, consensus=0.0)
    kw.update(override)
    return lambda r: decide(r, **kw)


def _audio(r: dict, data_dir: str | None = None):
    """The row's utterance as the domain benchmark made it (16 kHz mono), read from ``data_dir`` (None: the
    default directory of the data set the row's domain reads, DEV or CONFIRM)."""
    from harness.data import default_data_dir, load_manifest
    from harness.domains import get_domain

    dom = get_domain(r["domain"])
    data_dir = data_dir or default_data_dir(dom.data)
    utt = next((u for u in load_manifest(data_dir, r["corpus"]) if u.utt_id == r["utt_id"]), None)
    if utt is None:
        raise KeyError(f"{r['utt_id']} (domain {r['domain']}, data set {dom.data!r}) is not in {data_dir}: "
                       f"is it the {dom.data!r} data set?")
    return dom.load(utt, data_dir=data_dir)


def backfill(rows: list[dict], raw: list[dict], data_dir: str) -> None:
    """Add ``scores.entropy_before`` where it is missing: a greedy pass with the row's model and audio."""
    import fastem

    models: dict = {}
    for row, r in zip(rows, raw):
        if "entropy_before" in row["scores"]:
            continue
        name = r["model"]
        if name not in models:
            models[name] = fastem.load_whisper(name)
        model, processor = models[name]
        audio = _audio(r, data_dir)
        res = fastem.adapt(model, audio, processor=processor, language=r.get("language"), steps=0, guards=())
        if res.text_before != row["before"]:
            print(f"note: {r['domain']}/{r['utt_id']}: the greedy transcript differs from the row's", file=sys.stderr)
        row["scores"] = {**row["scores"], "entropy_before": res.scores["entropy_before"]}


def score_verifier(rows: list[dict], raw: list[dict], data_dir: str, name: str) -> int:
    """Add ``scores.verifier_before/after`` (the library's :func:`fastem.verifier.verifier_scores` under the
    checkpoint ``name``) to every row whose adapted transcript differs from the unadapted one; returns how
    many rows were scored.  Exactly what ``AdaptConfig(verifier=name)`` computes: the verifier never changes
    the adaptation, only the choice between the two transcripts."""
    import torch

    from fastem.verifier import load_verifier, verifier_scores

    model, processor = load_verifier(name, torch.device("cpu"))
    done = 0
    for row, r in zip(rows, raw):
        if row["adapted"] == row["before"] or "verifier_before" in row["scores"]:
            continue
        vote = verifier_scores(model, processor, [_audio(r, data_dir)], [[row["before"], row["adapted"]]],
                               [row["language"]])[0]
        if "verifier_before" in vote:
            row["scores"] = {**row["scores"], **vote}
            done += 1
    return done


def evaluate(rows: list[dict], base: list[tuple[int, int]], choose) -> dict:
    errs, worse, better, kept = 0, 0, 0, 0
    per_domain: dict[str, list[int]] = {}
    for r, (eb, n) in zip(rows, base):
        text = choose(r)
        kept += text == r["before"] and r["adapted"] != r["before"]
        e, _ = score(r["ref"], text, r["language"])
        errs += e
        worse += e > eb
        better += e < eb
        d = per_domain.setdefault(r["domain"], [0, 0, 0])
        d[0] += e
        d[1] += eb
        d[2] += n
    macro = sum(d[0] / d[2] for d in per_domain.values()) / len(per_domain)
    macro0 = sum(d[1] / d[2] for d in per_domain.values()) / len(per_domain)
    return {"errors": errs, "worse": worse, "better": better, "kept": kept, "macro": macro, "macro0": macro0,
            "domains": len(per_domain)}


def leave_one_domain_out(rows: list[dict], base: list[tuple[int, int]], settings: dict, default,
                         max_worse: float | None = None) -> dict:
    """How well choosing a setting on DEV transfers to a domain it was not chosen on.

    ``settings``: label -> the decision function of one setting.  The rule that chooses, on a set of
    domains: the lowest macro WER over them, among the settings that leave at most ``max_worse`` of their
    utterances worse than unadapted (None: no such bound; when none qualifies, the fewest worse); ties go
    to the earlier label.  For each domain the rule chooses on the *other* domains and the choice is judged
    on it: that is an honest estimate of the rule, against the choice made on every domain (in-sample,
    optimistic by construction) and ``default`` (a label).  Per domain: the choice, its WER there, the
    default's and the in-sample choice's there."""
    unadapted: dict[str, list[int]] = {}  # domain -> [errors, words]
    for r, (eb, n) in zip(rows, base):
        u = unadapted.setdefault(r["domain"], [0, 0])
        u[0], u[1] = u[0] + eb, u[1] + n
    per: dict[str, dict[str, list[int]]] = {}  # label -> domain -> [errors, words, worse, utterances]
    for label, choose in settings.items():
        per[label] = {}
        for r, (eb, n) in zip(rows, base):
            e, _ = score(r["ref"], choose(r), r["language"])
            d = per[label].setdefault(r["domain"], [0, 0, 0, 0])
            d[0], d[1], d[2], d[3] = d[0] + e, d[1] + n, d[2] + (e > eb), d[3] + 1
    domains = sorted(unadapted)
    if len(domains) < 2:
        raise ValueError(f"leaving one domain out needs at least two domains, the rows have {len(domains)}")

    def wer(label, d):
        return per[label][d][0] / per[label][d][1]

    def macro(label, doms):
        return sum(wer(label, d) for d in doms) / len(doms)

    def worse(label, doms):
        return sum(per[label][d][2] for d in doms) / sum(per[label][d][3] for d in doms)

    def rule(doms):
        ok = [label for label in settings if max_worse is None or worse(label, doms) <= max_worse]
        if not ok:
            return min(settings, key=lambda label: worse(label, doms))
        return min(ok, key=lambda label: macro(label, doms))

    chosen = {d: rule([o for o in domains if o != d]) for d in domains}
    best = rule(domains)
    macro0 = sum(unadapted[d][0] / unadapted[d][1] for d in domains) / len(domains)
    n = sum(per[default][d][3] for d in domains)
    return {"domains": domains, "chosen": chosen, "best": best, "macro0": macro0,
            "lodo": sum(wer(chosen[d], d) for d in domains) / len(domains),
            "lodo_worse": sum(per[chosen[d]][d][2] for d in domains) / n,
            "in_sample": macro(best, domains), "in_sample_worse": worse(best, domains),
            "default": macro(default, domains), "default_worse": worse(default, domains), "max_worse": max_worse,
            "per_domain": {d: {"chosen": chosen[d], "wer_chosen": wer(chosen[d], d), "wer_default": wer(default, d),
                               "wer_best": wer(best, d), "wer_unadapted": unadapted[d][0] / unadapted[d][1]}
                           for d in domains}}


def lodo_markdown(res: dict, default: str) -> str:
    m0 = res["macro0"]
    bound = "no bound on harm" if res["max_worse"] is None else f"at most {res['max_worse']:.0%} of utterances worse"
    lines = [f"| choice of the setting (rule: lowest macro WER, {bound}) | macro WER | vs unadapted | "
             "% worse |", "|---|---:|---:|---:|",
             f"| unadapted | {m0:.2%} | | |",
             f"| the default ({default}) | {res['default']:.2%} | {res['default'] / m0 - 1:+.1%} | "
             f"{res['default_worse']:.1%} |",
             f"| chosen on all of these domains ({res['best']}): in-sample | {res['in_sample']:.2%} | "
             f"{res['in_sample'] / m0 - 1:+.1%} | {res['in_sample_worse']:.1%} |",
             f"| chosen without the domain it is judged on (leave one domain out) | {res['lodo']:.2%} | "
             f"{res['lodo'] / m0 - 1:+.1%} | {res['lodo_worse']:.1%} |", "",
             "| held-out domain | chosen on the others | WER there | default there | in-sample choice there | unadapted |",
             "|---|---|---:|---:|---:|---:|"]
    for d, p in res["per_domain"].items():
        lines.append(f"| {d} | {p['chosen']} | {p['wer_chosen']:.2%} | {p['wer_default']:.2%} | {p['wer_best']:.2%} | "
                     f"{p['wer_unadapted']:.2%} |")
    return "\n".join(lines)


def tradeoff(rows: list[dict], base: list[tuple[int, int]], drops: list[float]) -> list[dict]:
    """The harm / gain trade-off: every library default (gate, length, consensus) with the confidence guard's
    ``max_logp_drop`` at each of ``drops`` (0: the source model must not find the adapted transcript any less
    likely than its own greedy one)."""
    lib = AdaptConfig(num_beams=1)  # the greedy rows these sweeps read
    return [{"drop": drop, **evaluate(rows, base, library_rule(lib, max_drop=drop))} for drop in drops]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", nargs="+")
    ap.add_argument("--method", required=True,
                    help="rows whose 'method' (bench) or 'mode' (stream) is this; A+B: the rows of several methods "
                         "together (for example one recipe's two draws of the sampler: a domain holds both draws' "
                         "utterances, a share of utterances worse counts utterance-draws)")
    ap.add_argument("--drops", default="none,0.5,1.0,1.5,2.0,3.0")
    ap.add_argument("--ratios", default="none,1.5,2.0")
    ap.add_argument("--gates", default="", help="min_entropy values to sweep (with the default guards); with --lodo: "
                                                "the gate chosen on all domains but one, judged on that one")
    ap.add_argument("--consensus", default="", metavar="MARGINS",
                    help="margins of the consensus rule to sweep (with the default guards and gate), e.g. -0.1,0,0.1")
    ap.add_argument("--tradeoff", default="", metavar="DROPS",
                    help="max_logp_drop values to sweep with every other default (gate, length, consensus)")
    ap.add_argument("--seq-drops", default="", metavar="DROPS",
                    help="max_seq_logp_drop values (the likelihood guard, nats per transcript) to sweep with every "
                         "other default (rows need token ids)")
    ap.add_argument("--verifier", metavar="NAME", default=None,
                    help="with --backfill: score the changed rows under this second checkpoint (AdaptConfig.verifier)")
    ap.add_argument("--verifier-drops", default="", metavar="DROPS",
                    help="max_verifier_drop values to sweep with every other default (rows need verifier scores)")
    ap.add_argument("--grid", action="store_true",
                    help="with --verifier-drops and --seq-drops: every pair of the two thresholds (the library's "
                         "default is the pair 0.1, 2)")
    ap.add_argument("--lodo", action="store_true",
                    help="with --verifier-drops and --seq-drops (or --gates): choose the pair (the gate) on all domains "
                         "but one, judge it on that one, for each domain (leave one domain out)")
    ap.add_argument("--max-worse", type=float, default=None, metavar="SHARE",
                    help="with --lodo: the rule chooses among the settings that leave at most this share of utterances "
                         "worse (e.g. 0.05)")
    ap.add_argument("--backfill", metavar="DATA_DIR", default=None,
                    help="compute scores.entropy_before where rows lack it (needs the models and the data)")
    ap.add_argument("--save", default=None, help="with --backfill: write the completed rows here")
    args = ap.parse_args(argv)
    raw = [json.loads(line) for f in args.rows for line in open(f) if line.strip()]
    methods = set(args.method.split("+"))
    raw = [r for r in raw if ({r.get("method"), r.get("mode")} & methods)
           and r.get("hyp_adapted", r.get("text_adapted")) is not None]
    if not raw:
        print(f"no rows of method {args.method!r} with an adapted transcript", file=sys.stderr)
        return 1
    rows = [normalized(r) for r in raw]
    if len({r.get("model") for r in raw}) > 1:  # rows of several checkpoints: a domain is a (checkpoint, domain)
        for row, r in zip(rows, raw):
            row["domain"] = f"{r.get('model')}/{row['domain']}"
    if args.verifier and not args.backfill:
        ap.error("--verifier needs --backfill DATA_DIR (the audio)")
    if args.backfill:
        backfill(rows, raw, args.backfill)
        if args.verifier:
            print(f"verifier {args.verifier}: scored {score_verifier(rows, raw, args.backfill, args.verifier)} rows",
                  file=sys.stderr)
        if args.save:
            with open(args.save, "w") as f:
                for r, row in zip(raw, rows):
                    f.write(json.dumps({**r, "scores": row["scores"]}) + "\n")
    lib = AdaptConfig(num_beams=1)  # the library's thresholds for greedy rows, for the gate and consensus sweeps
    base = [score(r["ref"], r["before"], r["language"]) for r in rows]
    e0 = sum(e for e, _ in base)
    print(f"{len(rows)} rows of {args.method}; unadapted errors {e0} / {sum(n for _, n in base)} words")
    print("| max_logp_drop | max_length_ratio | errors | rel. change | worse / better | kept unadapted |\n"
          "|---|---|---:|---:|---:|---:|")
    for d in args.drops.split(","):
        for q in args.ratios.split(","):
            drop = None if d == "none" else float(d)
            ratio = None if q == "none" else float(q)
            ev = evaluate(rows, base, lambda r: decide(r, drop, ratio))
            print(f"| {d} | {q} | {ev['errors']} | {ev['errors'] / e0 - 1:+.1%} | {ev['worse']} / {ev['better']} | "
                  f"{ev['kept']} |")
    if args.gates:
        missing = sum("entropy_before" not in r["scores"] for r in rows)
        if missing:
            print(f"{missing} rows lack scores.entropy_before: pass --backfill DATA_DIR", file=sys.stderr)
            return 1
        print("\n| min_entropy | adapted | errors | rel. change | macro WER | rel. macro | worse / better |\n"
              "|---:|---:|---:|---:|---:|---:|---:|")
        def gated(gate):  # every guard of the library's default but likelihood, which is not one of them
            return library_rule(lib, min_entropy=gate, verifier_drop=lib.max_verifier_drop)

        for g in args.gates.split(","):
            gate = float(g)
            ev = evaluate(rows, base, gated(gate))
            share = sum(r["scores"]["entropy_before"] >= gate for r in rows) / len(rows)
            print(f"| {gate:g} | {share:.0%} | {ev['errors']} | {ev['errors'] / e0 - 1:+.1%} | {ev['macro']:.2%} | "
                  f"{ev['macro'] / ev['macro0'] - 1:+.1%} | {ev['worse']} / {ev['better']} |")
        if args.lodo:
            settings = {f"gate {float(g):g}": gated(float(g)) for g in args.gates.split(",")}
            default = f"gate {lib.gate_entropy:g}"
            if default not in settings:
                ap.error(f"--lodo: the gates must hold the default ({lib.gate_entropy:g})")
            print("\n" + lodo_markdown(leave_one_domain_out(rows, base, settings, default, args.max_worse), default))
    if args.consensus:
        scored = sum("adapted_after" in r["scores"] for r in rows)
        print(f"\n{scored} of {len(rows)} rows have the adapted model's scores (the others keep their decision)")
        print("| consensus margin | errors | rel. change | macro WER | rel. macro | worse / better | kept unadapted |\n"
              "|---:|---:|---:|---:|---:|---:|---:|")
        for m in ["off"] + args.consensus.split(","):
            margin = None if m == "off" else float(m)
            ev = evaluate(rows, base, library_rule(lib, consensus=margin))
            print(f"| {m} | {ev['errors']} | {ev['errors'] / e0 - 1:+.1%} | {ev['macro']:.2%} | "
                  f"{ev['macro'] / ev['macro0'] - 1:+.1%} | {ev['worse']} / {ev['better']} | {ev['kept']} |")
    full = ("errors | rel. change | macro WER | rel. macro | worse / better | % worse | kept unadapted |\n"
            "|---:|---:|---:|---:|---:|---:|---:|---:|")

    def line(label, ev):
        return (f"| {label} | {ev['errors']} | {ev['errors'] / e0 - 1:+.1%} | {ev['macro']:.2%} | "
                f"{ev['macro'] / ev['macro0'] - 1:+.1%} | {ev['worse']} / {ev['better']} | "
                f"{ev['worse'] / len(rows):.1%} | {ev['kept']} |")

    def sweep(option: str, values: str, key: str, have: int, what: str) -> None:
        """One threshold swept on top of every default (gate, length, confidence, consensus)."""
        print(f"\n{have} of {len(rows)} rows have {what} (the others keep their decision)")
        print(f"| {option} (with every default) | " + full)
        for d in ["off"] + values.split(","):
            value = None if d == "off" else float(d)
            print(line(d, evaluate(rows, base, library_rule(lib, **{key: value}))))

    if args.verifier_drops:
        sweep("max_verifier_drop", args.verifier_drops, "verifier_drop",
              sum("verifier_before" in r["scores"] for r in rows), "the verifier's scores")
    if args.seq_drops:
        sweep("max_seq_logp_drop", args.seq_drops, "seq_drop",
              sum(r.get("tokens_before") is not None and r.get("tokens_adapted") is not None for r in rows),
              "token ids")
    if args.grid and args.verifier_drops and args.seq_drops:
        print("\n| max_verifier_drop | max_seq_logp_drop (with every other default) | " + full.replace("|---:", "|---:|---:", 1))
        for v in ["off"] + args.verifier_drops.split(","):
            for q in ["off"] + args.seq_drops.split(","):
                vd, sd = (None if v == "off" else float(v)), (None if q == "off" else float(q))
                ev = evaluate(rows, base, library_rule(lib, verifier_drop=vd, seq_drop=sd))
                print(line(f"{v} | {q}", ev))
    if args.lodo and args.verifier_drops and args.seq_drops:
        settings = {f"verifier {v}, likelihood {q}": library_rule(lib, verifier_drop=None if v == "off" else float(v),
                                                                  seq_drop=None if q == "off" else float(q))
                    for v in ["off"] + args.verifier_drops.split(",") for q in ["off"] + args.seq_drops.split(",")}
        default = f"verifier {lib.max_verifier_drop:g}, likelihood {lib.seq_logp_limit:g}"
        if default not in settings:
            ap.error(f"--lodo: the grid must hold the default pair ({default})")
        print("\n" + lodo_markdown(leave_one_domain_out(rows, base, settings, default, args.max_worse), default))
    if args.tradeoff:
        print("\n| max_logp_drop (with gate, consensus) | " + full)
        for ev in tradeoff(rows, base, [float(d) for d in args.tradeoff.split(",")]):
            print(line(f"{ev['drop']:g}", ev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
