"""benchmarks/stream.py: mode parsing and the summary table (the run itself needs real weights)."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "stream.py"
spec = importlib.util.spec_from_file_location("stream_bench", SCRIPT)
stream = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stream)


def test_modes_split_at_known_kinds_and_keep_override_commas():
    modes = stream.parse_modes("none,continual:steps=2,lr=1e-3,episodic:objective=suta")
    assert modes == [("none", "none", {}),
                     ("continual:steps=2,lr=1e-3", "continual", {"steps": 2, "lr": 1e-3}),
                     ("episodic:objective=suta", "episodic", {"objective": "suta"})]
    modes = stream.parse_modes('none,continual:steps=1,guards=["empty","length"],rollback=false')
    assert modes[1] == ('continual:steps=1,guards=["empty","length"],rollback=false', "continual",
                        {"steps": 1, "guards": ["empty", "length"], "rollback": False})
    with pytest.raises(SystemExit, match="unknown mode"):
        stream.parse_modes("sometimes")


def _row(mode, i, ref, text, **extra):
    return {"mode": mode, "index": i, "reference": ref, "text": text, "seconds": 1.0, **extra}


def test_summary_counts_errors_halves_and_resets():
    rows = [_row("none", 0, "a b c d", "a b c d"), _row("none", 1, "e f", "x y"),
            _row("continual", 0, "a b c d", "a b c x", resets=0, rollbacks=1, finite=True, guard="length"),
            _row("continual", 1, "e f", "e f", resets=1, rollbacks=1, finite=True)]
    table = stream.summarize(rows, 2).splitlines()
    none = table[2].split("|")
    cont = table[3].split("|")
    assert none[3].strip() == "33.3%"  # 2 errors / 6 words
    assert cont[3].strip() == "16.7%"  # 1 / 6
    assert cont[4].strip() == "25.0%" and cont[5].strip() == "0.0%"  # first half / second half
    # paired bootstrap over the two utterances: both drawn -50%, the second twice -100%, the first twice dropped
    # (its unadapted transcript has no error, the adapted one has one)
    assert cont[6].strip() == "-50.0% [-100.0%, -50.0%]" and cont[7].strip() == "1 / 1"
    assert [c.strip() for c in cont[8:12]] == ["1", "1", "1", "0"]


def test_relative_change_compares_the_same_rows_when_one_mode_ran_further():
    # `none` stopped after the first utterance; the change must not mix the continual run's second row in
    rows = [_row("none", 0, "a b c d", "a b x x"),
            _row("continual", 0, "a b c d", "a b c x"), _row("continual", 1, "e f", "x y")]
    cont = stream.summarize(rows, 2).splitlines()[3].split("|")
    assert cont[3].strip() == "50.0%"  # the mode's own WER is over all its rows: 3 / 6
    assert cont[6].strip().startswith("-50.0%")  # 1 error against 2 on utterance 0 alone
