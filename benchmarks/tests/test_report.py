"""Aggregation, markdown and figure of the WER benchmark (harness.report) from synthetic rows."""
from __future__ import annotations

import json

import pytest

from harness import report


def _row(domain, utt, method, errors, words, *, lang="en", before=None, seconds=1.0, audio=2.0, tok=None, tok_s=None):
    return {"model": "m", "domain": domain, "utt_id": utt, "method": method, "language": lang, "ref": "r",
            "hyp": f"{method}-{errors}", "errors": errors, "ref_words": words, "seconds": seconds,
            "audio_seconds": audio, "sample_tokens": tok, "sample_seconds": tok_s,
            "text_before": None if method == "none" else f"none-{before}", "errors_before": before}


@pytest.fixture
def rows():
    out = []
    # domain A: none 2/10 + 0/5 ; em 1/10 + 1/5 (one better, one worse); entropy equal; pg worse
    out += [_row("A", "a1", "none", 2, 10, seconds=None), _row("A", "a2", "none", 0, 5, seconds=None)]
    out += [_row("A", "a1", "em", 1, 10, before=2, tok=40, tok_s=2.0), _row("A", "a2", "em", 1, 5, before=0, tok=20, tok_s=1.0)]
    out += [_row("A", "a1", "entropy", 2, 10, before=2), _row("A", "a2", "entropy", 0, 5, before=0)]
    out += [_row("A", "a1", "pg", 4, 10, before=2), _row("A", "a2", "pg", 0, 5, before=0)]
    # domain B (Czech): none 5/10 ; em 2/10
    out += [_row("B", "b1", "none", 5, 10, lang="cs", seconds=0.5, audio=1.0)]
    out += [_row("B", "b1", "em", 2, 10, lang="cs", before=5, seconds=3.0, audio=1.0, tok=30, tok_s=1.0)]
    return out


def test_aggregate_numbers(rows):
    s = report.aggregate(rows)
    assert s["domains"] == ["A", "B"]
    assert s["methods"] == ["none", "entropy", "pg", "em"]
    a = s["per_domain"]["A"]
    assert a["utts"] == 2 and a["ref_words"] == 15 and a["language"] == "en"
    assert a["methods"]["none"]["wer"] == pytest.approx(2 / 15)
    assert a["methods"]["em"]["wer"] == pytest.approx(2 / 15)  # corpus-level: sum errors / sum words
    assert a["methods"]["em"]["rel_change"] == pytest.approx(0.0)
    assert (a["methods"]["em"]["worse"], a["methods"]["em"]["better"], a["methods"]["em"]["same"]) == (1, 1, 0)
    assert (a["methods"]["pg"]["worse"], a["methods"]["pg"]["better"]) == (1, 0)
    assert a["methods"]["pg"]["rel_change"] == pytest.approx((4 / 15 - 2 / 15) / (2 / 15))
    b = s["per_domain"]["B"]
    assert b["language"] == "cs"
    assert b["methods"]["em"]["rel_change"] == pytest.approx(-0.6)
    assert "entropy" not in b["methods"]
    # macro mean over domains
    assert s["mean"]["none"]["wer"] == pytest.approx((2 / 15 + 0.5) / 2)
    assert s["mean"]["em"]["wer"] == pytest.approx((2 / 15 + 0.2) / 2)
    assert s["mean"]["em"]["mean_rel_change"] == pytest.approx((0.0 - 0.6) / 2)
    assert s["mean"]["em"]["rel_change"] == pytest.approx(((2 / 15 + 0.2) / 2) / ((2 / 15 + 0.5) / 2) - 1)
    assert (s["mean"]["em"]["worse"], s["mean"]["em"]["better"]) == (1, 2)
    assert s["mean"]["em"]["pooled_wer"] == pytest.approx(4 / 25)
    # speed: none timed on B only; em RTF = 5 s / 5 s audio; tokens/s = 90 / 4
    assert s["speed"]["none"]["timed_utts"] == 1 and s["speed"]["none"]["rtf"] == pytest.approx(0.5)
    assert s["speed"]["em"]["seconds_per_utt"] == pytest.approx(5 / 3)
    assert s["speed"]["em"]["rtf"] == pytest.approx(5 / 5)
    assert s["speed"]["em"]["tokens_per_s"] == pytest.approx(90 / 4)


def test_worse_better_fall_back_to_errors_before_without_none_rows(rows):
    s = report.aggregate([r for r in rows if r["method"] != "none"])
    em = s["per_domain"]["A"]["methods"]["em"]
    assert (em["worse"], em["better"]) == (1, 1)
    assert em["rel_change"] is None


