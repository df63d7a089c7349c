"""The command line on real weights: transcribe (plain, adapted, JSON, WER, bad files) and demo."""
import json

import pytest

from fastem.cli import main


@pytest.fixture(scope="module")
def jfk(shared_data_dir):
    return str(shared_data_dir / "speech" / "jfk" / "jfk.flac")


def test_transcribe_json_with_reference(jfk, capsys):
    ref = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country"
    assert main(["transcribe", jfk, "--model", "tiny.en", "--json", "--reference", ref]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["file"] == jfk and row["wer_before"] <= 0.05 and "after" not in row


def test_transcribe_adapt_prints_before_and_after(jfk, capsys):
    assert main(["transcribe", jfk, "--model", "tiny.en", "--adapt", "--steps", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "(1 steps)" in out


def test_transcribe_reports_bad_files_and_fails(tmp_path, jfk, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    assert main(["transcribe", str(bad), jfk, "--model", "tiny.en", "--json"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert "broken.wav" in rows[0]["error"] and "error" not in rows[1]


def test_reference_count_must_match(jfk):
    with pytest.raises(SystemExit, match="reference"):
        main(["transcribe", jfk, jfk, "--model", "tiny.en", "--reference", "only one"])


def test_demo_runs_on_tiny(capsys):
    assert main(["demo", "--model", "tiny.en", "--steps", "1", "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    for label in ("reference :", "before    :", "after     :", "WER"):
        assert label in out
