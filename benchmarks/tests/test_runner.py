"""Runner of the WER benchmark: sharding, resumability, named methods, batching, the dev / screen
profiles, torchrun (gloo) = single process."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import report
from harness.data import default_data_dir, write_synthetic_dataset
from harness.domains import DOMAINS
from harness.runner import (
    BUILTIN_METHODS,
    DEV_DOMAINS,
    PROFILES,
    AdaptOutput,
    FastemEngine,
    RunConfig,
    StubEngine,
    config_hash,
    decode_settings,
    parse_definition,
    resolved_adapt_config,
    run,
    shard,
    work_items,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "wer_domains.py"
REAL_DATA = default_data_dir()
TIMING = set(report.TIMING_FIELDS)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("bench_data"), utts_per_corpus=3)


class CountingEngine(StubEngine):
    """The stub recognizer, counting calls: ``(objective or "default", language)`` per adapt."""

    def __init__(self, fail_on: str | None = None):
        super().__init__("stub")
        self.calls: list[tuple[str, str]] = []
        self.overrides: list[dict] = []
        self.fail_on = fail_on

    def transcribe(self, audio, language, **kw):
        self.calls.append(("transcribe", language))
        return super().transcribe(audio, language, **kw)

    def adapt(self, audio, language, overrides):
        objective = overrides.get("objective", "default")
        self.calls.append((objective, language))
        self.overrides.append(dict(overrides))
        if objective == self.fail_on:
            raise RuntimeError("boom")
        return super().adapt(audio, language, overrides)


class BatchingEngine(CountingEngine):
    """Counting stub with ``adapt_batch`` (a loop over ``adapt``), recording each batch's size."""

    def __init__(self, fail_batches: bool = False, **kw):
        super().__init__(**kw)
        self.batches: list[tuple[str, int]] = []
        self.fail_batches = fail_batches

    def adapt_batch(self, audios, languages, overrides):
        self.batches.append((overrides.get("objective", "default"), len(audios)))
        if self.fail_batches:
            raise RuntimeError("batch boom")
        return StubEngine.adapt_batch(self, audios, languages, overrides)


def _cfg(data, **kw) -> RunConfig:
    # greedy decoding shared by every method (the library's default decodes with beams, and then `none` is decoded
    # apart: test_a_beam_method_never_stands_in_for_the_greedy_none)
    base = dict(model="stub", domains=["clean", "noise_white_5db", "czech"], utts_per_domain=2, steps=2,
                num_samples=2, data_dir=str(data), engine="stub", progress=False, figure=False,
                adapt_options={"num_beams": 1})
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


def test_a_beam_method_never_stands_in_for_the_greedy_none(synth, tmp_path):
    """``none`` is the greedy transcript: a method decoding with beams (another unadapted transcript) is not
    reused for it, neither when it runs nor from its cached rows; a greedy method still is."""
    defs = {"beam5": {"num_beams": 5}}
    eng = CountingEngine()
    run(_cfg(synth, domains=["clean"], methods=["none", "beam5"], definitions=defs), tmp_path / "a", engine=eng)
    by = {(r["utt_id"], r["method"]): r for r in _rows(tmp_path / "a")}
    utts = sorted({u for u, _ in by})
    assert [c[0] for c in eng.calls].count("transcribe") == len(utts)
    for u in utts:
        assert by[(u, "none")]["source"] == "transcribe"
        assert by[(u, "beam5")]["text_before"] != by[(u, "none")]["hyp"]
    # cached beam rows only: `none` is decoded, not copied from them
    shard = tmp_path / "a" / "shards" / "rank0.jsonl"
    kept = [line for line in shard.read_text().splitlines() if json.loads(line)["method"] != "none"]
    (tmp_path / "b" / "shards").mkdir(parents=True)
    (tmp_path / "b" / "shards" / "rank0.jsonl").write_text("\n".join(kept) + "\n")
    eng2 = CountingEngine()
    run(_cfg(synth, domains=["clean"], methods=["none", "beam5"], definitions=defs), tmp_path / "b", engine=eng2)
    assert [c[0] for c in eng2.calls] == ["transcribe"] * len(utts)
    assert {r["utt_id"]: r["hyp"] for r in _rows(tmp_path / "b") if r["method"] == "none"} == \
        {u: by[(u, "none")]["hyp"] for u in utts}
    eng3 = CountingEngine()  # a greedy method beside it still stands in
    run(_cfg(synth, domains=["clean"], methods=["none", "fastem", "beam5"], definitions=defs), tmp_path / "c", engine=eng3)
    rows = {(r["utt_id"], r["method"]): r for r in _rows(tmp_path / "c")}
    assert "transcribe" not in [c[0] for c in eng3.calls]
    assert all(rows[(u, "none")]["hyp"] == rows[(u, "fastem")]["text_before"] == by[(u, "none")]["hyp"] for u in utts)


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


