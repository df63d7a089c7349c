"""benchmarks/paired.py: pairs across run files, labels, and the @before / @adapted transcripts of adapted rows."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "paired.py"
spec = importlib.util.spec_from_file_location("paired_bench", SCRIPT)
paired = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_suffixes_and_beam_rows(tmp_path, capsys):
    run = [{"method": "none", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": 4} for i in range(3)]
    run += [{"method": "m", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": 2, "errors_before": 3,
             "errors_adapted": 5} for i in range(3)]
    run.append({"method": "m", "domain": "d", "utt_id": "9", "ref_words": 10, "errors": None})  # a failed call
    old = [{"method": "m", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": 1} for i in range(3)]
    beam = [{"domain": "d", "utt_id": str(i), "ref_words": 10, "errors_greedy": 4, "errors_beam": 8} for i in range(3)]
    files = [_write(tmp_path / "a.jsonl", run), "old=" + _write(tmp_path / "b.jsonl", old), _write(tmp_path / "c.jsonl", beam)]
    rows = paired.load(files)
    assert {r["method"] for r in rows} == {"none", "m", "m@before", "m@adapted", "old/m", "hf_greedy", "hf_beam"}
    assert paired.main(files + ["--pair", "m:m@before", "--pair", "m@adapted:none", "--pair", "old/m:m",
                                "--pair", "hf_beam:hf_greedy"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("m: macro WER 20.00% vs m@before 30.00% (-33.3%") and "worse / better 0 / 3 of 3" in lines[0]
    assert "(+25.0%" in lines[1] and "3 / 0 of 3" in lines[1]
    assert "(-50.0%" in lines[2] and "(+100.0%" in lines[3]
    with pytest.raises(SystemExit, match="methods among"):
        paired.main(files + ["--pair", "m:nope"])


def test_by_condition_splits_each_pair_by_kind_of_shift(tmp_path, capsys):
    rows = []
    for domain, e_m in (("noise_x_0db", 1), ("reverb_y", 6)):  # m helps the noise domain, harms the room
        rows += [{"method": "none", "domain": domain, "utt_id": str(i), "ref_words": 10, "errors": 3} for i in range(2)]
        rows += [{"method": "m", "domain": domain, "utt_id": str(i), "ref_words": 10, "errors": e_m} for i in range(2)]
    path = _write(tmp_path / "r.jsonl", rows)
    assert paired.main([path, "--pair", "m:none", "--by-condition"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "(+16.7%" in lines[0]  # macro (10% + 60%) / 2 against 30%
    assert lines[1].startswith("  noise 0 dB: m: macro WER 10.00% vs none 30.00% (-66.7%") and "0 / 2 of 2" in lines[1]
    assert lines[2].startswith("  reverb: m: macro WER 60.00% vs none 30.00% (+100.0%") and "2 / 0 of 2" in lines[2]


def test_pools_sum_each_utterance_over_its_draws(tmp_path, capsys):
    rows = [{"method": "none", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": 4} for i in range(3)]
    rows += [{"method": "a", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": e} for i, e in enumerate((1, 5, 4))]
    rows += [{"method": "a_s1", "domain": "d", "utt_id": str(i), "ref_words": 10, "errors": e} for i, e in enumerate((3, 3, 4))]
    rows.append({"method": "a_s1", "domain": "d", "utt_id": "7", "ref_words": 10, "errors": 9})  # not in every part
    path = _write(tmp_path / "r.jsonl", rows)
    pooled = paired.pool(paired.load([path]), "a+a_s1")
    assert sorted((r["utt_id"], r["errors"], r["ref_words"]) for r in pooled) == [("0", 4, 20), ("1", 8, 20), ("2", 8, 20)]
    assert paired.main([path, "--pair", "a+a_s1:none+none", "--pair", "a:none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # pooled: (4 + 8 + 8) / 60 = 33.3% against 24 / 60 = 40%; utterance 0 better (4 < 8), 1 and 2 the same
    assert lines[0].startswith("a+a_s1: macro WER 33.33% vs none+none 40.00% (-16.7%") and "0 / 1 of 3" in lines[0]
    assert lines[1].startswith("a: macro WER 33.33% vs none 40.00%") and "1 / 1 of 3" in lines[1]
    with pytest.raises(SystemExit, match="pools of them"):
        paired.main([path, "--pair", "a+nope:none"])
