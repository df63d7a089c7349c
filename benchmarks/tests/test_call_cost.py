"""benchmarks/call_cost.py: a method's seconds over the same utterances' greedy transcriptions, and what it did."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "call_cost.py"
spec = importlib.util.spec_from_file_location("call_cost_bench", SCRIPT)
call_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(call_cost)


def test_the_cost_is_total_seconds_over_the_baselines_on_the_paired_utterances(tmp_path, capsys):
    rows = [{"method": "none", "domain": "d", "utt_id": str(i), "seconds": 1.0 + i} for i in range(4)]
    rows += [{"method": "fastem", "domain": "d", "utt_id": "0", "seconds": 10.0, "steps_done": 5},
             {"method": "fastem", "domain": "d", "utt_id": "1", "seconds": 3.0, "steps_done": 0, "skipped": "agreed"},
             {"method": "fastem", "domain": "d", "utt_id": "2", "seconds": 2.0, "steps_done": 0},
             {"method": "fastem", "domain": "e", "utt_id": "0", "seconds": 99.0, "steps_done": 5}]  # no baseline: left out
    n, secs, ratio, kinds = call_cost.cost(rows, "fastem")
    assert (n, secs, kinds) == (3, 5.0, {"adapted": 1, "agreed": 1, "not adapted": 1})
    assert ratio == pytest.approx(15.0 / 6.0)  # 10 + 3 + 2 seconds against 1 + 2 + 3 (utterance 3 has no fastem row)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert call_cost.main([str(path)]) == 0
    assert "| 3 | 5.00 | 2.50x | adapted 1, agreed 1, not adapted 1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no 'other' rows"):
        call_cost.cost(rows, "other")
