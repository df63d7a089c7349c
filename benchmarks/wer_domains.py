#!/usr/bin/env python
"""WER of adaptation methods across shifted domains, each method paired against `none`.

    python benchmarks/wer_domains.py --profile quick --out out/wer_quick
    python benchmarks/wer_domains.py --profile smoke --out out/wer_smoke
    python benchmarks/wer_domains.py --profile screen --device cuda --out out/wer_dev
    python benchmarks/wer_domains.py --profile dev --device cuda --batch-size 8 --out out/wer_dev
    python benchmarks/wer_domains.py --profile dev --out out/wer_dev \\
        --define "em_lr1e-3=objective=em;lr=1e-3;params=decoder" --methods none,fastem,em_lr1e-3
    python benchmarks/wer_domains.py --profile full --device cuda --out out/wer_full
    torchrun --nproc_per_node 4 benchmarks/wer_domains.py --profile dev --out out/wer_dev
    python benchmarks/wer_domains.py --profile confirm --out out/confirm --batch-size 8
    python benchmarks/wer_domains.py --profile confirm --model tiny.en --out out/confirm_tinyen --batch-size 8
    python benchmarks/wer_domains.py --list-domains
    python benchmarks/wer_domains.py --list-methods [--define ...]

Profiles (every knob can be overridden on the command line):
    smoke   tiny.en, domains clean + noise_white_5db, 1 utterance (<= 4 s) each, 1 step, 2 samples
    quick   tiny.en, 6 domains x 3 utterances (<= 5 s), 3 steps, 2 samples (2-core CPU: < 15 min)
    dev     base, 13 domains x 12 utterances = 156 (clean_ljspeech, nonnative_en, czech, dutch,
            noise_dishes_5db, noise_dishes_0db, noise_bike_5db, noise_tap_0db, noise_white_5db,
            noise_pink_0db, reverb_clap, reverb_hall, telephone), methods none, fastem, entropy, pg,
            suta, em; steps / samples / everything else at the library's defaults: the protocol that
            decides between recipes (GPU)
    screen  the dev domains x their first 3 utterances (39): a subset of dev's items, so screen rows
            are reused by a dev run in the same --out
    full    base (multilingual), all domains, 30 utterances each, 10 steps, 4 samples (GPU)
    confirm the held-out CONFIRM protocol (run only after a recipe is chosen on DEV): base, the 27
            confirm_* domains x 8 utterances = 216 (4 natural: non-native English, Kathleen, Czech,
            Dutch; 9 CONFIRM noises x 5 / 0 dB and 5 CONFIRM rooms on Kathleen + speechocean762),
            methods none, fastem, library defaults, read from the CONFIRM data set.  With an
            English-only model (--model tiny.en) the Czech and Dutch domains are dropped (25 x 8 = 200),
            as dev drops them

Domains: 'all' is every DEV domain (never a CONFIRM one); 'confirm' is the 27 CONFIRM domains; names
and patterns (noise_*, confirm_noise_*) may come from either registry, but one run reads one data set.

Methods are named adaptation configs.  Built in: none (no adaptation), fastem (fastem.AdaptConfig's
defaults: what the library does by default), entropy, pg, em, suta (objective=<name>).  Define more
with --define NAME=key=value;key=value (repeatable; values parsed as JSON when they parse, e.g.
lr=1e-3, episodic=false) and name them in --methods.  The shared options (--steps, --lr,
--num-samples, --params, --temperature, --seed, --max-new-tokens, --adapt-opt) apply to every adapted
method unless the method's definition sets the same key (the definition wins).  A row's key hashes
the method's resolved settings, so changing a definition or a shared option reruns that method and
keeps every other row.

--batch-size N adapts up to N items of one method per call (fastem.adapt_batch when the package has
it, else one adapt per item); the rows are the same as with N = 1 and resuming is unchanged.

Outputs under --out: shards/rank<r>.jsonl (one JSON line per domain x utterance x method; a rerun
resumes from them), rows.jsonl (merged, sorted), summary.json, results.md, wer_domains.png.
results.md and summary.json ("paired") compare every adapted method with `none` on the same
utterances: macro WER (mean of per-domain corpus WERs), its relative change with a 95% paired
bootstrap CI (--bootstrap resamples of the utterances within each domain, --bootstrap-seed),
utterances worse / better, % worse, per-domain changes and the worst domain.
The data dir is --data, else for DEV domains $FASTEM_DATA, else <repo>/../shared/data, and for
CONFIRM domains (and --profile confirm) $FASTEM_CONFIRM_DATA, else <repo>/../shared/confirm.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from harness.domains import CONFIRM_DOMAINS, DOMAINS, resolve_domains  # noqa: E402
from harness.runner import PROFILES, RunConfig, parse_definition, run  # noqa: E402


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--out", default=None, help="output dir (default out/wer_<profile>)")
    p.add_argument("--data", default=None,
                   help="data dir (default: DEV domains $FASTEM_DATA or <repo>/../shared/data; CONFIRM domains "
                        "$FASTEM_CONFIRM_DATA or <repo>/../shared/confirm)")
    p.add_argument("--model", default=None, help="e.g. tiny.en, base, or a hub id")
    p.add_argument("--domains", type=_csv, default=None,
                   help="comma-separated names or patterns (noise_*, confirm_*), 'all' (DEV) or 'confirm'")
    p.add_argument("--utts-per-domain", type=int, default=None)
    p.add_argument("--max-seconds", type=float, default=None, help="skip longer utterances (<=0: no limit)")
    p.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated method names: none, fastem, entropy, pg, suta, em or a --define'd one")
    p.add_argument("--define", action="append", default=[], metavar="NAME=KEY=VALUE;KEY=VALUE",
                   help="a named method: fastem.adapt overrides, e.g. 'em_lr1e-3=objective=em;lr=1e-3;params=decoder' "
                        "(repeatable; its keys win over the shared options)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--params", default=None, help="adapted parameters: layernorm, decoder, encoder, all")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="adaptation (sampler) seed")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--adapt-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other fastem.AdaptConfig field, e.g. --adapt-opt baseline=mean (repeatable)")
    p.add_argument("--data-seed", type=int, default=None, help="seed of the corruptions (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32, float16, bfloat16")
    p.add_argument("--engine", choices=["fastem", "stub"], default="fastem",
                   help="stub: a deterministic stand-in for the model (pipeline checks only)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="items adapted per call for one method (engine.adapt_batch; default 1)")
    p.add_argument("--bootstrap", type=int, default=None,
                   help="paired bootstrap resamples of the report's CIs (default 1000; 0: none)")
    p.add_argument("--bootstrap-seed", type=int, default=None, help="seed of the bootstrap (default 0)")
    p.add_argument("--time-none", action="store_true",
                   help="also run fastem.transcribe for 'none' (timed, checked against text_before)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing call")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-figure", action="store_true")
    p.add_argument("--list-domains", action="store_true", help="print the domain registry and exit")
    p.add_argument("--list-methods", action="store_true",
                   help="print the methods (built-in and --define'd) with their overrides and exit")
    p.add_argument("--print", dest="print_table", action="store_true", help="print results.md at the end")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    opts = {}
    for item in args.adapt_opt:
        if "=" not in item:
            raise SystemExit(f"--adapt-opt needs KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        opts[k.strip().replace("-", "_")] = _value(v)
    definitions = {}
    for text in args.define:
        try:
            name, definition = parse_definition(text)
        except ValueError as err:
            raise SystemExit(f"--define: {err}") from None
        if name in definitions:
            raise SystemExit(f"--define: method {name!r} defined twice")
        definitions[name] = definition
    overrides = dict(
        model=args.model, domains=args.domains, utts_per_domain=args.utts_per_domain, methods=args.methods,
        steps=args.steps, lr=args.lr, num_samples=args.num_samples, params=args.params,
        temperature=args.temperature, seed=args.seed, max_new_tokens=args.max_new_tokens,
        data_dir=args.data, data_seed=args.data_seed, device=args.device, dtype=args.dtype, engine=args.engine,
        adapt_options=opts or None, definitions=definitions or None, batch_size=args.batch_size,
        bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed,
    )
    cfg = RunConfig.from_profile(args.profile, **overrides)
    if args.max_seconds is not None:
        cfg.max_seconds = args.max_seconds if args.max_seconds > 0 else None
    cfg.time_none = args.time_none
    cfg.fail_fast = args.fail_fast
    cfg.progress = not args.no_progress
    cfg.figure = not args.no_figure
    resolve_domains(cfg.domains)  # fail early on a typo
    try:
        cfg.data_set()  # ... or on DEV and CONFIRM domains in one run
    except ValueError as err:
        raise SystemExit(str(err)) from None
    try:  # ... in a method name or a definition
        for m in cfg.methods:
            cfg.method_overrides(m)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if cfg.batch_size < 1:
        raise SystemExit(f"--batch-size must be >= 1, got {cfg.batch_size}")
    return cfg


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list_domains:
        for name, d in {**DOMAINS, **CONFIRM_DOMAINS}.items():
            print(f"{name:26s} {d.data:7s} {d.language}  {d.kind:8s} {'+'.join(d.corpora):40s} {d.description}")
        return 0
    cfg = config_from_args(args)
    if args.list_methods:
        for name, definition in cfg.method_table().items():
            over = cfg.method_overrides(name)
            print(f"{name:20s} {'(no adaptation)' if over is None else json.dumps(over, sort_keys=True)}"
                  + (f"  [defined: {json.dumps(definition, sort_keys=True)}]" if name in cfg.definitions else ""))
        return 0
    out = Path(args.out or f"out/wer_{args.profile}")
    summary = run(cfg, out)
    if summary is None:  # not rank 0
        return 0
    print(f"wrote {out / 'results.md'}, {out / 'summary.json'}, {out / 'rows.jsonl'}"
          + ("" if args.no_figure else f", {out / 'wer_domains.png'}"), file=sys.stderr)
    if args.print_table:
        print((out / "results.md").read_text(encoding="utf-8"))
    meta = summary.get("meta", {})
    return 1 if meta.get("errors") or meta.get("missing_rows") else 0


if __name__ == "__main__":
    sys.exit(main())