@pytest.mark.parametrize("profile", ["smoke", "quick", "screen"])
def test_profile_table_structure(profile, synth, tmp_path):
    cfg = RunConfig.from_profile(profile, data_dir=str(synth), engine="stub", progress=False)
    s = run(cfg, tmp_path)
    prof = PROFILES[profile]
    assert s["domains"] == prof["domains"]
    assert s["methods"] == prof["methods"]
    for d in s["domains"]:
        assert set(s["per_domain"][d]["methods"]) == set(s["methods"])
        assert s["per_domain"][d]["utts"] == prof["utts_per_domain"]
    md = (tmp_path / "results.md").read_text()
    wer_table = md.split("## WER (%) per domain")[1].split("##")[0]
    body = [ln for ln in wer_table.splitlines() if ln.startswith("| ") and not ln.startswith("| domain")]
    assert [ln.split(" | ")[0][2:] for ln in body] == prof["domains"] + ["**mean**"]  # one row per domain
    assert "| domain | lang | utts | words | " + " | ".join(prof["methods"]) + " |" in md
    assert set(s["paired"]) == set(prof["methods"]) - {"none"}
    paired = md.split("## Adapted methods vs `none`")[1].split("##")[0]
    assert [ln.split(" | ")[0][2:] for ln in paired.splitlines() if ln.startswith("| ")][1:] == prof["methods"]
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
# named methods
# ------------------------------------------------------------------------------------------------

def test_builtin_methods_and_definition_precedence():
    cfg = RunConfig(steps=2, lr=1e-4, params="layernorm", adapt_options={"baseline": "mean", "objective": "pg"},
                    definitions={"em_fast": {"objective": "em", "lr": 1e-3, "baseline": "loo"}})
    assert set(BUILTIN_METHODS) == {"none", "fastem", "entropy", "pg", "em", "suta"}
    assert cfg.method_overrides("none") is None
    shared = {"steps": 2, "lr": 1e-4, "params": "layernorm", "baseline": "mean"}  # no objective in shared options
    assert cfg.method_overrides("fastem") == shared  # the library's default objective
    for m in ("entropy", "pg", "em"):
        assert cfg.method_overrides(m) == {**shared, "objective": m}
    # suta carries its research code's settings, which win over the shared options
    assert cfg.method_overrides("suta") == {**shared, **BUILTIN_METHODS["suta"]}
    # the definition wins over the shared options on the same key; the others still apply
    assert cfg.method_overrides("em_fast") == {"steps": 2, "lr": 1e-3, "params": "layernorm", "baseline": "loo",
                                               "objective": "em"}
    with pytest.raises(ValueError, match="unknown method"):
        cfg.method_overrides("nope")
    with pytest.raises(ValueError, match="built in"):
        RunConfig(definitions={"em": {"lr": 1.0}}).method_table()
    with pytest.raises(ValueError):
        RunConfig(definitions={"a,b": {}}).method_table()


def test_parse_definition_values_are_json_when_possible():
    assert parse_definition("em_lr1e-3=objective=em;lr=1e-3;params=decoder") == (
        "em_lr1e-3", {"objective": "em", "lr": 1e-3, "params": "decoder"})
    assert parse_definition("x=episodic=false; num-samples=8;max_new_tokens=null;note=\"7\";") == (
        "x", {"episodic": False, "num_samples": 8, "max_new_tokens": None, "note": "7"})
    assert parse_definition("plain=") == ("plain", {})
    for bad in ("noequals", "=lr=1", "x=lr", "a b=lr=1"):
        with pytest.raises(ValueError):
            parse_definition(bad)


