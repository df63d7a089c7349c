"""Runner of the WER benchmark: sharding, resumability, the methods, torchrun (gloo) = single process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastem.bench import report
from fastem.bench.data import default_data_dir, write_synthetic_dataset
from fastem.bench.runner import (
    PROFILES,
    RunConfig,
    StubEngine,
    run,
    shard,
    work_items,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "wer_domains.py"
REAL_DATA = default_data_dir()
TIMING = set(report.TIMING_FIELDS)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("bench_data"), utts_per_corpus=3)


class CountingEngine(StubEngine):
    """The stub recognizer, counting calls."""

    def __init__(self, fail_on: str | None = None):
        super().__init__("stub")
        self.calls: list[tuple[str, str]] = []
        self.fail_on = fail_on

    def transcribe(self, audio, language, **kw):
        self.calls.append(("transcribe", language))
        return super().transcribe(audio, language, **kw)

    def adapt(self, audio, language, objective, overrides):
        self.calls.append((objective, language))
        if objective == self.fail_on:
            raise RuntimeError("boom")
        return super().adapt(audio, language, objective, overrides)


def _cfg(data, **kw) -> RunConfig:
    base = dict(model="stub", domains=["clean", "noise_white_5db", "czech"], utts_per_domain=2, steps=2,
                num_samples=2, data_dir=str(data), engine="stub", progress=False, figure=False)
    base.update(kw)
    return RunConfig(**base)


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _rows(out: Path):
    return report.read_jsonl(out / "rows.jsonl")


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,world", [(0, 1), (7, 1), (7, 2), (10, 3), (5, 8)])
def test_sharding_disjoint_and_complete(n, world):
    items = list(range(n))
    shards = [shard(items, r, world) for r in range(world)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == items and len(flat) == len(set(flat))
    assert max((len(s) for s in shards), default=0) - min((len(s) for s in shards), default=0) <= 1
    assert shards[0] == items[0::world]
    with pytest.raises(ValueError):
        shard(items, world, world)


def test_work_items_deterministic(synth):
    a = work_items(["clean", "telephone", "czech"], synth, 2)
    b = work_items(["clean", "telephone", "czech"], synth, 2)
    assert [(i.index, i.domain, i.utt_id) for i in a] == [(i.index, i.domain, i.utt_id) for i in b]
    assert [i.index for i in a] == list(range(6))
    # corrupted domains use the same source utterances as clean (paired)
    assert [i.utt_id for i in a if i.domain == "clean"] == [i.utt_id for i in a if i.domain == "telephone"]


def test_resume_second_run_does_no_new_work(synth, tmp_path):
    eng = CountingEngine()
    s1 = run(_cfg(synth), tmp_path, engine=eng)
    n_first = len(eng.calls)
    assert n_first == 3 * 2 * 3  # 3 domains x 2 utts x 3 adapted methods; `none` reuses text_before
    assert not any(c[0] == "transcribe" for c in eng.calls)
    rows1 = _rows(tmp_path)
    assert len(rows1) == 3 * 2 * 4
    eng2 = CountingEngine()
    s2 = run(_cfg(synth), tmp_path, engine=eng2)
    assert eng2.calls == []
    assert _rows(tmp_path) == rows1
    assert report.tables_markdown(s1) == report.tables_markdown(s2)
    # a changed adaptation setting reruns the adapted methods but keeps `none`
    eng3 = CountingEngine()
    run(_cfg(synth, steps=3, methods=["none", "em"]), tmp_path, engine=eng3)
    assert [c[0] for c in eng3.calls] == ["em"] * 6


def test_resume_after_interruption(synth, tmp_path):
    run(_cfg(synth), tmp_path, engine=CountingEngine())
    full = _rows(tmp_path)
    shard_file = tmp_path / "shards" / "rank0.jsonl"
    lines = shard_file.read_text().splitlines()
    lines_torn = lines[10][: len(lines[10]) // 2]
    shard_file.write_text("\n".join(lines[:10]) + "\n" + lines_torn)  # torn last line
    eng = CountingEngine()
    run(_cfg(synth), tmp_path, engine=eng)
    assert 0 < len(eng.calls) < 18
    assert _strip(_rows(tmp_path)) == _strip(full)
    lines = shard_file.read_text().splitlines()
    assert lines[10] == lines_torn  # the torn fragment stays alone on its line (skipped when read) ...
    assert all(json.loads(line) for i, line in enumerate(lines) if i != 10)  # ... new rows start fresh lines


def test_none_is_text_before_and_transcribe_only_alone(synth, tmp_path):
    eng = CountingEngine()
    run(_cfg(synth, domains=["clean"]), tmp_path / "a", engine=eng)
    rows = _rows(tmp_path / "a")
    by = {(r["utt_id"], r["method"]): r for r in rows}
    for (utt, m), r in by.items():
        if m != "none":
            assert r["text_before"] == by[(utt, "none")]["hyp"]
            assert r["sample_tokens"] > 0 and r["audio_seconds"] > 0
    assert all(by[(u, "none")]["source"] == "adapt.text_before" for u, _ in by)
    eng2 = CountingEngine()
    run(_cfg(synth, domains=["clean"], methods=["none"]), tmp_path / "b", engine=eng2)
    assert [c[0] for c in eng2.calls] == ["transcribe", "transcribe"]
    rows_b = _rows(tmp_path / "b")
    assert [r["hyp"] for r in rows_b] == [r["hyp"] for r in rows if r["method"] == "none"]
    assert all(r["source"] == "transcribe" and r["seconds"] is not None for r in rows_b)


def test_language_passed_and_english_only_skips_other_languages(synth, tmp_path):
    eng = CountingEngine()
    run(_cfg(synth, methods=["none"]), tmp_path / "multi", engine=eng)
    assert sorted({lang for _, lang in eng.calls}) == ["cs", "en"]
    eng_en = CountingEngine()
    eng_en.english_only = True
    s = run(_cfg(synth, methods=["none"]), tmp_path / "en", engine=eng_en)
    assert s["domains"] == ["clean", "noise_white_5db"]
    assert s["meta"]["skipped_domains"] == ["czech"]


def test_failures_are_recorded_and_retried(synth, tmp_path):
    s = run(_cfg(synth, domains=["clean"]), tmp_path, engine=CountingEngine(fail_on="pg"))
    assert s["meta"]["errors"] == 2 and s["meta"]["missing_rows"] == 2
    errs = report.read_jsonl(tmp_path / "errors" / "rank0.jsonl")
    assert len(errs) == 2 and all("boom" in e["error"] for e in errs)
    eng = CountingEngine()
    s = run(_cfg(synth, domains=["clean"]), tmp_path, engine=eng)
    assert [c[0] for c in eng.calls] == ["pg", "pg"] and s["meta"]["missing_rows"] == 0
    with pytest.raises(RuntimeError):
        run(_cfg(synth, domains=["clean"], steps=5, fail_fast=True), tmp_path, engine=CountingEngine(fail_on="em"))


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_profile_table_structure(profile, synth, tmp_path):
    cfg = RunConfig.from_profile(profile, data_dir=str(synth), engine="stub", progress=False)
    s = run(cfg, tmp_path)
    prof = PROFILES[profile]
    assert s["domains"] == prof["domains"]
    assert s["methods"] == ["none", "entropy", "pg", "em"]
    for d in s["domains"]:
        assert set(s["per_domain"][d]["methods"]) == set(s["methods"])
        assert s["per_domain"][d]["utts"] == prof["utts_per_domain"]
    md = (tmp_path / "results.md").read_text()
    wer_table = md.split("## WER (%) per domain")[1].split("##")[0]
    body = [ln for ln in wer_table.splitlines() if ln.startswith("| ") and not ln.startswith("| domain")]
    assert [ln.split(" | ")[0][2:] for ln in body] == prof["domains"] + ["**mean**"]  # one row per domain
    assert "| domain | lang | utts | words | none | entropy | pg | em |" in md
    assert (tmp_path / "wer_domains.png").is_file() and (tmp_path / "summary.json").is_file()
    assert s["meta"]["steps"] == prof["steps"] and s["meta"]["num_samples"] == prof["num_samples"]
    rows = _rows(tmp_path)
    need = {"domain", "utt_id", "method", "language", "ref", "hyp", "errors", "ref_words", "seconds",
            "audio_seconds", "sample_tokens", "sample_seconds", "config_hash", "model"}
    assert all(need <= set(r) for r in rows)


def _load_script():
    spec = importlib.util.spec_from_file_location("wer_domains_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_overrides_profile():
    mod = _load_script()
    args = mod.build_parser().parse_args(
        ["--profile", "full", "--model", "tiny.en", "--domains", "clean,noise_*", "--utts-per-domain", "2",
         "--methods", "none,em", "--steps", "4", "--lr", "1e-4", "--num-samples", "3", "--params", "decoder",
         "--temperature", "0.7", "--seed", "5", "--device", "cpu", "--max-seconds", "0",
         "--adapt-opt", "baseline=mean", "--adapt-opt", "weight_decay=0.01"])
    cfg = mod.config_from_args(args)
    assert (cfg.model, cfg.utts_per_domain, cfg.methods, cfg.steps, cfg.lr, cfg.num_samples, cfg.params,
            cfg.temperature, cfg.seed, cfg.device, cfg.max_seconds) == (
        "tiny.en", 2, ["none", "em"], 4, 1e-4, 3, "decoder", 0.7, 5, "cpu", None)
    assert cfg.adapt_overrides() == {"steps": 4, "lr": 1e-4, "num_samples": 3, "params": "decoder",
                                     "temperature": 0.7, "seed": 5, "baseline": "mean", "weight_decay": 0.01}
    assert len(cfg.domain_names()) == 16
    with pytest.raises(KeyError):
        mod.config_from_args(mod.build_parser().parse_args(["--domains", "nope"]))


def test_torchrun_two_processes_gloo_equals_single_process(synth, tmp_path):
    common = ["--profile", "smoke", "--engine", "stub", "--data", str(synth), "--domains",
              "clean,noise_white_5db,reverb_hall,czech", "--utts-per-domain", "3", "--no-progress", "--no-figure"]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(SCRIPT), *common, "--out", str(single)], check=True, env=env,
                   capture_output=True, timeout=300)
    multi = tmp_path / "multi"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(SCRIPT), *common, "--out", str(multi), "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "on 2 process(es)" in res.stderr
    s_rows, m_rows = _rows(single), _rows(multi)
    assert len(s_rows) == 4 * 3 * 4
    assert _strip(s_rows) == _strip(m_rows)
    s_md = report.tables_markdown(json.loads((single / "summary.json").read_text()))
    m_md = report.tables_markdown(json.loads((multi / "summary.json").read_text()))
    assert s_md == m_md
    assert json.loads((multi / "summary.json").read_text())["meta"]["world_size"] == 2
    # each rank wrote its own disjoint shard
    r0 = report.read_jsonl(multi / "shards" / "rank0.jsonl")
    r1 = report.read_jsonl(multi / "shards" / "rank1.jsonl")
    assert r0 and r1
    assert not ({(r["domain"], r["utt_id"]) for r in r0} & {(r["domain"], r["utt_id"]) for r in r1})


# ------------------------------------------------------------------------------------------------
# real model
# ------------------------------------------------------------------------------------------------

def _real_model_or_skip():
    if not (REAL_DATA / "speech").is_dir():
        pytest.skip(f"shared data dir not found at {REAL_DATA} (set FASTEM_DATA)")
    from fastem.models import WeightsNotInstalledError, load_whisper

    try:
        load_whisper("tiny.en")
    except WeightsNotInstalledError as err:
        pytest.skip(f"bundled weights not installed: {err}")


def test_none_wer_reproducible_with_real_tiny_en(tmp_path):
    _real_model_or_skip()
    cfg = dict(model="tiny.en", domains=["clean", "noise_white_5db"], utts_per_domain=2, methods=["none"],
               max_seconds=4.0, data_dir=str(REAL_DATA), device="cpu", progress=False, figure=False)
    s1 = run(RunConfig(**cfg), tmp_path / "a")
    s2 = run(RunConfig(**cfg), tmp_path / "b")
    r1, r2 = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(r1) == 4 and all(r["source"] == "transcribe" for r in r1)
    assert [(r["hyp"], r["errors"], r["ref_words"]) for r in r1] == [(r["hyp"], r["errors"], r["ref_words"]) for r in r2]
    assert report.tables_markdown(s1) == report.tables_markdown(s2)
    assert s1["per_domain"]["clean"]["methods"]["none"]["wer"] < 0.5  # a real recognizer, not noise


@pytest.mark.slow
def test_smoke_profile_end_to_end_real_model(tmp_path):
    _real_model_or_skip()
    res = subprocess.run([sys.executable, str(SCRIPT), "--profile", "smoke", "--out", str(tmp_path), "--device", "cpu",
                          "--no-progress", "--data", str(REAL_DATA)],
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)},
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["domains"] == PROFILES["smoke"]["domains"] and s["meta"]["missing_rows"] == 0
    for d in s["domains"]:
        assert set(s["per_domain"][d]["methods"]) == {"none", "entropy", "pg", "em"}
    assert s["speed"]["em"]["tokens_per_s"] > 0
