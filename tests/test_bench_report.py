"""Aggregation, markdown and figure of the WER benchmark (fastem.bench.report) from synthetic rows."""
from __future__ import annotations

import json

import pytest

from fastem.bench import report


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