def test_run_passes_each_methods_overrides(synth, tmp_path):
    eng = CountingEngine()
    cfg = _cfg(synth, domains=["clean"], methods=["none", "fastem", "suta", "mine"], lr=1e-4,
               definitions={"mine": {"objective": "pg", "lr": 1e-3, "params": "decoder"}})
    s = run(cfg, tmp_path, engine=eng)
    assert [c[0] for c in eng.calls] == ["default", "suta", "pg"] * 2
    shared = {"steps": 2, "num_samples": 2, "num_beams": 1}
    assert eng.overrides[:3] == [{**shared, "lr": 1e-4}, {**shared, "lr": 1e-4, **BUILTIN_METHODS["suta"]},
                                 {**shared, "lr": 1e-3, "objective": "pg", "params": "decoder"}]
    rows = _rows(tmp_path)
    assert [r["method"] for r in rows] == ["none", "fastem", "suta", "mine"] * 2
    by = {r["method"]: r for r in rows}
    assert by["suta"]["adapt"]["objective"] == "suta"
    assert by["mine"]["adapt"]["lr"] == 1e-3 and by["fastem"]["adapt"]["lr"] == 1e-4
    assert s["methods"] == ["none", "fastem", "suta", "mine"] and set(s["paired"]) == {"fastem", "suta", "mine"}
    assert s["meta"]["method_overrides"]["mine"]["params"] == "decoder"
    assert s["meta"]["definitions"] == {"mine": {"objective": "pg", "lr": 1e-3, "params": "decoder"}}
    with pytest.raises(ValueError, match="unknown methods"):
        run(_cfg(synth, methods=["none", "nope"]), tmp_path / "x", engine=CountingEngine())


def test_resolved_config_fills_defaults_or_falls_back_to_the_raw_dict():
    import fastem

    full = resolved_adapt_config({"lr": 1e-3})
    assert full["lr"] == 1e-3 and full["steps"] == fastem.AdaptConfig().step_count and "backend" not in full
    default = resolved_adapt_config({})
    assert default.keys() == full.keys() and default["lr"] == fastem.AdaptConfig().lr
    assert resolved_adapt_config({"objective": "em", "no_such_key": 1}) == {"objective": "em", "no_such_key": 1}
    assert resolved_adapt_config({"objective": "suta"})["objective"] == "suta"  # no crash either way
    dom = DOMAINS["clean"]
    a = config_hash("em", dom, 0, resolved_adapt_config({"objective": "em"}))
    assert a != config_hash("fastem", dom, 0, resolved_adapt_config({"objective": "em"}))  # the name counts
    assert a != config_hash("em", dom, 0, resolved_adapt_config({"objective": "em", "lr": 1e-3}))
    assert a == config_hash("em", dom, 0, resolved_adapt_config({"objective": "em"}))


def test_suta_is_ungated_and_its_rows_predate_the_gate():
    """SUTA's research code adapts every utterance: the built-in method turns the confidence gate off, and a
    setting at its no-op value is left out of the row key, so rows written before the gate existed stay valid."""
    import fastem

    assert BUILTIN_METHODS["suta"]["min_entropy"] == 0.0 and fastem.AdaptConfig().gate_entropy > 0.0
    suta = resolved_adapt_config(BUILTIN_METHODS["suta"])
    assert "min_entropy" not in suta
    assert resolved_adapt_config({"min_entropy": 0.5})["min_entropy"] == 0.5  # only the no-op value is dropped
    gated = resolved_adapt_config({k: v for k, v in BUILTIN_METHODS["suta"].items() if k != "min_entropy"})
    dom = DOMAINS["clean"]
    assert config_hash("suta", dom, 0, suta) != config_hash("suta", dom, 0, gated)


