"""Domain registry and corruptions of the WER benchmark (harness.domains / harness.data)."""
from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch

from harness.data import (
    default_data_dir,
    list_corpora,
    load_manifest,
    load_resources,
    read_audio,
    select_utterances,
    stable_seed,
    write_synthetic_dataset,
)
from harness.domains import DOMAINS, NOISE_SNRS, measure_snr, resolve_domains

REAL_DATA = default_data_dir()
HAVE_REAL = (REAL_DATA / "speech").is_dir()
needs_real = pytest.mark.skipif(not HAVE_REAL, reason=f"shared data dir not found at {REAL_DATA} (set FASTEM_DATA)")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_dataset(tmp_path_factory.mktemp("bench_data"), utts_per_corpus=2)


@pytest.fixture(scope="module")
def data_dir(synth) -> Path:
    """The real data when present (the noises/RIRs then are the real ones), else the synthetic set."""
    return REAL_DATA if HAVE_REAL else synth


def _clean_utt(data_dir: Path, domain: str):
    return DOMAINS[domain].utterances(data_dir, 1, max_seconds=6.0)[0]


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def test_at_least_20_domains_each_with_language_and_source():
    assert len(DOMAINS) >= 20
    for name, d in DOMAINS.items():
        assert d.name == name
        assert d.language in {"en", "cs", "nl"}, name
        assert d.corpora and all(isinstance(c, str) and c for c in d.corpora), name
        assert d.spec and d.description, name
    langs = {d.language for d in DOMAINS.values()}
    assert {"en", "cs", "nl"} <= langs
    kinds = {d.kind for d in DOMAINS.values()}
    assert {"natural", "noise", "reverb", "speed", "channel"} <= kinds
    # each noise of the manifest at each SNR
    assert sum(1 for d in DOMAINS.values() if d.kind == "noise") == 5 * len(NOISE_SNRS)


@needs_real
def test_every_domain_source_exists_in_real_data_dir():
    corpora = set(list_corpora(REAL_DATA))
    noises = load_resources(REAL_DATA, "noise")
    rirs = load_resources(REAL_DATA, "rir")
    for name, d in DOMAINS.items():
        for c in d.corpora:
            assert c in corpora, f"{name}: corpus {c} missing in {REAL_DATA}"
        for kind, rid in d.resources:
            table = noises if kind == "noise" else rirs
            assert rid in table and table[rid].path.is_file(), f"{name}: {kind} {rid} missing"
        utts = d.utterances(REAL_DATA, 3)
        assert len(utts) == 3, name
        assert all(u.path.is_file() for u in utts)
        assert all(u.language == d.language for u in utts), name


@needs_real
def test_real_manifests_read_without_quoting():
    lj = load_manifest(REAL_DATA, "ljspeech")
    assert len(lj) == 32  # 4 texts contain '"': QUOTE_NONE keeps rows intact
    assert any('"' in u.text for u in lj)
    so = load_manifest(REAL_DATA, "speechocean762")
    assert len(so) == 240 and all(u.language == "en" for u in so)


def test_resolve_domains():
    assert resolve_domains("all") == list(DOMAINS)
    assert resolve_domains(None) == list(DOMAINS)
    got = resolve_domains("telephone,noise_white_*,clean,telephone")
    assert got[0] == "clean" and got.count("telephone") == 1
    assert set(got) == {"clean", "telephone", "noise_white_10db", "noise_white_5db", "noise_white_0db"}
    with pytest.raises(KeyError):
        resolve_domains("clean,no_such_domain")
    with pytest.raises(KeyError):
        resolve_domains("zzz_*")


def test_stable_seed_is_crc32_of_parts():
    assert stable_seed("kathleen/x", "noise_tap_5db", 0) == zlib.crc32(b"kathleen/x|noise_tap_5db|0")
    assert stable_seed("a", "b", 1) != stable_seed("a", "b", 2)


