"""Aggregation of benchmark rows into WER tables, a JSON summary and a figure.

A *row* is one JSON line of the results file: one (domain, utterance, method) with at least
``domain, utt_id, method, language, ref, hyp, errors, ref_words`` and optionally ``seconds,
audio_seconds, sample_tokens, sample_seconds, text_before, errors_before``.

WER is corpus-level per (domain, method): ``sum(errors) / sum(ref_words)`` after text
normalization.  The average over domains is the macro mean of the per-domain WERs (each domain
counts the same, whatever its number of words).  An utterance is *worse* (*better*) under a method
when it has more (fewer) word errors than the ``none`` transcript of the same (domain, utterance).

Paired comparison (:func:`paired_comparison`, ``summary["paired"][method]``): every adapted method
against ``none`` on the utterances both have: macro WER and its relative change, a paired bootstrap
confidence interval of that relative change (utterances resampled with replacement within each
domain, the same resample for both methods, each domain's corpus WER recomputed, macro-averaged),
utterances worse / better / unchanged, per-domain relative changes and the worst domain.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "METHODS",
    "score",
    "scorer_name",
    "rescore_rows",
    "read_jsonl",
    "aggregate",
    "paired_comparison",
    "paired_markdown",
    "tables_markdown",
    "results_markdown",
    "plot_summary",
    "write_report",
]

METHODS = ("none", "fastem", "entropy", "pg", "suta", "em")  # canonical order of the built-in methods
ADAPT_METHODS = METHODS[1:]
# Row fields that depend on how (not what) was run: timings and the engine call's batch size.
TIMING_FIELDS = ("seconds", "sample_seconds", "rtf", "tokens_per_s", "batch_items")


# ------------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------------

def _fastem_text():
    try:
        from fastem import text as ftext  # type: ignore

        if hasattr(ftext, "word_errors"):
            return ftext
    except Exception:
        pass
    return None


def scorer_name() -> str:
    if _fastem_text() is not None:
        return "fastem.text.word_errors"
    return "harness.report fallback (Whisper normalizers, no spelling map)"


_FALLBACK_NORMALIZERS: dict[str, object] = {}


def _fallback_normalize(text: str, language: str) -> str:
    lang = (language or "en").split("-")[0].lower()
    key = "en" if lang == "en" else "basic"
    norm = _FALLBACK_NORMALIZERS.get(key)
    if norm is None:
        try:
            from transformers.models.whisper.english_normalizer import (
                BasicTextNormalizer,
                EnglishTextNormalizer,
            )

            norm = EnglishTextNormalizer({}) if key == "en" else BasicTextNormalizer()
        except Exception:  # pragma: no cover - transformers always ships these
            norm = None
        _FALLBACK_NORMALIZERS[key] = norm
    if norm is not None:
        return " ".join(norm(text).split())
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[^\w\s']", " ", text)
    return " ".join(text.split())


def _fallback_word_errors(ref: str, hyp: str, language: str) -> tuple[int, int]:
    r = _fallback_normalize(ref, language).split()
    h = _fallback_normalize(hyp, language).split()
    if not r:
        return len(h), 0
    if not h:
        return len(r), len(r)
    # Levenshtein distance over words (S + D + I), same count jiwer reports.
    prev = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        cur = [i] + [0] * len(h)
        for j, hw in enumerate(h, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (rw != hw))
        prev = cur
    return prev[-1], len(r)


def score(ref: str, hyp: str, language: str = "en") -> tuple[int, int]:
    """``(word errors, reference words)`` after normalization (``fastem.text.word_errors`` when the
    package has it, else Whisper's normalizers from transformers + word Levenshtein distance)."""
    ftext = _fastem_text()
    if ftext is not None:
        e, n = ftext.word_errors(ref, hyp, language)
        return int(e), int(n)
    return _fallback_word_errors(ref, hyp or "", language)


def rescore_rows(rows: Iterable[dict]) -> list[dict]:
    """Recompute ``errors``/``ref_words`` (and ``errors_before``) with the current scorer, so that rows
    from earlier runs are scored consistently."""
    out = []
    for row in rows:
        row = dict(row)
        lang = row.get("language") or "en"
        row["errors"], row["ref_words"] = score(row["ref"], row.get("hyp") or "", lang)
        if row.get("text_before") is not None:
            row["errors_before"], _ = score(row["ref"], row["text_before"], lang)
        out.append(row)
    return out


def read_jsonl(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[dict]:
    """Rows of one or more JSONL files, in file order; truncated/garbled lines are skipped."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    rows = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            continue
        with open(p, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


# ------------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------------

def condition(domain: str) -> str:
    """The kind of shift a domain is, from its name: ``noise 0 dB``, ``noise 5 dB`` (the SNR of a noise domain),
    ``reverb``, ``channel`` (telephone, clipping, speed) or ``natural`` (real speech as recorded)."""
    snr = re.search(r"_(\d+)db$", domain)
    if "noise" in domain and snr:
        return f"noise {snr.group(1)} dB"
    if "reverb" in domain:
        return "reverb"
    if domain in ("telephone",) or domain.startswith(("clip_", "speed_")):
        return "channel"
    return "natural"


def _ordered(values: Iterable[str], canonical: Sequence[str] = ()) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    first = [c for c in canonical if c in seen]
    return first + [v for v in seen if v not in first]


def _safe_div(a: float, b: float) -> float | None:
    return a / b if b else None


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)) else None


def _method_stats(rows: list[dict], none_errors: dict[str, int]) -> dict:
    errors = sum(int(r["errors"]) for r in rows)
    words = sum(int(r["ref_words"]) for r in rows)
    worse = better = same = 0
    for r in rows:
        base = none_errors.get(r["utt_id"])
        if base is None:
            base = r.get("errors_before")
        if base is None:
            continue
        if r["errors"] > base:
            worse += 1
        elif r["errors"] < base:
            better += 1
        else:
            same += 1
    timed = [r for r in rows if _num(r.get("seconds")) is not None]
    secs = sum(float(r["seconds"]) for r in timed)
    audio = sum(float(r.get("audio_seconds") or 0.0) for r in timed)
    sampled = [r for r in rows if _num(r.get("sample_seconds")) is not None and r.get("sample_tokens") is not None]
    tok = sum(int(r["sample_tokens"]) for r in sampled)
    tok_s = sum(float(r["sample_seconds"]) for r in sampled)
    changed = [r for r in rows if r.get("text_before") is not None]
    return {
        "utts": len(rows),
        "errors": errors,
        "ref_words": words,
        "wer": _safe_div(errors, words),
        "worse": worse,
        "better": better,
        "same": same,
        "changed": sum(1 for r in changed if (r.get("hyp") or "") != (r.get("text_before") or "")),
        "timed_utts": len(timed),
        "seconds": secs if timed else None,
        "seconds_per_utt": secs / len(timed) if timed else None,
        "audio_seconds": audio if timed else None,
        "rtf": _safe_div(secs, audio) if timed else None,
        "sample_tokens": tok if sampled else None,
        "sample_seconds": tok_s if sampled else None,
        "tokens_per_s": _safe_div(tok, tok_s) if sampled else None,
    }


def _rel(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None or old == 0 else (new - old) / old


def paired_comparison(rows: Sequence[dict], method: str, *, baseline: str = "none",
                      domains: Sequence[str] | None = None, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict | None:
    """``method`` vs ``baseline`` on the (domain, utterance) pairs both have; None when there are none.

    ``wer`` / ``wer_baseline``: macro WER (mean over domains of each domain's corpus WER, domains with no
    reference words left out); ``rel_change`` = ``wer / wer_baseline - 1``; ``ci_low`` / ``ci_high``: the
    percentile interval (``ci``) of the relative change over ``n_boot`` paired bootstrap resamples
    (``numpy.random.default_rng(seed)``; in each domain its utterances are drawn with replacement, the
    same draw for both methods; a resample whose baseline macro WER is 0 counts as 0 change when the
    method's is 0 too and is dropped otherwise: ``resamples`` says how many were kept);
    ``worse`` / ``better`` / ``same``: utterances with more / fewer / as many word errors;
    ``per_domain[d]``; ``worst_domain``: the largest per-domain relative change (a domain where the
    baseline is at 0 and the method is not ranks above every finite change).
    """
    dom_order = list(domains) if domains is not None else _ordered(r["domain"] for r in rows)
    base = {(r["domain"], r["utt_id"]): r for r in rows if r["method"] == baseline}
    meth = {(r["domain"], r["utt_id"]): r for r in rows if r["method"] == method}
    keys = [k for k in meth if k in base]
    if not keys:
        return None
    by_dom: dict[str, list[tuple[str, str]]] = {}
    for k in keys:
        by_dom.setdefault(k[0], []).append(k)
    doms = [d for d in dom_order if d in by_dom] + [d for d in by_dom if d not in dom_order]

    arrays = {}
    per_domain: dict[str, dict] = {}
    worse = better = same = changed = guarded = 0
    guards: dict[str, int] = {}
    for d in doms:
        ks = sorted(by_dom[d], key=lambda k: k[1])
        eb = np.array([int(base[k]["errors"]) for k in ks], dtype=np.int64)
        wb = np.array([int(base[k]["ref_words"]) for k in ks], dtype=np.int64)
        em = np.array([int(meth[k]["errors"]) for k in ks], dtype=np.int64)
        wm = np.array([int(meth[k]["ref_words"]) for k in ks], dtype=np.int64)
        arrays[d] = (eb, wb, em, wm)
        w_b = _safe_div(float(eb.sum()), float(wb.sum()))
        w_m = _safe_div(float(em.sum()), float(wm.sum()))
        dw, db, ds = int((em > eb).sum()), int((em < eb).sum()), int((em == eb).sum())
        worse, better, same = worse + dw, better + db, same + ds
        per_domain[d] = {"items": len(ks), "wer_baseline": w_b, "wer": w_m, "rel_change": _rel(w_m, w_b),
                         "abs_change": None if w_m is None or w_b is None else w_m - w_b,
                         "worse": dw, "better": db, "same": ds}
        for k in ks:
            r = meth[k]
            ch = r.get("changed")
            if ch is None and r.get("text_before") is not None:
                ch = (r.get("hyp") or "") != (r.get("text_before") or "")
            changed += bool(ch)
            if r.get("guard") is not None:
                guarded += 1
                guards[str(r["guard"])] = guards.get(str(r["guard"]), 0) + 1

    scored = [d for d in doms if per_domain[d]["wer_baseline"] is not None and per_domain[d]["wer"] is not None]
    wer_b = sum(per_domain[d]["wer_baseline"] for d in scored) / len(scored) if scored else None
    wer_m = sum(per_domain[d]["wer"] for d in scored) / len(scored) if scored else None

    ci_low = ci_high = None
    kept = 0
    if n_boot and n_boot > 0 and scored:
        rng = np.random.default_rng(seed)
        mac_b = np.zeros(n_boot)
        mac_m = np.zeros(n_boot)
        n_dom = np.zeros(n_boot)
        for d in scored:
            eb, wb, em, wm = arrays[d]
            idx = rng.integers(0, eb.size, size=(n_boot, eb.size))
            wb_s, wm_s = wb[idx].sum(axis=1), wm[idx].sum(axis=1)
            ok = (wb_s > 0) & (wm_s > 0)
            mac_b += np.where(ok, eb[idx].sum(axis=1) / np.maximum(wb_s, 1), 0.0)
            mac_m += np.where(ok, em[idx].sum(axis=1) / np.maximum(wm_s, 1), 0.0)
            n_dom += ok
        with np.errstate(divide="ignore", invalid="ignore"):
            mac_b, mac_m = mac_b / n_dom, mac_m / n_dom
            rel = np.where(mac_b > 0, (mac_m - mac_b) / mac_b, np.where(mac_m == 0, 0.0, np.nan))
        rel = rel[np.isfinite(rel)]
        kept = int(rel.size)
        if kept:
            lo, hi = np.quantile(rel, [(1.0 - ci) / 2.0, 1.0 - (1.0 - ci) / 2.0])
            ci_low, ci_high = float(lo), float(hi)

    def badness(d: str) -> tuple[float, float]:
        pd = per_domain[d]
        a = pd["abs_change"] or 0.0
        r = pd["rel_change"]
        return (r if r is not None else (math.inf if a > 0 else 0.0), a)

    worst = max(scored, key=badness) if scored else None
    n = len(keys)
    return {
        "baseline": baseline,
        "items": n,
        "domains": len(scored),
        "wer_baseline": wer_b,
        "wer": wer_m,
        "abs_change": None if wer_m is None or wer_b is None else wer_m - wer_b,
        "rel_change": _rel(wer_m, wer_b),
        "ci": ci,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "resamples": kept,
        "worse": worse,
        "better": better,
        "same": same,
        "frac_worse": worse / n,
        "frac_better": better / n,
        "changed": changed,
        "guarded": guarded,
        "guards": guards,
        "per_domain": per_domain,
        "worst_domain": worst,
        "worst_rel_change": None if worst is None else per_domain[worst]["rel_change"],
        "worst_abs_change": None if worst is None else per_domain[worst]["abs_change"],
    }


def aggregate(rows: Sequence[dict], *, domains: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, meta: dict | None = None, n_boot: int = 1000,
              boot_seed: int = 0) -> dict:
    """Summary dict: ``per_domain[domain]`` (language, utts, words, ``methods[m]`` stats with
    ``rel_change`` vs none), ``mean[m]`` (macro average over domains), ``paired[m]`` (every adapted method
    vs none on the same utterances, with a paired bootstrap CI: :func:`paired_comparison`, ``n_boot``
    resamples seeded with ``boot_seed``) and ``speed[m]`` (all rows)."""
    domains = list(domains) if domains is not None else _ordered(r["domain"] for r in rows)
    methods = list(methods) if methods is not None else _ordered((r["method"] for r in rows), METHODS)
    by_dm: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        by_dm.setdefault((r["domain"], r["method"]), []).append(r)

    per_domain: dict[str, dict] = {}
    for d in domains:
        drows = [r for r in rows if r["domain"] == d]
        if not drows:
            continue
        none_rows = by_dm.get((d, "none"), [])
        none_errors = {r["utt_id"]: int(r["errors"]) for r in none_rows}
        stats = {m: _method_stats(by_dm[(d, m)], none_errors) for m in methods if (d, m) in by_dm}
        wer_none = stats.get("none", {}).get("wer")
        for m, s in stats.items():
            s["rel_change"] = (None if m == "none" or wer_none is None or s["wer"] is None or wer_none == 0
                               else (s["wer"] - wer_none) / wer_none)
            s["abs_change"] = (None if m == "none" or wer_none is None or s["wer"] is None
                               else s["wer"] - wer_none)
        words_rows = none_rows or by_dm.get((d, methods[0]), drows)
        per_domain[d] = {
            "language": drows[0].get("language"),
            "kind": drows[0].get("domain_kind"),
            "utts": len({r["utt_id"] for r in drows}),
            "ref_words": sum(int(r["ref_words"]) for r in words_rows),
            "methods": stats,
        }

    mean: dict[str, dict] = {}
    for m in methods:
        doms = [d for d in per_domain if m in per_domain[d]["methods"]]
        if not doms:
            continue
        wers = [per_domain[d]["methods"][m]["wer"] for d in doms if per_domain[d]["methods"][m]["wer"] is not None]
        rels = [per_domain[d]["methods"][m]["rel_change"] for d in doms
                if per_domain[d]["methods"][m]["rel_change"] is not None]
        mrows = [r for d in doms for r in by_dm[(d, m)]]
        mean[m] = {
            "domains": len(doms),
            "wer": sum(wers) / len(wers) if wers else None,
            "mean_rel_change": sum(rels) / len(rels) if rels else None,
            "pooled_wer": _safe_div(sum(int(r["errors"]) for r in mrows), sum(int(r["ref_words"]) for r in mrows)),
            "utts": len(mrows),
            "worse": sum(per_domain[d]["methods"][m]["worse"] for d in doms),
            "better": sum(per_domain[d]["methods"][m]["better"] for d in doms),
            "same": sum(per_domain[d]["methods"][m]["same"] for d in doms),
        }
    if "none" in mean and mean["none"]["wer"]:
        for m, s in mean.items():
            s["rel_change"] = None if m == "none" or s["wer"] is None else (s["wer"] - mean["none"]["wer"]) / mean["none"]["wer"]
    else:
        for s in mean.values():
            s["rel_change"] = None

    speed = {}
    for m in methods:
        mrows = [r for r in rows if r["method"] == m]
        if mrows:
            st = _method_stats(mrows, {})
            speed[m] = {k: st[k] for k in ("utts", "timed_utts", "seconds", "seconds_per_utt", "audio_seconds",
                                           "rtf", "sample_tokens", "sample_seconds", "tokens_per_s")}
    paired = {}
    if any(r["method"] == "none" for r in rows):
        for m in methods:
            if m != "none":
                pc = paired_comparison(rows, m, domains=list(per_domain), n_boot=n_boot, seed=boot_seed)
                if pc is not None:
                    paired[m] = pc
    return {
        "meta": dict(meta or {}),
        "scorer": scorer_name(),
        "domains": list(per_domain),
        "methods": methods,
        "per_domain": per_domain,
        "mean": mean,
        "paired": paired,
        "bootstrap": {"resamples": int(n_boot), "seed": int(boot_seed), "ci": 0.95},
        "speed": speed,
    }


# ------------------------------------------------------------------------------------------------
# markdown
# ------------------------------------------------------------------------------------------------

def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100.0 * x:.{digits}f}"


def _signed_pct(x: float | None) -> str:
    return "–" if x is None else f"{100.0 * x:+.1f}%"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _worst_cell(p: dict) -> str:
    d = p.get("worst_domain")
    if d is None:
        return "–"
    if p.get("worst_rel_change") is not None:
        return f"{d} ({_signed_pct(p['worst_rel_change'])})"
    a = p.get("worst_abs_change")
    return f"{d} (0 -> {_pct(a)})" if a else f"{d} (0 -> 0)"


def paired_markdown(summary: dict) -> str:
    """One row per method: macro WER, relative change vs ``none`` with its paired bootstrap CI,
    utterances worse / better, % worse, the worst domain (empty string without paired results)."""
    paired = summary.get("paired") or {}
    if not paired:
        return ""
    boot = summary.get("bootstrap") or {}
    any_p = next(iter(paired.values()))
    level = int(round(100 * (any_p.get("ci") or 0.95)))
    lines = ["## Adapted methods vs `none` (paired, same utterances)", "",
             "Macro WER (%) = mean of the per-domain corpus WERs over the utterances both methods have; "
             f"rel. change vs `none` with a {level}% paired bootstrap CI ({boot.get('resamples', '?')} resamples "
             f"of the utterances within each domain, seed {boot.get('seed', '?')}); worse / better: utterances "
             "with more / fewer word errors than `none`; worst domain: largest per-domain relative change; "
             "changed / guarded: transcripts that differ from the unadapted one / adaptations a guard rejected. "
             "A method with fewer utterances than `none` shows `none`'s macro WER on its utterances.",
             "",
             f"| method | utts | macro WER | rel. change | {level}% CI | worse / better | % worse | worst domain "
             "| changed / guarded |",
             "|---|---:|---:|---:|---|---:|---:|---|---:|"]
    none_mean = (summary.get("mean") or {}).get("none") or {}
    none_wer = none_mean.get("wer", any_p.get("wer_baseline"))
    none_utts = none_mean.get("utts", any_p["items"])
    lines.append(f"| none | {none_utts} | {_pct(none_wer)} | | | | | | |")
    for m in summary["methods"]:
        p = paired.get(m)
        if p is None:
            continue
        ci_cell = ("–" if p["ci_low"] is None else
                   f"[{_signed_pct(p['ci_low'])}, {_signed_pct(p['ci_high'])}]")
        wer_cell = _pct(p["wer"])
        if p["items"] != none_utts:  # fewer common utterances (failed rows): show `none` on the same ones
            wer_cell += f" (none {_pct(p['wer_baseline'])})"
        lines.append(f"| {m} | {p['items']} | {wer_cell} | {_signed_pct(p['rel_change'])} | {ci_cell} | "
                     f"{p['worse']} / {p['better']} | {_pct(p['frac_worse'], 1)}% | {_worst_cell(p)} | "
                     f"{p['changed']} / {p['guarded']} |")
    return "\n".join(lines) + "\n"


def tables_markdown(summary: dict) -> str:
    """The deterministic part of the report (no timings): the paired comparison, the WER table and the
    worse/better table."""
    methods = summary["methods"]
    adapted = [m for m in methods if m != "none"]
    paired = paired_markdown(summary)
    lines = ([paired] if paired else []) + ["## WER (%) per domain", "",
             "Corpus-level WER (sum of word errors / sum of reference words, normalized text) per domain; "
             "in parentheses the relative change vs `none`. Mean = macro average over domains.", ""]
    head = ["domain", "lang", "utts", "words"] + methods
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---", "---", "---:", "---:"] + ["---:"] * len(methods)) + "|")
    for d in summary["domains"]:
        pd = summary["per_domain"][d]
        cells = [d, str(pd["language"]), str(pd["utts"]), str(pd["ref_words"])]
        for m in methods:
            s = pd["methods"].get(m)
            if s is None:
                cells.append("–")
            elif m == "none":
                cells.append(_pct(s["wer"]))
            else:
                cells.append(f"{_pct(s['wer'])} ({_signed_pct(s['rel_change'])})")
        lines.append("| " + " | ".join(cells) + " |")
    if summary["mean"]:
        cells = ["**mean**", "", str(sum(summary["per_domain"][d]["utts"] for d in summary["domains"])),
                 str(sum(summary["per_domain"][d]["ref_words"] for d in summary["domains"]))]
        for m in methods:
            s = summary["mean"].get(m)
            if s is None:
                cells.append("–")
            elif m == "none":
                cells.append(f"**{_pct(s['wer'])}**")
            else:
                cells.append(f"**{_pct(s['wer'])}** ({_signed_pct(s['rel_change'])})")
        lines.append("| " + " | ".join(cells) + " |")
    if adapted:
        lines += ["", "## Utterances worse / better than `none`", "",
                  "Per domain: number of utterances with more / fewer word errors than the unadapted transcript "
                  "(mean per-domain relative WER change in the last row).", ""]
        lines.append("| domain | " + " | ".join(adapted) + " |")
        lines.append("|---|" + "|".join(["---:"] * len(adapted)) + "|")
        for d in summary["domains"]:
            ms = summary["per_domain"][d]["methods"]
            cells = [d] + [("–" if m not in ms else f"{ms[m]['worse']} / {ms[m]['better']}") for m in adapted]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["**total**"] + [("–" if m not in summary["mean"] else
                                  f"**{summary['mean'][m]['worse']} / {summary['mean'][m]['better']}**")
                                 for m in adapted]
        lines.append("| " + " | ".join(cells) + " |")
        cells = ["mean rel. change"] + [("–" if m not in summary["mean"] else
                                         _signed_pct(summary["mean"][m]["mean_rel_change"])) for m in adapted]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def speed_markdown(summary: dict) -> str:
    lines = ["## Speed", "",
             "Wall seconds per utterance (adaptation call including its greedy decodes; `none`: greedy "
             "transcription, timed only when it was run on its own), real-time factor (seconds / audio "
             "seconds) and tokens per second of the sampling loop.", "",
             "| method | utts | timed | s/utt | RTF | sampled tokens | sample tok/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m, s in summary["speed"].items():
        lines.append(f"| {m} | {s['utts']} | {s['timed_utts']} | {_fmt(s['seconds_per_utt'], '.3f')} | "
                     f"{_fmt(s['rtf'], '.3f')} | {s['sample_tokens'] if s['sample_tokens'] is not None else '–'} | "
                     f"{_fmt(s['tokens_per_s'], '.1f')} |")
    return "\n".join(lines) + "\n"


def _meta_markdown(meta: dict) -> str:
    if not meta:
        return ""
    keys = ["model", "profile", "device", "world_size", "utts_per_domain", "steps", "lr", "num_samples",
            "params", "temperature", "seed", "data_seed", "max_seconds", "adapt_options", "definitions",
            "method_overrides", "adapt_config", "batch_size", "skipped_domains", "items", "missing_rows", "errors",
            "run_seconds", "data", "data_dir"]
    lines = ["| setting | value |", "|---|---|"]
    for k in keys:
        if k in meta and meta[k] not in (None, [], {}) and not (k in ("missing_rows", "errors") and meta[k] == 0):
            v = meta[k]
            v = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else str(v)
            lines.append(f"| {k} | `{v}` |")
    return "\n".join(lines) + "\n"


def results_markdown(summary: dict) -> str:
    parts = ["# fastem WER across domains", ""]
    meta = _meta_markdown(summary.get("meta") or {})
    if meta:
        parts += [meta]
    parts += [f"Scoring: {summary.get('scorer', '')}.", "", tables_markdown(summary), speed_markdown(summary)]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------
# figure
# ------------------------------------------------------------------------------------------------

_COLORS = {"none": "#7f7f7f", "fastem": "#9467bd", "entropy": "#1f77b4", "pg": "#ff7f0e", "suta": "#8c564b",
           "em": "#2ca02c"}
_EXTRA_COLORS = ("#d62728", "#e377c2", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
                 "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5")


def _color(method: str, methods: Sequence[str]) -> str:
    if method in _COLORS:
        return _COLORS[method]
    extra = [m for m in methods if m not in _COLORS]
    return _EXTRA_COLORS[extra.index(method) % len(_EXTRA_COLORS)] if method in extra else "#333333"


def plot_summary(summary: dict, path: str | os.PathLike) -> Path:
    """Two panels: per-domain WER bars per method, and per-domain relative WER change vs none."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    domains = list(summary["domains"]) + (["mean"] if summary["mean"] else [])
    methods = summary["methods"]
    adapted = [m for m in methods if m != "none"]

    def stat(d, m, key):
        if d == "mean":
            s = summary["mean"].get(m)
        else:
            s = summary["per_domain"][d]["methods"].get(m)
        v = None if s is None else s.get(key)
        return float("nan") if v is None else 100.0 * v

    n = len(domains)
    width = max(8.0, 0.55 * n * max(1, len(methods)) / 2 + 2)
    nrows = 2 if adapted else 1
    fig, axes = plt.subplots(nrows, 1, figsize=(width, 4.2 * nrows), squeeze=False)
    x = list(range(n))
    bw = 0.8 / max(1, len(methods))
    ax = axes[0][0]
    for i, m in enumerate(methods):
        ax.bar([xi + (i - (len(methods) - 1) / 2) * bw for xi in x], [stat(d, m, "wer") for d in domains], bw,
               label=m, color=_color(m, methods))
    ax.set_ylabel("WER (%)")
    ax.set_title(f"WER per domain ({(summary.get('meta') or {}).get('model', '')})")
    ax.set_xticks(x)
    ax.set_xticklabels(domains, rotation=60, ha="right", fontsize=8)
    ax.legend(fontsize=8, ncol=len(methods))
    ax.grid(axis="y", alpha=0.3)
    if adapted:
        ax = axes[1][0]
        bw2 = 0.8 / len(adapted)
        for i, m in enumerate(adapted):
            ax.bar([xi + (i - (len(adapted) - 1) / 2) * bw2 for xi in x], [stat(d, m, "rel_change") for d in domains],
                   bw2, label=m, color=_color(m, methods))
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_ylabel("relative WER change vs none (%)")
        ax.set_xticks(x)
        ax.set_xticklabels(domains, rotation=60, ha="right", fontsize=8)
        ax.legend(fontsize=8, ncol=len(adapted))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: Sequence[dict], out_dir: str | os.PathLike, *, domains: Sequence[str] | None = None,
                 methods: Sequence[str] | None = None, meta: dict | None = None, figure: bool = True,
                 n_boot: int = 1000, boot_seed: int = 0) -> dict:
    """Write ``summary.json``, ``results.md`` and (``figure``) ``wer_domains.png`` under ``out_dir``;
    returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = aggregate(rows, domains=domains, methods=methods, meta=meta, n_boot=n_boot, boot_seed=boot_seed)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    (out / "results.md").write_text(results_markdown(summary), encoding="utf-8")
    if figure and summary["domains"]:
        plot_summary(summary, out / "wer_domains.png")
    return summary