def test_a_verifier_switched_off_leaves_the_row_key_alone():
    """``verifier=None`` (with "verifier" out of ``guards``) is left out of the key with its threshold; the
    library's decoding rules are part of every adapted key and of the unadapted transcript's
    (``decode_settings``), so rows decoded before Whisper's rules existed are not taken for new ones."""
    import fastem

    off = {"guards": [g for g in fastem.AdaptConfig().active_guards if g != "verifier"], "verifier": None}
    old = resolved_adapt_config(off)
    assert "verifier" not in old and "max_verifier_drop" not in old
    assert resolved_adapt_config({**off, "max_verifier_drop": 0.3}) == old  # a threshold without its verifier
    default = resolved_adapt_config({})  # beams: the likelihood guard abstains, so its threshold is left out
    assert default["verifier"] == "auto" and "max_seq_logp_drop" not in default and default["max_verifier_drop"] == 0.1
    assert resolved_adapt_config({"num_beams": 1})["max_seq_logp_drop"] == 2.0
    rules = decode_settings({}, adapted=False)
    assert rules == {"compression_ratio_threshold": 2.4, "logprob_threshold": -1.0, "no_speech_threshold": 0.6}
    assert all(default[k] == v for k, v in rules.items())
    dom = DOMAINS["clean"]
    assert config_hash("none", dom, 0, None) != config_hash("none", dom, 0, None, None, rules)
    assert decode_settings({"logprob_threshold": None})["logprob_threshold"] is None
    assert default["num_beams"] == 5 and decode_settings({})["num_beams"] == 5  # the default adapted call decodes with beams
    assert "num_beams" not in decode_settings({}, adapted=False)  # `none`, as fastem.transcribe: greedy
    assert "num_beams" not in resolved_adapt_config({"num_beams": 1}) and "num_beams" not in decode_settings({"draws": 1})
    assert decode_settings({"num_beams": 5}, adapted=False)["num_beams"] == 5


def test_auto_steps_are_keyed_as_the_steps_the_call_takes():
    """``steps="auto"`` is keyed as the steps it resolves to, so rows of written-out steps stay valid."""
    assert resolved_adapt_config({})["steps"] == 5 and resolved_adapt_config({})["num_samples"] == 8
    assert resolved_adapt_config({}) == resolved_adapt_config({"steps": 5, "num_samples": 8})
    assert resolved_adapt_config({"num_beams": 5}) == resolved_adapt_config({"num_beams": 5, "steps": 5})  # one recipe
    assert resolved_adapt_config({"num_beams": 5}) != resolved_adapt_config({"num_beams": 5, "steps": 10})
    assert resolved_adapt_config({}) == resolved_adapt_config({"num_beams": 5, "draws": 2})  # "auto", written out


def test_changing_a_definition_reruns_only_that_method(synth, tmp_path):
    def cfg(lr):
        return _cfg(synth, methods=["none", "em", "mine"], definitions={"mine": {"objective": "em", "lr": lr}})

    run(cfg(1e-3), tmp_path, engine=CountingEngine())
    first = {(r["domain"], r["utt_id"], r["method"]): r for r in _rows(tmp_path)}
    eng = CountingEngine()
    run(cfg(1e-3), tmp_path, engine=eng)
    assert eng.calls == []
    eng = CountingEngine()
    run(cfg(2e-3), tmp_path, engine=eng)
    assert len(eng.calls) == 6 and all(o["lr"] == 2e-3 for o in eng.overrides)
    second = {(r["domain"], r["utt_id"], r["method"]): r for r in _rows(tmp_path)}
    assert second.keys() == first.keys()
    for k, r in second.items():
        same = k[2] != "mine"
        assert (r["config_hash"] == first[k]["config_hash"]) == same
    # a shared option the definition does not set changes every adapted method's key, not none's
    eng = CountingEngine()
    run(_cfg(synth, methods=["none", "em", "mine"], definitions={"mine": {"objective": "em", "lr": 2e-3}},
             steps=3), tmp_path, engine=eng)
    assert sorted(c[0] for c in eng.calls) == ["em"] * 12


def test_guard_and_changed_recorded(synth, tmp_path):
    class GuardEngine(CountingEngine):
        def adapt(self, audio, language, overrides):
            out = super().adapt(audio, language, overrides)
            if overrides.get("objective") == "pg":  # a guard rejected the adaptation: the unadapted text stays
                out.text, out.guard = out.text_before, "length_ratio"
            return out

    s = run(_cfg(synth, domains=["clean"], methods=["none", "pg", "em"]), tmp_path, engine=GuardEngine())
    rows = _rows(tmp_path)
    pg = [r for r in rows if r["method"] == "pg"]
    em = [r for r in rows if r["method"] == "em"]
    assert all(r["guard"] == "length_ratio" and r["changed"] is False for r in pg)
    assert all(r["guard"] is None and r["changed"] == (r["hyp"] != r["text_before"]) for r in em)
    assert s["paired"]["pg"]["guarded"] == 2 and s["paired"]["pg"]["guards"] == {"length_ratio": 2}
    assert s["paired"]["pg"]["changed"] == 0 and s["paired"]["pg"]["rel_change"] == 0.0