def test_selection_is_deterministic_prefix_stable_and_interleaved(synth):
    pool = ("librispeech", "kathleen", "ljspeech")
    five = select_utterances(synth, pool, 5)
    assert [u.utt_id for u in five] == [u.utt_id for u in select_utterances(synth, pool, 5)]
    assert [u.utt_id for u in select_utterances(synth, pool, 2)] == [u.utt_id for u in five[:2]]
    assert [u.corpus for u in five[:3]] == list(pool)  # round-robin over the pool
    assert len({u.utt_id for u in select_utterances(synth, pool, None)}) == 6
    short = select_utterances(synth, pool, None, max_seconds=1.2)
    assert short and all(u.duration_s <= 1.2 for u in short)


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(DOMAINS))
def test_domain_deterministic_finite_bounded_right_length(name, data_dir):
    d = DOMAINS[name]
    utt = _clean_utt(data_dir, name)
    clean = read_audio(utt.path)
    y1 = d.apply(clean, utt.utt_id, seed=0, data_dir=data_dir)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1 if n_threads > 1 else 2)
    try:
        y2 = d.load(utt, seed=0, data_dir=data_dir)  # reads the file again, other thread count
    finally:
        torch.set_num_threads(n_threads)
    assert y1.dtype == torch.float32 and y1.dim() == 1
    assert torch.equal(y1, y2), "not bit-for-bit deterministic"
    assert torch.isfinite(y1).all()
    assert float(y1.abs().max()) <= 1.0
    assert float(y1.abs().max()) > 0.0
    if d.changes_length:
        factor = float(name.split("_")[1])
        assert abs(y1.numel() - clean.numel() / factor) <= 2
    else:
        assert y1.numel() == clean.numel()
    if d.transform is None:
        assert torch.equal(y1, clean)
    else:
        assert not torch.equal(y1, clean)
    if d.kind == "noise":  # the noise segment depends on the seed and the utterance
        assert not torch.equal(y1, d.apply(clean, utt.utt_id, seed=1, data_dir=data_dir))
        assert not torch.equal(y1, d.apply(clean, utt.utt_id + "x", seed=0, data_dir=data_dir))


@pytest.mark.parametrize("name", [n for n, d in DOMAINS.items() if d.kind == "noise"])
def test_noise_domains_reach_requested_snr(name, data_dir):
    d = DOMAINS[name]
    target = float(name.rsplit("_", 1)[1].removesuffix("db"))
    for utt in d.utterances(data_dir, 2, max_seconds=8.0):
        clean = read_audio(utt.path)
        for gain in (1.0, 1.0 / max(1e-6, float(clean.abs().max()))):  # also a full-scale input: the mixture
            x = (clean * gain).clamp(-1, 1)                               # is scaled down, never clipped
            y = d.apply(x, utt.utt_id, data_dir=data_dir)
            assert float(y.abs().max()) <= 1.0
            assert abs(measure_snr(y, x) - target) < 0.5, (utt.utt_id, gain)


def test_reverb_and_telephone_keep_level(data_dir):
    for name in ("reverb_clap", "reverb_hall", "telephone"):
        utt = _clean_utt(data_dir, name)
        x = read_audio(utt.path)
        y = DOMAINS[name].apply(x, utt.utt_id, data_dir=data_dir)
        rms_x, rms_y = x.pow(2).mean().sqrt(), y.pow(2).mean().sqrt()
        assert 0.5 < float(rms_y / rms_x) < 1.05, name  # RMS-matched (lower only if the peak guard acted)


def test_telephone_removes_out_of_band_energy(data_dir):
    utt = _clean_utt(data_dir, "telephone")
    x = read_audio(utt.path)
    y = DOMAINS["telephone"].apply(x, utt.utt_id, data_dir=data_dir)
    spec = torch.fft.rfft(y.double()).abs() ** 2
    freqs = torch.fft.rfftfreq(y.numel(), 1 / 16000)
    high = spec[freqs > 4200].sum() / spec.sum()
    assert float(high) < 1e-3


def test_clipping_keeps_peak_and_flattens(data_dir):
    utt = _clean_utt(data_dir, "clip_10pct")
    x = read_audio(utt.path)
    for name, frac in (("clip_2pct", 0.02), ("clip_10pct", 0.10)):
        y = DOMAINS[name].apply(x, utt.utt_id, data_dir=data_dir)
        peak = float(x.abs().max())
        assert abs(float(y.abs().max()) - peak) < 1e-6
        clipped = float((y.abs() >= peak * (1 - 1e-6)).float().mean())
        assert frac * 0.8 < clipped < frac * 1.25, (name, clipped)


def test_domain_apply_sanitizes_non_finite_and_out_of_range():
    d = DOMAINS["clean"]
    y = d.apply(torch.tensor([0.5, float("nan"), 3.0, -float("inf")]), "u")
    assert torch.equal(y, torch.tensor([0.5, 0.0, 1.0, -1.0]))
