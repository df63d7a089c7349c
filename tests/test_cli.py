"""The command line: on real weights (transcribe plain, adapted, JSON, WER, bad files; demo), then many
files with bad, silent and good ones on a stand-in model (no weights)."""
import importlib
import json
import types

import numpy as np
import pytest
import soundfile as sf
import torch

import fastem.cli
from fastem import judge
from fastem.cli import main

ADAPT_MODULE = importlib.import_module("fastem.adapt")  # the attribute fastem.adapt is the function


@pytest.fixture(scope="module")
def jfk(shared_data_dir):
    return str(shared_data_dir / "speech" / "jfk" / "jfk.flac")


def test_transcribe_json_with_reference(jfk, capsys):
    ref = "And so my fellow Americans ask not what your country can do for you ask what you can do for your country"
    assert main(["transcribe", jfk, "--model", "tiny.en", "--json", "--reference", ref]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["file"] == jfk and row["wer_before"] <= 0.05 and "after" not in row


def test_transcribe_adapt_prints_before_and_after(jfk, capsys):
    args = ["transcribe", jfk, "--model", "tiny.en", "--adapt", "--steps", "1", "--num-samples", "2"]
    assert main(args + ["--min-entropy", "0"]) == 0
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and "(1 steps" in out
    # By default the clean JFK clip is one the model is sure of: not adapted, and the output says so.
    assert main(args) == 0
    assert "(0 steps; confident: not adapted)" in capsys.readouterr().out


def test_a_clip_whose_greedy_and_beam_transcripts_agree_says_so(capsys):
    from fastem.cli import _print_row

    _print_row({"file": "a.flac", "seconds": 1.0, "before": "yes", "after": "yes", "steps": 0, "skipped": "agreed"}, False)
    assert "(0 steps; greedy and beam agree: not adapted)" in capsys.readouterr().out


def test_transcribe_reports_bad_files_and_fails(tmp_path, jfk, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    silent = tmp_path / "silent.flac"
    sf.write(silent, np.zeros(16000, dtype=np.int16), 16000)
    missing = tmp_path / "missing.wav"
    assert main(["transcribe", str(bad), str(missing), str(silent), jfk, "--model", "tiny.en", "--json"]) == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert "broken.wav" in rows[0]["error"] and "missing.wav" in rows[1]["error"]
    assert rows[2]["before"] == "" and rows[2]["silent"] is True
    assert "error" not in rows[3] and "Americans" in rows[3]["before"]
    assert f"{bad}: cannot read audio file" in err and f"{missing}: audio file not found" in err
    assert "fastem: 2 ok, 2 failed (4 files)" in err


def test_reference_count_must_match(jfk):
    with pytest.raises(SystemExit, match="reference"):
        main(["transcribe", jfk, jfk, "--model", "tiny.en", "--reference", "only one"])


def test_demo_runs_on_tiny(capsys):
    assert main(["demo", "--model", "tiny.en", "--steps", "1", "--num-samples", "2", "--snr", "clean,-3"]) == 0
    out = capsys.readouterr().out
    for label in ("reference :", "greedy    :", "after     :", "5-beam    :", "WER", "| clean |", "| noise -3 dB |",
                  "| condition | greedy | adapted | 5-beam | decided by |"):
        assert label in out
    assert main(["demo", "--model", "tiny.en", "--steps", "1", "--num-samples", "2", "--min-entropy", "50",
                 "--snr", "-3"]) == 0
    out = capsys.readouterr().out
    assert "adaptation: not run, the model is sure of this clip" in out and "gate: sure of it" in out


# --- Many files: keep going past bad ones (a stand-in model: no weights needed) ------------------

@pytest.fixture
def fake_model(monkeypatch):
    """Stand-ins for the model loader, transcribe and adapt; records what they were called with."""
    calls = {"load": 0, "transcribe": [], "adapt": []}

    def load(args):
        calls["load"] += 1
        return "model", "processor"

    def transcribe_batch(model, audios, *, processor=None, sampling_rate=None, language=None, **rules):
        assert (model, processor) == ("model", "processor")
        calls.setdefault("rules", []).append(rules)
        for audio in audios:
            assert isinstance(audio, torch.Tensor) and audio.ndim == 1 and sampling_rate == 16000
        calls["transcribe"].extend(audios)
        if any(float(a.abs().max()) > 0.9 for a in audios):
            raise ValueError("model refused this one")
        return [f"tone of {a.numel()} samples" for a in audios]

    def adapt_batch(model, audios, *, processor=None, sampling_rate=None, language=None, config=None, batch_size=None):
        assert sampling_rate == 16000 and config is not None and batch_size >= 1
        calls["adapt"].extend(audios)
        calls.setdefault("batches", []).append(len(audios))
        return [types.SimpleNamespace(text_before="before text", text="after text", language="en", guard=None,
                                      skipped=None)
                for _ in audios]

    monkeypatch.setattr(fastem.cli, "_load", load)
    monkeypatch.setattr(ADAPT_MODULE, "transcribe_batch", transcribe_batch)
    monkeypatch.setattr(ADAPT_MODULE, "adapt_batch", adapt_batch)
    return calls


def _wav(path, samples, rate=16000):
    sf.write(path, samples, rate, subtype="FLOAT")
    return str(path)


@pytest.fixture
def files(tmp_path):
    t = np.arange(8000) / 16000
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\0\0\0\0WAVEjunk" * 10)
    return {
        "good": _wav(tmp_path / "good.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)),
        "good8k": _wav(tmp_path / "good8k.wav", (0.5 * np.sin(2 * np.pi * 440 * t[:4000])).astype(np.float32), 8000),
        "silent": _wav(tmp_path / "silent.wav", np.zeros(8000, dtype=np.float32)),
        "loud": _wav(tmp_path / "loud.wav", np.full(8000, 0.95, dtype=np.float32)),
        "missing": str(tmp_path / "missing.flac"),
        "broken": str(broken),
        "nan": _wav(tmp_path / "nan.wav", np.array([0.1, np.nan] * 4000, dtype=np.float32)),
    }


def test_bad_files_are_reported_on_stderr_and_the_run_goes_on(files, fake_model, capsys):
    order = ["missing", "good", "broken", "silent", "nan", "good8k", "loud"]
    assert main(["transcribe", *(files[k] for k in order)]) == 1
    out, err = capsys.readouterr()
    assert f"{files['missing']}: audio file not found" in err
    assert f"{files['broken']}: cannot read audio file {files['broken']}" in err
    assert f"{files['nan']}: audio {files['nan']} contains NaN or Inf" in err
    assert f"{files['loud']}: model refused this one" in err
    assert err.rstrip().splitlines()[-1] == "fastem: 3 ok, 4 failed (7 files)"
    # Every usable file was transcribed, in order, from a 16 kHz wave; the silent one skipped the model.
    assert [a.numel() for a in fake_model["transcribe"]] == [8000, 8000, 8000] and fake_model["load"] == 1
    assert f"== {files['good']}" in out and "text: tone of 8000 samples" in out
    assert f"== {files['silent']}" in out and "(silent audio)" in out and "     text: \n" in out
    for bad in ("missing", "broken", "nan", "loud"):
        assert files[bad] not in out  # failures go to stderr only in text mode


def test_json_rows_carry_errors_and_silence(files, fake_model, capsys):
    args = [files["broken"], files["silent"], files["good"]]
    assert main(["transcribe", *args, "--json", "--reference", "a", "--reference", "b", "--reference", "c"]) == 1
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"] for r in rows] == args
    assert "cannot read audio file" in rows[0]["error"] and "before" not in rows[0]
    assert rows[1]["before"] == "" and rows[1]["silent"] is True and rows[1]["wer_before"] == 1.0
    assert rows[2]["before"] == "tone of 8000 samples" and "error" not in rows[2]
    assert "fastem: 2 ok, 1 failed (3 files)" in err


def test_silent_files_never_load_the_model(files, fake_model, capsys):
    assert main(["transcribe", files["silent"], files["silent"], "--adapt", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert all(r["before"] == "" and r["after"] == "" and r["steps"] == 0 for r in rows)
    assert fake_model["load"] == 0 and not fake_model["transcribe"] and not fake_model["adapt"]


def test_all_good_files_exit_zero(files, fake_model, capsys):
    assert main(["transcribe", files["good"], files["good8k"], "--adapt"]) == 0
    out, err = capsys.readouterr()
    assert out.count("after: after text") == 2 and "fastem: 2 ok, 0 failed (2 files)" in err
    assert len(fake_model["adapt"]) == 2 and fake_model["load"] == 1


def test_a_recording_over_30_s_reaches_the_pipeline_whole(tmp_path, fake_model, capsys):
    """The pipeline cuts long recordings into windows (as ``fastem.adapt`` does for a file), so the CLI must not
    refuse them at 30 s."""
    t = np.arange(31 * 16000) / 16000
    long = _wav(tmp_path / "long.wav", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert main(["transcribe", long]) == 0 and main(["transcribe", long, "--adapt"]) == 0
    assert [a.numel() for a in fake_model["transcribe"] + fake_model["adapt"]] == [31 * 16000] * 2


def test_only_missing_files_fail_without_loading_the_model(tmp_path, fake_model, capsys):
    assert main(["transcribe", str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]) == 1
    err = capsys.readouterr().err
    assert "a.wav: audio file not found" in err and "b.wav: audio file not found" in err
    assert "fastem: 0 ok, 2 failed (2 files)" in err and fake_model["load"] == 0


def test_batch_size_groups_the_files(files, fake_model, capsys):
    argv = ["transcribe", files["good"], files["missing"], files["good8k"], files["good"], "--adapt",
            "--batch-size", "2", "--json"]
    assert fastem.cli.main(argv) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [("error" in r) for r in rows] == [False, True, False, False]
    assert fake_model["batches"] == [1, 2]  # the missing file leaves one good file in the first pair
    assert all(r["after"] == "after text" for r in rows if "error" not in r)


def test_guards_and_max_logp_drop_options(files, fake_model, capsys, monkeypatch):
    seen, drops, verifiers, seq_drops = [], [], [], []
    real = ADAPT_MODULE.adapt_batch

    def spy(model, audios, **kw):
        seen.append(kw["config"].active_guards)
        drops.append(kw["config"].max_logp_drop)
        verifiers.append((kw["config"].verifier, kw["config"].max_verifier_drop))
        seq_drops.append(kw["config"].max_seq_logp_drop)
        return real(model, audios, **kw)

    monkeypatch.setattr(ADAPT_MODULE, "adapt_batch", spy)
    assert main(["transcribe", files["good"], "--adapt", "--guards", "empty,consensus"]) == 0
    assert main(["transcribe", files["good"], "--adapt", "--guards", "none"]) == 0
    assert main(["transcribe", files["good"], "--adapt"]) == 0
    assert seen == [("empty", "consensus"), (), fastem.AdaptConfig().active_guards]
    assert main(["transcribe", files["good"], "--adapt", "--max-logp-drop", "0"]) == 0
    assert drops == [fastem.AdaptConfig().max_logp_drop] * 3 + [0.0]
    assert main(["transcribe", files["good"], "--adapt", "--verifier", "tiny.en", "--max-verifier-drop", "0.2"]) == 0
    assert verifiers[-1] == ("tiny.en", 0.2) and verifiers[0] == ("auto", fastem.AdaptConfig().max_verifier_drop)
    assert main(["transcribe", files["good"], "--adapt", "--verifier", "none"]) == 0
    assert verifiers[-1][0] is None and "verifier" not in seen[-1]  # 'none' leaves the guard out
    assert main(["transcribe", files["good"], "--adapt", "--max-seq-logp-drop", "0"]) == 0
    assert seq_drops[-1] == 0.0 and seq_drops[0] == fastem.AdaptConfig().max_seq_logp_drop == "auto"
    assert "likelihood" in seen[-1] and "likelihood" not in seen[0]  # a threshold runs the guard the default leaves out
    assert main(["transcribe", files["good"], "--adapt", "--max-seq-logp-drop", "none", "--draws", "1"]) == 0
    assert "likelihood" not in seen[-1] and "verifier" in seen[-1]
    assert main(["transcribe", files["good"], "--adapt", "--draws", "1"]) == 0
    assert seen[-1] == judge.DEFAULT_GUARDS  # one draw: the scored guards and the verifier's vote judge it
    assert seen[-3] == judge.TEXTUAL_GUARDS + ("likelihood",)  # two draws (auto): a threshold adds the guard
    assert main(["transcribe", files["good"], "--adapt", "--beams", "2"]) == 0
    assert seen[-1] == judge.TEXTUAL_GUARDS  # two draws with beams: the medoid judges, as with greedy decoding
    assert main(["transcribe", files["good"], "--adapt", "--beams", "2", "--draws", "1"]) == 0
    assert seen[-1] == judge.BEAM_GUARDS  # one draw with beams: the default judge asks the verifier what it hears
    assert main(["transcribe", files["good"], "--adapt", "--beams", "2", "--draws", "1", "--verifier", "none"]) == 0
    assert "agreement" not in seen[-1] and "verifier" not in seen[-1] and "consensus" in seen[-1]
    with pytest.raises(SystemExit):
        main(["transcribe", files["good"], "--adapt", "--guards", "empty,nonsense"])
    assert "unknown guard(s) nonsense" in capsys.readouterr().err


def test_decoding_options_reach_transcribe_and_adapt(files, fake_model, monkeypatch):
    seen = []
    real = ADAPT_MODULE.adapt_batch
    monkeypatch.setattr(ADAPT_MODULE, "adapt_batch", lambda model, audios, **kw: seen.append(kw["config"]) or real(
        model, audios, **kw))
    assert main(["transcribe", files["good"], "--adapt", "--beams", "4", "--no-speech-threshold", "none"]) == 0
    assert seen[-1].num_beams == 4 and seen[-1].no_speech_threshold is None
    assert seen[-1].stop_when_settled is False and seen[-1].settle_updates == 0
    assert seen[-1].steps == "auto" and seen[-1].step_count == 5 and seen[-1].num_samples == 8  # one recipe
    assert main(["transcribe", files["good"], "--adapt"]) == 0
    assert seen[-1].num_beams == "auto" and seen[-1].beam_count == 5  # the default: beams, with two draws
    assert main(["transcribe", files["good"], "--adapt", "--draws", "1"]) == 0
    assert seen[-1].beam_count == 1  # one draw: greedy unless --beams says otherwise
    for value, steps in (("auto", 5), ("3", 3)):
        assert main(["transcribe", files["good"], "--adapt", "--steps", value]) == 0
        assert seen[-1].step_count == steps
    for value, updates in (("off", 0), ("5", 5)):
        assert main(["transcribe", files["good"], "--adapt", "--stop-when-settled", value]) == 0
        assert seen[-1].settle_updates == updates
    for bad in ("0", "soon", "auto"):
        with pytest.raises(SystemExit):
            main(["transcribe", files["good"], "--adapt", "--stop-when-settled", bad])
    for value, draws in (("auto", 2), ("1", 1), ("3", 3)):
        assert main(["transcribe", files["good"], "--adapt", "--draws", value]) == 0
        assert seen[-1].draw_count == draws
    for bad in ("0", "two", "off"):
        with pytest.raises(SystemExit):
            main(["transcribe", files["good"], "--adapt", "--draws", bad])
    for value in ("layernorm:encoder", "layernorm:top2", "all"):  # every set the library takes, not a subset
        assert main(["transcribe", files["good"], "--adapt", "--params", value]) == 0
        assert seen[-1].params == value
    with pytest.raises(SystemExit):
        main(["transcribe", files["good"], "--adapt", "--params", "layernorm:top"])
    assert main(["transcribe", files["good"]]) == 0
    assert fake_model["rules"][-1] == {"compression_ratio_threshold": 2.4, "logprob_threshold": -1.0,
                                       "no_speech_threshold": 0.6, "num_beams": 1}
    assert main(["transcribe", files["good"], "--logprob-threshold", "none", "--no-speech-threshold", "0.8",
                 "--beams", "5"]) == 0
    assert fake_model["rules"][-1] == {"compression_ratio_threshold": 2.4, "logprob_threshold": None,
                                       "no_speech_threshold": 0.8, "num_beams": 5}