# ------------------------------------------------------------------------------------------------
# batching
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [2, 4, 5])
def test_batching_writes_the_same_rows_as_batch_size_one(batch, synth, tmp_path):
    methods = ["none", "em", "mine"]
    defs = {"mine": {"objective": "pg", "lr": 1e-3}}
    one = CountingEngine()
    run(_cfg(synth, methods=methods, definitions=defs), tmp_path / "one", engine=one)
    eng = BatchingEngine()
    s = run(_cfg(synth, methods=methods, definitions=defs, batch_size=batch), tmp_path / "batch", engine=eng)
    assert _strip(_rows(tmp_path / "batch")) == _strip(_rows(tmp_path / "one"))
    assert sorted(eng.calls) == sorted(one.calls)  # the same adaptations, each once
    sizes = [n for _, n in eng.batches]
    chunks = [min(batch, 6 - i) for i in range(0, 6, batch)]  # 6 items, in work-list order
    for objective in ("em", "pg"):  # a chunk of one item is a plain adapt call
        assert [n for m, n in eng.batches if m == objective] == [n for n in chunks if n > 1]
    assert s["meta"]["batch_size"] == batch and s["meta"]["missing_rows"] == 0
    assert {r["batch_items"] for r in _rows(tmp_path / "batch") if r["method"] != "none"} <= set(sizes) | {1}
    # resumable: a rerun with batching does nothing new; cached batch-1 rows are reused by a batched run
    eng2 = BatchingEngine()
    run(_cfg(synth, methods=methods, definitions=defs, batch_size=batch), tmp_path / "one", engine=eng2)
    assert eng2.calls == [] and eng2.batches == []


def test_batching_resumes_a_torn_run_and_isolates_failures(synth, tmp_path):
    run(_cfg(synth), tmp_path / "ref", engine=CountingEngine())
    ref = _strip(_rows(tmp_path / "ref"))
    run(_cfg(synth, batch_size=3), tmp_path / "a", engine=BatchingEngine())
    shard_file = tmp_path / "a" / "shards" / "rank0.jsonl"
    lines = shard_file.read_text().splitlines()
    shard_file.write_text("\n".join(lines[:7]) + "\n")
    eng = BatchingEngine()
    run(_cfg(synth, batch_size=3), tmp_path / "a", engine=eng)
    assert 0 < len(eng.calls) < 18
    assert not any(c[0] == "transcribe" for c in eng.calls)  # `none` of a cached item: its cached text_before
    assert _strip(_rows(tmp_path / "a")) == ref
    # a failing batch call falls back to one adapt per item; a failing item is recorded, the rest kept
    eng = BatchingEngine(fail_batches=True, fail_on="pg")
    s = run(_cfg(synth, batch_size=4), tmp_path / "b", engine=eng)
    assert s["meta"]["errors"] == 6 and s["meta"]["missing_rows"] == 6
    assert _strip(_rows(tmp_path / "b")) == [r for r in ref if r["method"] != "pg"]
    with pytest.raises(RuntimeError, match="batch boom"):
        run(_cfg(synth, batch_size=4, steps=7, fail_fast=True), tmp_path / "c", engine=BatchingEngine(fail_batches=True))


class _NoBatch:
    """A minimal engine with only ``adapt`` / ``transcribe`` (no ``adapt_batch``)."""

    model_name = "nobatch"
    english_only = False

    def __init__(self):
        self._stub = StubEngine("nobatch")

    def transcribe(self, audio, language, **kw):
        return self._stub.transcribe(audio, language, **kw)

    def adapt(self, audio, language, overrides):
        return self._stub.adapt(audio, language, overrides)


def test_engine_without_adapt_batch_runs_one_item_at_a_time(synth, tmp_path):
    s = run(_cfg(synth, methods=["none", "em"], batch_size=4), tmp_path, engine=_NoBatch())
    assert s["meta"]["batch_size"] == 1 and s["meta"]["missing_rows"] == 0
    assert {r["batch_items"] for r in _rows(tmp_path) if r["method"] == "em"} == {1}


