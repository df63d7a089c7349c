"""benchmarks/redecide.py: at the rows' own thresholds nothing moves; a changed threshold moves exactly the rows
whose verdict it changes, and they are re-scored."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "redecide.py"
spec = importlib.util.spec_from_file_location("redecide_bench", SCRIPT)
redecide = importlib.util.module_from_spec(spec)
spec.loader.exec_module(redecide)

ADAPT = {"guards": "('empty', 'non_speech', 'repetition', 'length', 'confidence', 'consensus', 'likelihood', 'verifier')",
         "max_logp_drop": 1.5, "max_length_ratio": 2.0, "max_verifier_drop": 0.1, "max_seq_logp_drop": 2.0}


def _row(utt, after, source_after, returned):
    # "a b c d" -> after: the source model's total log-prob falls from -0.5 * 5 to source_after * 5
    return {"method": "m", "domain": "d", "utt_id": utt, "language": "en", "ref": "a b c e", "ref_words": 4,
            "text_before": "a b c d", "hyp_adapted": after, "hyp": returned, "errors": None, "audio_seconds": 2.0,
            "tokens_before": [1, 2, 3, 4], "tokens_adapted": [1, 2, 3, 5], "adapt": ADAPT,
            "scores": {"entropy_before": 2.0, "source_before": -0.5, "source_after": source_after,
                       "adapted_before": -0.9, "adapted_after": -0.1}}


def test_own_thresholds_reproduce_and_likelihood_off_moves_only_its_rejections(tmp_path):
    rows = [_row("u1", "a b c e", -1.0, "a b c d"),   # 2.5 nats less likely as a whole: the likelihood guard fired
            _row("u2", "a b c e", -0.6, "a b c e")]   # 0.5 nats: accepted
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert redecide.main([str(src), "--method", "m", "--as", "same", "--out", str(out)]) == 0
    same = [json.loads(line) for line in open(out) if json.loads(line)["method"] == "same"]
    assert [r["hyp"] for r in same] == [r["hyp"] for r in rows]
    assert [r["errors"] for r in same] == [1, 0]
    assert redecide.main([str(src), "--method", "m", "--as", "off", "--set", "max_seq_logp_drop=off",
                          "--out", str(out)]) == 0
    got = [json.loads(line) for line in open(out)]
    off = [r for r in got if r["method"] == "off"]
    assert [r["hyp"] for r in off] == ["a b c e", "a b c e"] and [r["errors"] for r in off] == [0, 0]
    assert off[0]["redecided"]["max_seq_logp_drop"] is None and len(got) == 4  # the input rows come first
    with pytest.raises(argparse.ArgumentTypeError):
        redecide.parse_set("steps=3")


def test_a_raised_gate_returns_the_unadapted_transcript_below_it_and_cannot_be_lowered(tmp_path):
    rows = [_row("u1", "a b c e", -0.6, "a b c e"), _row("u2", "a b c e", -0.6, "a b c e")]
    rows[1]["scores"]["entropy_before"] = 1.2  # adapted by a run gated at 1.0, not at 1.4
    for r in rows:
        r["adapt"] = {**ADAPT, "min_entropy": 1.0}
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert redecide.main([str(src), "--method", "m", "--as", "g14", "--set", "min_entropy=1.4", "--out", str(out)]) == 0
    g = [json.loads(line) for line in open(out) if json.loads(line)["method"] == "g14"]
    assert [r["hyp"] for r in g] == ["a b c e", "a b c d"] and [r["errors"] for r in g] == [0, 1]
    assert g[1]["changed"] is False and g[0]["redecided"]["min_entropy"] == 1.4
    with pytest.raises(ValueError, match="only be raised"):
        redecide.main([str(src), "--method", "m", "--as", "g0", "--set", "min_entropy=0.5", "--out", str(out)])