def test_markdown_and_figure_written_from_jsonl(rows, tmp_path):
    path = tmp_path / "rows.jsonl"
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        f.write('{"truncated": \n')  # a partial line from an interrupted run is skipped
    loaded = report.read_jsonl(path)
    assert loaded == rows
    summary = report.write_report(loaded, tmp_path / "out", meta={"model": "m", "steps": 3})
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| domain | lang | utts | words | none | entropy | pg | em |" in md
    assert "| A | en | 2 | 15 | 13.33 | 13.33 (+0.0%) | 26.67 (+100.0%) | 13.33 (+0.0%) |" in md
    assert "| B | cs | 1 | 10 | 50.00 | – | – | 20.00 (-60.0%) |" in md
    assert "**mean**" in md and "## Speed" in md and "| em | 3 | 3 |" in md
    assert "| A | 0 / 0 | 1 / 0 | 1 / 1 |" in md
    png = (tmp_path / "out" / "wer_domains.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    js = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert js["per_domain"]["B"]["methods"]["em"]["wer"] == pytest.approx(0.2)
    assert js["meta"]["model"] == "m"
    assert summary["domains"] == ["A", "B"]
    # the deterministic tables do not contain timings
    assert "RTF" not in report.tables_markdown(summary)


def test_figure_with_none_only(tmp_path):
    rows = [_row("A", "a1", "none", 1, 4), _row("B", "b1", "none", 0, 3)]
    s = report.write_report(rows, tmp_path)
    assert (tmp_path / "wer_domains.png").is_file()
    assert "worse / better" not in (tmp_path / "results.md").read_text()
    assert s["mean"]["none"]["wer"] == pytest.approx(0.125)


def test_fallback_scoring():
    assert report._fallback_word_errors("Hello, World!", "hello world", "en") == (0, 2)
    assert report._fallback_word_errors("the cat sat", "the bat sat down", "en") == (2, 3)
    assert report._fallback_word_errors("Dobrý den.", "dobrý", "cs") == (1, 2)
    assert report._fallback_word_errors("", "extra", "en") == (1, 0)


def test_score_and_rescore_consistent():
    e, n = report.score("HE HOPED THERE WOULD BE STEW", "He hoped there'd be stew.", "en")
    assert n == 6 and 0 <= e <= 6
    rows = report.rescore_rows([{"ref": "a b c", "hyp": "a b", "language": "en", "text_before": "a x c",
                                 "errors": 99, "ref_words": 99}])
    assert (rows[0]["errors"], rows[0]["ref_words"], rows[0]["errors_before"]) == (1, 3, 1)


# ------------------------------------------------------------------------------------------------
# paired comparison vs none
# ------------------------------------------------------------------------------------------------

def _paired_rows(errors: dict[str, list[tuple[int, int]]], method: str, method_errors: dict[str, list[int]]):
    """``errors[domain] = [(none errors, words), ...]``; ``method_errors[domain] = [errors, ...]``."""
    out = []
    for d, items in errors.items():
        for i, (e, w) in enumerate(items):
            out.append(_row(d, f"{d}{i}", "none", e, w))
            out.append(_row(d, f"{d}{i}", method, method_errors[d][i], w, before=e))
    return out


NONE = {"A": [(2, 10), (0, 5), (3, 8), (1, 7)], "B": [(5, 10), (0, 4), (2, 6)], "C": [(0, 9), (1, 3)]}


def test_identical_method_has_zero_change_and_zero_width_ci():
    rows = _paired_rows(NONE, "em", {d: [e for e, _ in v] for d, v in NONE.items()})
    p = report.paired_comparison(rows, "em")
    assert p["rel_change"] == 0.0 and p["wer"] == p["wer_baseline"]
    assert p["ci_low"] == p["ci_high"] == 0.0 and p["resamples"] == 1000
    assert (p["worse"], p["better"], p["same"], p["frac_worse"]) == (0, 0, 9, 0.0)
    assert all(d["rel_change"] in (0.0, None) for d in p["per_domain"].values())


def test_fixing_every_error_is_minus_100_percent():
    rows = _paired_rows(NONE, "em", {d: [0] * len(v) for d, v in NONE.items()})
    p = report.paired_comparison(rows, "em")
    assert p["wer"] == 0.0 and p["rel_change"] == -1.0
    assert p["ci_low"] == p["ci_high"] == -1.0
    assert (p["worse"], p["better"], p["same"]) == (0, 6, 3)  # 3 utterances had no errors to fix
    assert p["per_domain"]["A"]["rel_change"] == -1.0


def test_doubling_every_error_is_plus_100_percent():
    rows = _paired_rows(NONE, "pg", {d: [2 * e for e, _ in v] for d, v in NONE.items()})
    p = report.paired_comparison(rows, "pg")
    assert p["rel_change"] == pytest.approx(1.0)
    assert p["ci_low"] == pytest.approx(1.0) and p["ci_high"] == pytest.approx(1.0)
    assert (p["worse"], p["better"]) == (6, 0) and p["frac_worse"] == pytest.approx(6 / 9)


def test_paired_numbers_ci_and_worst_domain():
    # A: one utterance fixed (2 -> 0), B: one broken (0 -> 4), C: unchanged
    method = {"A": [0, 0, 3, 1], "B": [5, 4, 2], "C": [0, 1]}
    rows = _paired_rows(NONE, "em", method)
    p = report.paired_comparison(rows, "em", n_boot=2000, seed=1)
    wa_b, wb_b, wc = 6 / 30, 7 / 20, 1 / 12
    wa_m, wb_m = 4 / 30, 11 / 20
    assert p["wer_baseline"] == pytest.approx((wa_b + wb_b + wc) / 3)
    assert p["wer"] == pytest.approx((wa_m + wb_m + wc) / 3)
    assert p["rel_change"] == pytest.approx(p["wer"] / p["wer_baseline"] - 1)
    assert p["per_domain"]["A"]["rel_change"] == pytest.approx(-1 / 3)
    assert p["per_domain"]["B"]["rel_change"] == pytest.approx(4 / 7)
    assert p["per_domain"]["C"]["rel_change"] == 0.0
    assert p["worst_domain"] == "B" and p["worst_rel_change"] == pytest.approx(4 / 7)
    assert (p["worse"], p["better"], p["same"]) == (1, 1, 7) and p["items"] == 9
    assert p["ci_low"] < p["rel_change"] < p["ci_high"] and p["ci_low"] < 0 < p["ci_high"]
    # seeded: the same CI again; another seed gives another (close) interval
    q = report.paired_comparison(rows, "em", n_boot=2000, seed=1)
    assert (q["ci_low"], q["ci_high"]) == (p["ci_low"], p["ci_high"])
    r = report.paired_comparison(rows, "em", n_boot=2000, seed=2)
    assert (r["ci_low"], r["ci_high"]) != (p["ci_low"], p["ci_high"])
    assert r["ci_low"] == pytest.approx(p["ci_low"], abs=0.1)
    assert report.paired_comparison(rows, "em", n_boot=0)["ci_low"] is None


def test_bootstrap_resamples_within_each_domain():
    # Domain A: every utterance 1 -> 0 errors; domain B: every utterance 1 -> 2.  Resampling within a domain
    # never changes a domain's WER (all utterances alike), so every resample gives the point estimate.
    base = {"A": [(1, 4)] * 5, "B": [(1, 4)] * 3}
    rows = _paired_rows(base, "em", {"A": [0] * 5, "B": [2] * 3})
    p = report.paired_comparison(rows, "em")
    assert p["rel_change"] == pytest.approx(0.0)  # (0 + 0.5) / 2 vs (0.25 + 0.25) / 2
    assert p["ci_low"] == pytest.approx(0.0) and p["ci_high"] == pytest.approx(0.0)


def test_paired_only_on_common_items_and_zero_baseline_domain():
    rows = _paired_rows({"A": [(2, 10), (1, 10)], "Z": [(0, 5)]}, "em", {"A": [1, 1], "Z": [2]})
    rows = [r for r in rows if not (r["utt_id"] == "A1" and r["method"] == "em")]  # em lacks A1
    p = report.paired_comparison(rows, "em")
    assert p["items"] == 2 and p["per_domain"]["A"]["items"] == 1
    assert p["per_domain"]["A"]["rel_change"] == pytest.approx(-0.5)
    assert p["per_domain"]["Z"]["rel_change"] is None and p["per_domain"]["Z"]["abs_change"] == pytest.approx(0.4)
    assert p["worst_domain"] == "Z" and p["worst_rel_change"] is None  # 0 -> 40% ranks above any finite change
    assert report.paired_comparison(rows, "pg") is None


def test_paired_in_summary_json_and_results_md(rows, tmp_path):
    s = report.write_report(rows, tmp_path, figure=False, n_boot=500, boot_seed=7)
    js = json.loads((tmp_path / "summary.json").read_text())
    assert set(js["paired"]) == {"entropy", "pg", "em"} and js["bootstrap"] == {"resamples": 500, "seed": 7, "ci": 0.95}
    em = js["paired"]["em"]
    assert em["items"] == 3 and (em["worse"], em["better"]) == (1, 2)
    assert em["wer"] == pytest.approx(s["mean"]["em"]["wer"]) and em["rel_change"] == pytest.approx(s["mean"]["em"]["rel_change"])
    md = (tmp_path / "results.md").read_text()
    assert "## Adapted methods vs `none` (paired, same utterances)" in md
    assert "| method | utts | macro WER | rel. change | 95% CI | worse / better | % worse | worst domain |" in md
    assert "| none | 3 | 31.67 | | | | | | |" in md
    ci = f"[{100 * em['ci_low']:+.1f}%, {100 * em['ci_high']:+.1f}%]"
    assert f"| em | 3 | 16.67 | -47.4% | {ci} | 1 / 2 | 33.3% | A (+0.0%) | 3 / 0 |" in md
    assert "| pg | 2 | 26.67 (none 13.33) | +100.0% | [+0.0%, +100.0%] | 1 / 0 | 50.0% | A (+100.0%) | 2 / 0 |" in md
    assert md.index("## Adapted methods") < md.index("## WER (%) per domain")  # the per-domain table is kept
    assert "| A | en | 2 | 15 | 13.33 |" in md


def test_no_paired_section_without_none_rows(rows):
    s = report.aggregate([r for r in rows if r["method"] != "none"])
    assert s["paired"] == {} and "## Adapted methods" not in report.tables_markdown(s)