def test_fastem_engine_adapt_batch_calls_fastem_adapt_batch(monkeypatch):
    import types

    import fastem
    import torch

    eng = object.__new__(FastemEngine)
    eng.model, eng.processor, eng.model_name, eng.english_only = "MODEL", "PROC", "m", False
    res = types.SimpleNamespace(text="b", text_before="a", seconds=None, guard="len",
                                tokens_before=torch.tensor([5, 6]), tokens_adapted=[7])
    got = {}

    def fake_batch(model, audios, **kw):
        got.update(model=model, n=len(audios), **kw)
        return [res] * len(audios)

    monkeypatch.setattr(fastem, "adapt_batch", fake_batch, raising=False)
    outs = eng.adapt_batch([torch.zeros(8), torch.zeros(9)], ["en", "cs"], {"objective": "em", "lr": 1e-3})
    assert got == {"model": "MODEL", "n": 2, "processor": "PROC", "sampling_rate": 16000, "language": ["en", "cs"],
                   "objective": "em", "lr": 1e-3}
    assert [(o.text, o.text_before, o.guard, o.batch_items) for o in outs] == [("b", "a", "len", 2)] * 2
    assert [(o.tokens_before, o.tokens_adapted) for o in outs] == [([5, 6], [7])] * 2  # plain ints, JSON-able
    # without fastem.adapt_batch: one fastem.adapt per item (results without .guard read as None)
    monkeypatch.delattr(fastem, "adapt_batch", raising=False)
    calls = []

    def fake_adapt(model, audio, **kw):
        calls.append(kw)
        return types.SimpleNamespace(text="y", text_before="x")

    monkeypatch.setattr(fastem, "adapt", fake_adapt)
    eng.english_only = True
    outs = eng.adapt_batch([torch.zeros(8), torch.zeros(9)], ["en", "cs"], {"steps": 1})
    assert [c["language"] for c in calls] == [None, None] and all(c["steps"] == 1 for c in calls)
    assert [(o.text, o.guard, o.batch_items, o.tokens_before) for o in outs] == [("y", None, 1, None)] * 2
    assert isinstance(outs[0], AdaptOutput)


# ------------------------------------------------------------------------------------------------
# dev / screen profiles
# ------------------------------------------------------------------------------------------------

def test_dev_and_screen_profiles():
    dev, screen = PROFILES["dev"], PROFILES["screen"]
    assert dev["model"] == "base" and dev["utts_per_domain"] == 12 and screen["utts_per_domain"] == 3
    assert dev["methods"] == screen["methods"] == ["none", "fastem", "entropy", "pg", "suta", "em"]
    assert dev["domains"] == screen["domains"] == DEV_DOMAINS
    assert len(DEV_DOMAINS) >= 13 and len(DEV_DOMAINS) * dev["utts_per_domain"] >= 150
    assert DEV_DOMAINS == [d for d in DOMAINS if d in DEV_DOMAINS]  # registry order: the table's order
    kinds = {d: DOMAINS[d] for d in DEV_DOMAINS}
    assert {"czech", "dutch", "nonnative_en", "reverb_clap", "reverb_hall", "telephone"} <= set(kinds)
    assert any(d.startswith("clean_") and ({"kathleen", "ljspeech"} & set(DOMAINS[d].corpora)) for d in kinds)
    real = [d for d in kinds if d.split("_")[1:2] in (["dishes"], ["bike"], ["tap"])]
    assert {d.rsplit("_", 1)[1] for d in real} == {"5db", "0db"}
    assert {d.split("_")[1] for d in real} == {"dishes", "bike", "tap"}
    assert any(d.startswith("noise_white_") for d in kinds) and any(d.startswith("noise_pink_") for d in kinds)
    cfg = RunConfig.from_profile("dev")
    assert (cfg.steps, cfg.num_samples, cfg.max_seconds) == (None, None, None)
    assert cfg.method_overrides("fastem") == {}  # exactly the library's defaults
    assert cfg.method_overrides("em") == {"objective": "em"}


def _screen_is_prefix_of_dev(data_dir):
    dev = RunConfig.from_profile("dev", data_dir=str(data_dir))
    screen = RunConfig.from_profile("screen", data_dir=str(data_dir))
    dev_items = work_items(dev.domain_names(), data_dir, dev.utts_per_domain, max_seconds=dev.max_seconds)
    scr_items = work_items(screen.domain_names(), data_dir, screen.utts_per_domain, max_seconds=screen.max_seconds)
    for d in DEV_DOMAINS:
        dv = [i.utt_id for i in dev_items if i.domain == d]
        sc = [i.utt_id for i in scr_items if i.domain == d]
        assert len(sc) == min(3, len(dv)) and sc == dv[:3], d
    return dev_items, scr_items


