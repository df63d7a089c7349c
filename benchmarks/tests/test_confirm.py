"""The held-out CONFIRM protocol: its 27 domains, the confirm profile and its data dir, looped short noises,
DEV left exactly as it was (audio and row hashes), and every check's verdict kept in the rows."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from harness import report
from harness.data import default_data_dir, load_resources, read_audio, write_synthetic_dataset
from harness.domains import (
    CONFIRM_DOMAINS,
    CONFIRM_NOISES,
    CONFIRM_POOL,
    CONFIRM_RIRS,
    DOMAINS,
    _noise_segment,
    get_domain,
    measure_snr,
    resolve_domains,
)
from harness.runner import (
    CONFIRM_DOMAIN_NAMES,
    PROFILES,
    AdaptOutput,
    RunConfig,
    StubEngine,
    _output,
    config_hash,
    run,
)

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
REAL_DEV = default_data_dir("dev")
REAL_CONFIRM = default_data_dir("confirm")
HAVE_DEV = (REAL_DEV / "speech").is_dir()
HAVE_CONFIRM = (REAL_CONFIRM / "speech").is_dir()

EXPECTED = (["confirm_nonnative_en", "confirm_kathleen", "confirm_czech", "confirm_dutch"]
            + [f"confirm_noise_{n}_{snr}db" for n in ("rub", "tapping", "friction", "sheep", "carhorn", "thunder",
                                                      "sb1", "sb3", "sb5") for snr in (5, 0)]
            + [f"confirm_reverb_{r}" for r in ("hall", "sb1", "sb3", "am0", "amstereo")])


@pytest.fixture(scope="module")
def confirm_synth(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("confirm_data"), utts_per_corpus=3, data="confirm")


@pytest.fixture(scope="module")
def dev_synth(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("dev_data"), utts_per_corpus=2)


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------

def test_the_27_confirm_domains_exist_and_stay_out_of_dev():
    assert list(CONFIRM_DOMAINS) == EXPECTED and len(EXPECTED) == 27
    assert CONFIRM_DOMAIN_NAMES == EXPECTED
    assert not set(CONFIRM_DOMAINS) & set(DOMAINS)
    assert resolve_domains("all") == resolve_domains(None) == list(DOMAINS)  # "all" is DEV, as before
    assert not any(n.startswith("confirm") for n in resolve_domains("all"))
    assert resolve_domains("confirm") == EXPECTED
    assert len(resolve_domains("confirm_noise_*")) == 18 and len(resolve_domains("confirm_reverb_*")) == 5
    assert resolve_domains("noise_*") == [n for n in DOMAINS if n.startswith("noise_")]  # DEV patterns unchanged
    assert resolve_domains("confirm_dutch,confirm_kathleen") == ["confirm_kathleen", "confirm_dutch"]
    for name in EXPECTED:
        d = get_domain(name)
        assert d.name == name and d.data == "confirm" and d.spec and d.description
    assert all(d.data == "dev" for d in DOMAINS.values())
    assert get_domain("clean") is DOMAINS["clean"]
    with pytest.raises(KeyError):
        get_domain("confirm_nope")
    langs = {n: get_domain(n).language for n in EXPECTED}
    assert langs["confirm_czech"] == "cs" and langs["confirm_dutch"] == "nl"
    assert {v for k, v in langs.items() if k not in ("confirm_czech", "confirm_dutch")} == {"en"}
    # the noise and reverb domains: CONFIRM's own noises / rooms on the English pool, DEV's transforms
    assert CONFIRM_POOL == ("kathleen", "speechocean762")
    assert len(set(CONFIRM_NOISES.values())) == 9 and len(set(CONFIRM_RIRS.values())) == 5
    for name in EXPECTED[4:]:
        d = get_domain(name)
        assert d.corpora == CONFIRM_POOL and d.kind in ("noise", "reverb") and len(d.resources) == 1
        kind, rid = d.resources[0]
        assert rid in (CONFIRM_NOISES if kind == "noise" else CONFIRM_RIRS).values()
        dev_twin = DOMAINS["noise_white_5db" if kind == "noise" else "reverb_hall"]
        assert d.transform.__qualname__ == dev_twin.transform.__qualname__
    assert [get_domain(n).corpora for n in EXPECTED[:4]] == [("speechocean762",), ("kathleen",), ("fillets_cs",),
                                                              ("fillets_nl",)]


@pytest.mark.parametrize("name", EXPECTED)
def test_confirm_domain_audio_finite_bounded_same_length_deterministic(name, confirm_synth):
    d = get_domain(name)
    utt = d.utterances(confirm_synth, 1)[0]
    clean = read_audio(utt.path)
    y1 = d.apply(clean, utt.utt_id, seed=0, data_dir=confirm_synth)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1 if n_threads > 1 else 2)
    try:
        y2 = d.load(utt, seed=0, data_dir=confirm_synth)
    finally:
        torch.set_num_threads(n_threads)
    assert y1.dtype == torch.float32 and y1.dim() == 1 and y1.numel() == clean.numel()
    assert torch.equal(y1, y2), "not bit-for-bit deterministic"
    assert torch.isfinite(y1).all() and 0.0 < float(y1.abs().max()) <= 1.0
    if d.transform is None:
        assert torch.equal(y1, clean)
    else:
        assert not torch.equal(y1, clean)
    if d.kind == "noise":
        assert not torch.equal(y1, d.apply(clean, utt.utt_id, seed=1, data_dir=confirm_synth))
        target = float(name.rsplit("_", 1)[1].removesuffix("db"))
        assert abs(measure_snr(y1, clean) - target) < 0.5


def test_confirm_pool_items_are_the_natural_domains_first_items(confirm_synth):
    pool = get_domain("confirm_noise_sheep_5db").utterances(confirm_synth, 6)
    assert [u.corpus for u in pool] == ["kathleen", "speechocean762"] * 3  # interleaved, Kathleen first
    for corpus, natural in (("kathleen", "confirm_kathleen"), ("speechocean762", "confirm_nonnative_en")):
        mine = [u.utt_id for u in pool if u.corpus == corpus]
        assert mine == [u.utt_id for u in get_domain(natural).utterances(confirm_synth, 3)]  # paired with clean
    assert all(get_domain(n).utterances(confirm_synth, 6) == pool for n in EXPECTED[4:])


# ------------------------------------------------------------------------------------------------
# short noises are looped
# ------------------------------------------------------------------------------------------------

def test_a_very_short_noise_is_looped():
    m, n = 5568, 3 * 16000  # a 0.348 s noise (am_friction1) under 3 s of speech
    noise = torch.randn(m, generator=torch.Generator().manual_seed(0))
    seg = _noise_segment(noise, n, np.random.default_rng(7))
    off = int(np.random.default_rng(7).integers(0, m))  # the same draw
    assert seg.dtype == torch.float64 and seg.numel() == n
    assert torch.equal(seg, noise.double()[(off + torch.arange(n)) % m])  # the clip, end to start, from `off`
    # a noise as long as the speech or longer is cut (the DEV code path, same draw as ever)
    long_noise = torch.randn(n + 100, generator=torch.Generator().manual_seed(1))
    cut = _noise_segment(long_noise, n, np.random.default_rng(7))
    off = int(np.random.default_rng(7).integers(0, 101))
    assert torch.equal(cut, long_noise[off:off + n].double())
    assert torch.equal(_noise_segment(torch.zeros(0), 10, np.random.default_rng(0)), torch.zeros(10, dtype=torch.float64))


def test_the_short_confirm_noises_are_looped_under_longer_speech(confirm_synth):
    noises = load_resources(confirm_synth, "noise")
    d = get_domain("confirm_noise_friction_0db")
    noise = read_audio(noises[CONFIRM_NOISES["friction"]].path)
    assert noise.numel() < 0.4 * 16000
    for utt in d.utterances(confirm_synth, 4):
        x = read_audio(utt.path)
        assert x.numel() > 2 * noise.numel()
        y = d.apply(x, utt.utt_id, data_dir=confirm_synth)
        assert y.numel() == x.numel() and abs(measure_snr(y, x)) < 0.5
        residual = (y.double() / (torch.dot(y.double(), x.double()) / torch.dot(x.double(), x.double())) - x.double())
        q = x.numel() // 4  # noise all along the utterance, not only where the clip first lands
        assert all(float(residual[i * q:(i + 1) * q].abs().max()) > 1e-3 for i in range(4))


# ------------------------------------------------------------------------------------------------
# DEV unchanged
# ------------------------------------------------------------------------------------------------

def _sha(x: torch.Tensor) -> str:
    return hashlib.sha1(x.numpy().tobytes()).hexdigest()[:16]


# sha1 of the float32 audio, computed with the code before the CONFIRM domains were added (2026-12)
SYNTH_DEV_AUDIO = {
    ("noise_dishes_5db", "librispeech/librispeech_000"): "3dfc5072189b8cb3",
    ("noise_dishes_5db", "kathleen/kathleen_000"): "41a23dd9016dd4a3",
    ("noise_white_0db", "librispeech/librispeech_000"): "f518ca3c8d22c8f7",
    ("noise_white_0db", "kathleen/kathleen_000"): "217ca19131d47ef7",
    ("noise_pink_10db", "librispeech/librispeech_000"): "87159b6a8c7db4c0",
    ("noise_pink_10db", "kathleen/kathleen_000"): "bd2faebdd41b8868",
    ("clean", "kathleen/kathleen_000"): "84314cdf98c1191e",
}


def _sketch(x: torch.Tensor, k: int = 6) -> tuple:
    """Length, norm and k projections on fixed Gaussian vectors, to 7 significant digits: a fingerprint that
    float rounding leaves alone (FFT reverb and resampling differ in the last bits between CPUs) but that any
    change of noise, SNR, room or filter moves by far more than the tolerance."""
    x = x.double().flatten()
    g = torch.randn(k, x.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (x.numel(), float(f"{float(x.norm()):.7g}"), [float(f"{v:.7g}") for v in (g @ x).tolist()])


def _same_sketch(a: tuple, b: tuple) -> bool:
    scale = 1e-4 * max(a[1], b[1])  # each projection is ~N(0, norm^2); rounding moves it by ~1e-7 of the norm
    return a[0] == b[0] and abs(a[1] - b[1]) <= scale and all(abs(u - v) <= scale for u, v in zip(a[2], b[2]))


# the sketch of the same audio (_sketch): the sha1s first kept here broke on another CPU, where the FFT reverb and
# the telephone band's resampling round differently; the noise domains still matched their sha1s when this was made
REAL_DEV_AUDIO = {
    ("noise_dishes_5db", "librispeech/1089-134691-0001"):
        (86640, 12.09494, [-3.23281, -17.88787, -7.227015, 15.01014, -4.516226, -1.288409]),
    ("noise_dishes_5db", "kathleen/arctic_b0493_1592526687"):
        (41244, 8.796152, [16.68517, -11.99582, 1.711694, 3.594485, 9.410455, 5.697921]),
    ("noise_white_0db", "librispeech/1089-134691-0001"):
        (86640, 14.88327, [-13.89524, 16.04727, 0.6720972, 12.81992, -22.47497, -2.116074]),
    ("noise_tap_0db", "kathleen/arctic_b0493_1592526687"):
        (41244, 10.84951, [9.052744, -7.859166, -6.494676, 0.9647517, 7.010566, 13.45111]),
    ("noise_pink_10db", "librispeech/1089-134691-0001"):
        (86640, 11.05992, [0.2254113, -4.705945, -0.1851731, 6.16123, -4.077428, 0.1710088]),
    ("reverb_hall", "librispeech/1089-134691-0001"):
        (86640, 10.5543, [9.187536, -2.366469, 1.58277, 14.07617, -18.97437, 0.8106241]),
    ("reverb_clap", "kathleen/arctic_b0493_1592526687"):
        (41244, 7.667215, [8.735675, -11.52249, -10.21663, -5.904704, -0.6670755, -6.776374]),
    ("telephone", "kathleen/arctic_b0493_1592526687"):
        (41244, 7.667215, [-4.160715, 3.36382, -2.323422, 11.68827, -9.67338, -1.11595]),
}


def _dev_audio_fingerprints(data_dir: Path, wanted: dict, fingerprint=_sha) -> dict:
    got = {}
    for domain, utt_id in wanted:
        utt = next(u for u in DOMAINS[domain].utterances(data_dir, 2) if u.utt_id == utt_id)
        got[(domain, utt_id)] = fingerprint(DOMAINS[domain].load(utt, data_dir=data_dir))
    return got


def test_dev_domain_audio_unchanged_on_the_synthetic_set(dev_synth):
    assert _dev_audio_fingerprints(dev_synth, SYNTH_DEV_AUDIO) == SYNTH_DEV_AUDIO


@pytest.mark.skipif(not HAVE_DEV, reason=f"DEV data not found at {REAL_DEV}")
def test_dev_domain_audio_unchanged_on_the_real_data():
    got = _dev_audio_fingerprints(REAL_DEV, REAL_DEV_AUDIO, fingerprint=_sketch)
    bad = [(key, sketch) for key, sketch in got.items() if not _same_sketch(sketch, REAL_DEV_AUDIO[key])]
    assert not bad, bad


def test_the_audio_sketch_ignores_rounding_and_sees_a_changed_mixture():
    speech = torch.randn(16000, generator=torch.Generator().manual_seed(1)) * 0.1
    noise = [torch.randn(16000, generator=torch.Generator().manual_seed(s)) * 0.05 for s in (2, 3)]
    x = speech + noise[0]
    ref = _sketch(x)
    assert _same_sketch(_sketch(x * (1 + 2e-7)), ref)  # last-bit differences pass
    assert _same_sketch(_sketch(x + 1e-7 * noise[1]), ref)
    assert not _same_sketch(_sketch(speech + noise[1]), ref)  # another noise draw at the same SNR
    assert not _same_sketch(_sketch(speech + noise[0] * 1.01), ref)  # 0.09 dB of SNR
    assert not _same_sketch(_sketch(x[:-1]), ref)


@pytest.mark.parametrize("name", ["dev_base_rows.jsonl", "dev_tinyen_rows.jsonl", "screen_base_rows.jsonl"])
def test_committed_dev_rows_keep_their_config_hash(name):
    """The domain part of every committed DEV row's key is reproduced (its adaptation settings are the row's own)."""
    rows = report.read_jsonl(RESULTS / name)
    assert rows
    bad = [(r["domain"], r["utt_id"], r["method"]) for r in rows
           if config_hash(r["method"], get_domain(r["domain"]), 0, r.get("adapt")) != r["config_hash"]]
    assert not bad, bad[:5]


def test_dev_profiles_unchanged():
    for name in ("smoke", "quick", "full", "dev", "screen"):
        assert "data" not in PROFILES[name]
        assert not any(str(d).startswith("confirm") for d in PROFILES[name]["domains"])
        assert RunConfig.from_profile(name).data_set() == "dev"


# ------------------------------------------------------------------------------------------------
# the confirm profile and its data dir
# ------------------------------------------------------------------------------------------------

def test_confirm_profile():
    p = PROFILES["confirm"]
    assert p["model"] == "base" and p["domains"] == EXPECTED and p["utts_per_domain"] == 8
    assert len(p["domains"]) * p["utts_per_domain"] == 216 >= 200
    assert p["methods"] == ["none", "fastem"] and p["data"] == "confirm"
    cfg = RunConfig.from_profile("confirm")
    assert (cfg.steps, cfg.num_samples, cfg.max_seconds) == (None, None, None)
    assert cfg.method_overrides("fastem") == {}
    assert cfg.data_set() == "confirm"


def test_confirm_data_dir_default_env_and_explicit(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTEM_CONFIRM_DATA", raising=False)
    monkeypatch.setenv("FASTEM_DATA", str(tmp_path / "dev_elsewhere"))  # DEV's variable leaves CONFIRM alone
    assert default_data_dir("confirm") == REPO.parent / "shared" / "confirm"
    assert RunConfig.from_profile("confirm").resolved_data_dir() == REPO.parent / "shared" / "confirm"
    assert RunConfig.from_profile("dev").resolved_data_dir() == tmp_path / "dev_elsewhere"
    monkeypatch.setenv("FASTEM_CONFIRM_DATA", str(tmp_path / "c"))
    assert RunConfig.from_profile("confirm").resolved_data_dir() == tmp_path / "c"
    assert RunConfig.from_profile("confirm", data_dir=str(tmp_path / "x")).resolved_data_dir() == tmp_path / "x"
    # any profile given only CONFIRM domains reads the CONFIRM set
    assert RunConfig.from_profile("smoke", domains=["confirm_kathleen"]).resolved_data_dir() == tmp_path / "c"
    with pytest.raises(ValueError):
        default_data_dir("nope")


def test_one_run_reads_one_data_set():
    with pytest.raises(ValueError, match="different data sets"):
        RunConfig.from_profile("smoke", domains=["clean", "confirm_kathleen"]).data_set()
    with pytest.raises(ValueError, match="confirm"):
        RunConfig.from_profile("confirm", domains=["clean"]).resolved_data_dir()


def _load_script():
    spec = importlib.util.spec_from_file_location("wer_domains_script", REPO / "benchmarks" / "wer_domains.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_confirm_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTEM_CONFIRM_DATA", str(tmp_path / "env"))
    mod = _load_script()
    p = mod.build_parser()
    cfg = mod.config_from_args(p.parse_args(["--profile", "confirm", "--batch-size", "8"]))
    assert (cfg.model, cfg.domains, cfg.utts_per_domain, cfg.methods, cfg.data, cfg.batch_size) == (
        "base", EXPECTED, 8, ["none", "fastem"], "confirm", 8)
    assert cfg.resolved_data_dir() == tmp_path / "env"
    cfg = mod.config_from_args(p.parse_args(["--profile", "confirm", "--model", "tiny.en", "--data", str(tmp_path)]))
    assert cfg.model == "tiny.en" and cfg.resolved_data_dir() == tmp_path
    for bad in (["--profile", "confirm", "--domains", "clean"], ["--profile", "dev", "--domains", "clean,confirm_czech"]):
        with pytest.raises(SystemExit):
            mod.config_from_args(p.parse_args(bad))


def test_confirm_run_reads_the_confirm_set_and_english_only_drops_czech_dutch(confirm_synth, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTEM_CONFIRM_DATA", str(confirm_synth))
    kw = dict(engine="stub", utts_per_domain=2, progress=False, figure=False, bootstrap=0)
    s = run(RunConfig.from_profile("confirm", **kw), tmp_path / "multi")
    assert s["domains"] == EXPECTED and s["meta"]["missing_rows"] == 0 and s["meta"]["errors"] == 0
    assert s["meta"]["data"] == "confirm" and s["meta"]["data_dir"] == str(confirm_synth)
    rows = report.read_jsonl(tmp_path / "multi" / "rows.jsonl")
    assert len(rows) == 27 * 2 * 2 and {r["domain"] for r in rows} == set(EXPECTED)
    assert all("_c" in r["utt_id"] for r in rows)  # the CONFIRM set's utterances

    class EnglishOnly(StubEngine):
        english_only = True

    s = run(RunConfig.from_profile("confirm", **kw), tmp_path / "en", engine=EnglishOnly("stub:tiny.en"))
    assert s["meta"]["skipped_domains"] == ["confirm_czech", "confirm_dutch"]
    assert s["domains"] == [d for d in EXPECTED if d not in ("confirm_czech", "confirm_dutch")]
    assert s["meta"]["items"] == 25 * 2 and s["meta"]["missing_rows"] == 0


def test_confirm_run_refuses_the_dev_data(dev_synth, tmp_path, monkeypatch):
    kw = dict(engine="stub", utts_per_domain=1, progress=False, figure=False, bootstrap=0)
    with pytest.raises(FileNotFoundError, match="does not list"):  # DEV's noise manifest lacks CONFIRM's noises
        run(RunConfig.from_profile("confirm", data_dir=str(dev_synth), **kw), tmp_path / "a")
    monkeypatch.setenv("FASTEM_DATA", str(dev_synth))
    with pytest.raises(ValueError, match="is the 'dev' set's"):  # natural domains only: DEV's default dir is refused
        run(RunConfig.from_profile("confirm", domains=["confirm_kathleen"], data_dir=str(dev_synth), **kw), tmp_path / "b")


# ------------------------------------------------------------------------------------------------
# every check's verdict in the rows
# ------------------------------------------------------------------------------------------------

def test_output_reads_verdicts_when_the_result_has_them():
    base = dict(text="a b", text_before="a c", seconds=1.0, guard="likelihood", guard_reason="drop 3 > 2")
    res = types.SimpleNamespace(**base, verdicts={"empty": None, "likelihood": "drop 3 > 2", "verifier": None})
    assert _output(res, 1.0).verdicts == {"empty": None, "likelihood": "drop 3 > 2", "verifier": None}
    assert _output(types.SimpleNamespace(**base), 1.0).verdicts is None  # today's AdaptResult: no attribute


class VerdictEngine(StubEngine):
    def adapt(self, audio, language, overrides):
        out = super().adapt(audio, language, overrides)
        out.verdicts = {"empty": None, "consensus": "the samples disagree", "likelihood": None}
        return out


def test_verdicts_are_stored_in_rows_and_in_no_hash(confirm_synth, tmp_path):
    kw = dict(engine="stub", domains=["confirm_kathleen"], utts_per_domain=2, data_dir=str(confirm_synth),
              progress=False, figure=False, bootstrap=0)
    run(RunConfig.from_profile("confirm", **kw), tmp_path / "plain", engine=StubEngine("stub"))
    run(RunConfig.from_profile("confirm", **kw), tmp_path / "v", engine=VerdictEngine("stub"))
    plain = report.read_jsonl(tmp_path / "plain" / "rows.jsonl")
    rows = report.read_jsonl(tmp_path / "v" / "rows.jsonl")
    assert all("verdicts" not in r for r in plain)
    adapted = [r for r in rows if r["method"] != "none"]
    assert adapted and all(r["verdicts"] == {"empty": None, "consensus": "the samples disagree", "likelihood": None}
                           for r in adapted)
    assert all("verdicts" not in r for r in rows if r["method"] == "none")
    assert [r["config_hash"] for r in rows] == [r["config_hash"] for r in plain]
    json.dumps(rows)  # JSON all the way


def test_adapt_output_has_no_verdicts_by_default():
    assert AdaptOutput(text="a", text_before="a", seconds=0.0).verdicts is None


# ------------------------------------------------------------------------------------------------
# the real CONFIRM data
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_CONFIRM, reason=f"CONFIRM data not found at {REAL_CONFIRM}")
def test_confirm_profile_on_the_real_data_has_216_utterances():
    from harness.data import list_corpora, load_manifest
    from harness.runner import work_items

    cfg = RunConfig.from_profile("confirm")
    assert cfg.resolved_data_dir() == REAL_CONFIRM
    corpora = set(list_corpora(REAL_CONFIRM))
    noises, rirs = load_resources(REAL_CONFIRM, "noise"), load_resources(REAL_CONFIRM, "rir")
    assert set(noises) == set(CONFIRM_NOISES.values()) and set(rirs) == set(CONFIRM_RIRS.values())
    for name in EXPECTED:
        d = get_domain(name)
        assert set(d.corpora) <= corpora
        for kind, rid in d.resources:
            assert (noises if kind == "noise" else rirs)[rid].path.is_file()
    items = work_items(cfg.domain_names(), REAL_CONFIRM, cfg.utts_per_domain)
    assert len(items) == 216 and {i.domain for i in items} == set(EXPECTED)
    assert all(i.utt.language == get_domain(i.domain).language for i in items)
    if HAVE_DEV:  # no utterance shared with DEV
        dev_ids = {u.utt_id for c in ("kathleen", "speechocean762") for u in load_manifest(REAL_DEV, c)}
        assert not dev_ids & {i.utt_id for i in items}
