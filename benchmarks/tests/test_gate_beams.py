"""benchmarks/gate_beams.py: a clip the greedy gate skips (confident, silent) returns the greedy `none` transcript,
any other (uncertain, or confident but needing Whisper's fallback) the beam method's; a greedy run decoded
differently is refused."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "gate_beams.py"
spec = importlib.util.spec_from_file_location("gate_beams_bench", SCRIPT)
gate_beams = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gate_beams)


def _beam_rows(utt):
    keep = {"domain": "d", "utt_id": utt, "ref_words": 3}
    return [{**keep, "method": "none", "hyp": f"greedy {utt}", "errors": 1},
            {**keep, "method": "b", "hyp": f"beam {utt}", "errors": 0, "adapt": {"min_entropy": 1.0}}]


def _greedy_row(utt, entropy, fallback=False, guard=None):
    scores = {"entropy_before": entropy, **({"fallback_before": 0.2} if fallback else {})}
    return {"domain": "d", "utt_id": utt, "method": "g", "text_before": f"greedy {utt}", "scores": scores,
            "guard": guard}


def test_confident_and_silent_clips_keep_greedy_and_the_rest_take_the_beam_call(tmp_path):
    utts = ["sure", "unsure", "fell_back", "silent"]
    beam = [r for u in utts for r in _beam_rows(u)]
    greedy = [_greedy_row("sure", 0.4), _greedy_row("unsure", 1.6), _greedy_row("fell_back", 0.4, fallback=True),
              _greedy_row("silent", 0.1, guard="no_speech")]
    (tmp_path / "beam.jsonl").write_text("".join(json.dumps(r) + "\n" for r in beam))
    (tmp_path / "greedy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in greedy))
    out = tmp_path / "out.jsonl"
    assert gate_beams.main([str(tmp_path / "beam.jsonl"), "--beam-method", "b", "--greedy", str(tmp_path / "greedy.jsonl"),
                            "--greedy-method", "g", "--as", "gb", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out)]
    got = {r["utt_id"]: r for r in rows if r["method"] == "gb"}
    assert {u: got[u]["source"] for u in utts} == {"sure": "greedy", "unsure": "beam", "fell_back": "beam",
                                                   "silent": "greedy"}
    assert got["sure"]["hyp"] == "greedy sure" and got["sure"]["errors"] == 1
    assert got["unsure"]["hyp"] == "beam unsure" and got["unsure"]["errors"] == 0
    assert len(rows) == len(beam) + len(utts)  # the input rows, then the composed ones


def test_a_greedy_run_with_another_source_transcript_is_refused():
    beam = _beam_rows("u")
    other = {**_greedy_row("u", 2.0), "text_before": "something else"}
    with pytest.raises(ValueError, match="source transcript"):
        gate_beams.compose(beam, [other], "b", "g", "gb")
    with pytest.raises(ValueError, match="no `none` row"):
        gate_beams.compose(beam, [], "b", "g", "gb")