def test_screen_items_are_the_first_items_of_dev(synth, tmp_path):
    dev_items, scr_items = _screen_is_prefix_of_dev(synth)
    # the same hashes: a dev run in the screen run's --out reuses every screen row
    kw = dict(data_dir=str(synth), engine="stub", progress=False, figure=False)
    run(RunConfig.from_profile("screen", **kw), tmp_path)
    n_screen = len(_rows(tmp_path))
    assert n_screen == len(scr_items) * 6
    eng = CountingEngine()
    eng.model_name = "stub:base"
    s = run(RunConfig.from_profile("dev", **kw), tmp_path, engine=eng)
    assert len(eng.calls) == (len(dev_items) - len(scr_items)) * 6  # 5 methods decoding with beams, and `none`
    assert s["meta"]["items"] == len(dev_items) and s["meta"]["missing_rows"] == 0


@pytest.mark.skipif(not (REAL_DATA / "speech").is_dir(), reason="shared data dir not found")
def test_dev_profile_on_the_real_data_has_156_utterances():
    dev_items, scr_items = _screen_is_prefix_of_dev(REAL_DATA)
    assert len(dev_items) == 13 * 12 and len(scr_items) == 13 * 3
    assert {i.domain for i in dev_items} == set(DEV_DOMAINS)


def test_cli_define_methods_batch_and_profiles():
    mod = _load_script()
    p = mod.build_parser()
    cfg = mod.config_from_args(p.parse_args(
        ["--profile", "dev", "--define", "em_lr1e-3=objective=em;lr=1e-3;params=decoder", "--define", "d2=",
         "--methods", "none,fastem,em_lr1e-3,d2", "--lr", "1e-4", "--steps", "4", "--batch-size", "8",
         "--bootstrap", "200", "--bootstrap-seed", "3"]))
    assert cfg.profile == "dev" and cfg.model == "base" and cfg.domains == DEV_DOMAINS
    assert cfg.methods == ["none", "fastem", "em_lr1e-3", "d2"]
    assert cfg.definitions == {"em_lr1e-3": {"objective": "em", "lr": 1e-3, "params": "decoder"}, "d2": {}}
    assert cfg.method_overrides("em_lr1e-3") == {"steps": 4, "lr": 1e-3, "params": "decoder", "objective": "em"}
    assert cfg.method_overrides("d2") == cfg.method_overrides("fastem") == {"steps": 4, "lr": 1e-4}
    assert (cfg.batch_size, cfg.bootstrap, cfg.bootstrap_seed) == (8, 200, 3)
    assert mod.config_from_args(p.parse_args(["--profile", "screen"])).utts_per_domain == 3
    assert mod.config_from_args(p.parse_args([])).batch_size == 1
    for bad in (["--methods", "none,nope"], ["--define", "bad"], ["--define", "em=lr=1"], ["--batch-size", "0"],
                ["--define", "a=lr=1", "--define", "a=lr=2"]):
        with pytest.raises(SystemExit):
            mod.config_from_args(p.parse_args(bad))


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
    for r in _rows(tmp_path):  # adapted rows carry the token ids the guards saw, so guard_sweep can redo them
        if r["method"] != "none":
            assert r["tokens_before"] and all(isinstance(t, int) for t in r["tokens_before"] + r["tokens_adapted"])


def test_history_summary_keeps_the_greedy_transcript_of_each_step_when_recorded():
    from harness.runner import _history_summary
    plain = [{"loss": 2.0, "entropy": 1.5, "length": 4.0}, {"loss": 1.0, "entropy": 0.5, "length": 3.0}]
    out = _history_summary(plain)
    assert out["steps_done"] == 2 and out["loss_first"] == 2.0 and out["entropy_last"] == 0.5
    assert "greedy_steps" not in out
    watched = [{**h, "greedy": g} for h, g in zip(plain, ([5, 6], [5]))]
    assert _history_summary(watched)["greedy_steps"] == [[5, 6], [5]]
