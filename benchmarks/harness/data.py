"""Evaluation data for the domain benchmark: manifests, utterance records, audio reading.

The data directory (``--data``; default ``$FASTEM_DATA`` or ``<repo>/../shared/data`` for the DEV set,
``$FASTEM_CONFIRM_DATA`` or ``<repo>/../shared/confirm`` for the held-out CONFIRM set) holds::

    speech/<corpus>/manifest.tsv   id  path  text  lang  speaker  duration_s
    speech/<corpus>/<utt>.flac     16 kHz mono
    noise/manifest.tsv + noise/<name>.flac
    rir/manifest.tsv   + rir/<name>.flac

Manifests are unquoted UTF-8 TSV (some texts contain ``"``), so they are read with
``csv.QUOTE_NONE``.  Audio is read with :mod:`soundfile` (no FFmpeg needed) as 1-D float32.

Utterance selection is deterministic and *prefix-stable*: each corpus is ordered by a stable hash of
the utterance id, and a pool of several corpora is interleaved round-robin, so asking for ``n``
utterances gives the first ``n`` of the list asked with any larger ``n`` (results of a small run
are reused by a larger one).
"""
from __future__ import annotations

import csv
import functools
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

SAMPLE_RATE = 16000

__all__ = [
    "SAMPLE_RATE",
    "Utterance",
    "Resource",
    "DATA_DIRS",
    "default_data_dir",
    "list_corpora",
    "load_manifest",
    "load_resources",
    "read_audio",
    "select_utterances",
    "stable_seed",
    "base_language",
    "write_synthetic_dataset",
]


def stable_seed(*parts: object) -> int:
    """A 32-bit seed from the parts' text, identical across processes and Python runs
    (never Python's randomized ``hash()``)."""
    return zlib.crc32("|".join(str(p) for p in parts).encode("utf-8")) & 0xFFFFFFFF


def base_language(lang: str) -> str:
    """``"en-L2(zh)"`` -> ``"en"``, ``"cs"`` -> ``"cs"``."""
    return lang.split("-")[0].split("_")[0].strip().lower()


#: data set -> (environment variable, folder under <repo>/../shared) of its default directory
DATA_DIRS = {"dev": ("FASTEM_DATA", "data"), "confirm": ("FASTEM_CONFIRM_DATA", "confirm")}


def default_data_dir(data: str = "dev") -> Path:
    """The default directory of a data set: ``"dev"``: ``$FASTEM_DATA``, else ``<repo>/../shared/data``;
    ``"confirm"`` (held out): ``$FASTEM_CONFIRM_DATA``, else ``<repo>/../shared/confirm``."""
    if data not in DATA_DIRS:
        raise ValueError(f"unknown data set {data!r}; known: {', '.join(DATA_DIRS)}")
    env_name, folder = DATA_DIRS[data]
    env = os.environ.get(env_name)
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / folder


@dataclass(frozen=True)
class Utterance:
    corpus: str
    id: str
    path: Path  # absolute
    text: str
    lang: str  # as shipped, e.g. "en-L2(zh)"
    speaker: str
    duration_s: float

    @property
    def utt_id(self) -> str:
        """Unique across corpora: ``<corpus>/<id>``."""
        return f"{self.corpus}/{self.id}"

    @property
    def language(self) -> str:
        return base_language(self.lang)


@dataclass(frozen=True)
class Resource:
    """A noise recording or a room impulse response."""
    kind: str  # "noise" | "rir"
    id: str
    path: Path
    license: str
    duration_s: float


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        rows = []
        for line in reader:
            if not line or all(not c for c in line):
                continue
            if len(line) != len(header):
                raise ValueError(f"{path}: row {line!r} has {len(line)} fields, header has {len(header)}")
            rows.append(dict(zip(header, line)))
    return rows


def list_corpora(data_dir: str | os.PathLike) -> list[str]:
    speech = Path(data_dir) / "speech"
    if not speech.is_dir():
        return []
    return sorted(p.name for p in speech.iterdir() if (p / "manifest.tsv").is_file())


@functools.lru_cache(maxsize=64)
def _load_manifest_cached(data_dir: str, corpus: str) -> tuple[Utterance, ...]:
    root = Path(data_dir) / "speech" / corpus
    rows = _read_tsv(root / "manifest.tsv")
    return tuple(
        Utterance(
            corpus=corpus,
            id=r["id"],
            path=(root / r["path"]).resolve(),
            text=r["text"],
            lang=r.get("lang", "en"),
            speaker=r.get("speaker", ""),
            duration_s=float(r.get("duration_s") or "nan"),
        )
        for r in rows
    )


def load_manifest(data_dir: str | os.PathLike, corpus: str) -> list[Utterance]:
    """All utterances of ``speech/<corpus>/manifest.tsv``, in manifest order."""
    return list(_load_manifest_cached(str(Path(data_dir).resolve()), corpus))


@functools.lru_cache(maxsize=8)
def _load_resources_cached(data_dir: str, kind: str) -> tuple[Resource, ...]:
    root = Path(data_dir) / kind
    rows = _read_tsv(root / "manifest.tsv")
    return tuple(
        Resource(kind=kind, id=r["id"], path=(root / r["path"]).resolve(), license=r.get("license", ""),
                 duration_s=float(r.get("duration_s") or "nan"))
        for r in rows
    )


def load_resources(data_dir: str | os.PathLike, kind: str) -> dict[str, Resource]:
    """``kind`` is ``"noise"`` or ``"rir"``: ``{id: Resource}`` from ``<kind>/manifest.tsv``."""
    return {r.id: r for r in _load_resources_cached(str(Path(data_dir).resolve()), kind)}


def read_audio(path: str | os.PathLike, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """1-D float32 tensor at ``sampling_rate`` (channels averaged; resampled if the file differs)."""
    import soundfile as sf

    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wav = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))
    if sr != sampling_rate:
        import torchaudio.functional as AF

        wav = AF.resample(wav, sr, sampling_rate)
    return wav.contiguous()


@functools.lru_cache(maxsize=16)
def read_audio_cached(path: str, sampling_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Cached :func:`read_audio` for noises and RIRs (returned tensor must not be modified)."""
    return read_audio(path, sampling_rate)


def _evenly_ordered(utts: Sequence[Utterance], salt: str) -> list[Utterance]:
    return sorted(utts, key=lambda u: (stable_seed(salt, u.corpus, u.id), u.id))


def select_utterances(
    data_dir: str | os.PathLike,
    corpora: Iterable[str],
    n: int | None,
    *,
    max_seconds: float | None = None,
    min_seconds: float | None = None,
    salt: str = "fastem-bench",
    filter_fn=None,
) -> list[Utterance]:
    """Deterministic, prefix-stable choice of ``n`` utterances (all if ``n`` is None) from the corpora.

    Each corpus is ordered by ``crc32(salt|corpus|id)`` (a fixed pseudo-random order), optionally
    filtered by duration, and the corpora are interleaved round-robin in the given order.
    """
    lists = []
    for corpus in corpora:
        utts = load_manifest(data_dir, corpus)
        if filter_fn is not None:
            utts = [u for u in utts if filter_fn(u)]
        if max_seconds is not None:
            utts = [u for u in utts if not (u.duration_s > max_seconds)]
        if min_seconds is not None:
            utts = [u for u in utts if not (u.duration_s < min_seconds)]
        lists.append(_evenly_ordered(utts, salt))
    out: list[Utterance] = []
    depth = max((len(lst) for lst in lists), default=0)
    for i in range(depth):
        for lst in lists:
            if i < len(lst):
                out.append(lst[i])
                if n is not None and len(out) >= n:
                    return out
    return out


# ----------------------------------------------------------------------------------------------
# A tiny synthetic data directory with the same layout, for tests and dry runs without the data.
# ----------------------------------------------------------------------------------------------

_SYNTH_WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
                "november oscar papa quebec romeo sierra tango uniform victor whiskey").split()


def _synth_speechlike(n: int, seed: int) -> np.ndarray:
    """Amplitude-modulated harmonic tones with pauses (not speech, but speech-like level and crest)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(100, 220)
    sig = sum((0.5 / k) * np.sin(2 * math.pi * k * f0 * t + rng.uniform(0, 2 * math.pi)) for k in range(1, 8))
    env = np.clip(np.sin(2 * math.pi * rng.uniform(2.0, 4.0) * t), 0, None) ** 0.5
    env[: n // 10] = 0.0
    env[-n // 10:] = 0.0
    x = sig * env + 0.002 * rng.standard_normal(n)
    return (0.3 * x / np.max(np.abs(x))).astype(np.float32)


def write_synthetic_dataset(root: str | os.PathLike, *, utts_per_corpus: int = 3,
                            corpora: dict[str, str] | None = None, data: str = "dev") -> Path:
    """Write a small fake data dir (same layout and manifest format as shared/data) under ``root``.

    ``data="dev"``: DEV's corpora, noise and rir ids; ``data="confirm"``: CONFIRM's (the ids of
    ``CONFIRM_NOISES`` / ``CONFIRM_RIRS``, with CONFIRM's three short noises as short as
    theirs, 0.35-0.76 s; other utterance ids and audio than the DEV set).  ``corpora`` maps corpus name ->
    manifest ``lang`` (default: every corpus the data set's domains use).  Audio is synthetic (tones, Gaussian
    noise, a decaying-noise RIR); only for tests.
    """
    import soundfile as sf

    if data not in DATA_DIRS:
        raise ValueError(f"unknown data set {data!r}; known: {', '.join(DATA_DIRS)}")
    root = Path(root)
    if corpora is None:
        corpora = ({"librispeech": "en", "kathleen": "en", "ljspeech": "en", "jfk": "en",
                    "speechocean762": "en-L2(zh)", "fillets_cs": "cs", "fillets_nl": "nl"} if data == "dev" else
                   {"kathleen": "en", "speechocean762": "en-L2(zh)", "fillets_cs": "cs", "fillets_nl": "nl"})
    for c_i, (corpus, lang) in enumerate(sorted(corpora.items())):
        d = root / "speech" / corpus
        d.mkdir(parents=True, exist_ok=True)
        lines = ["id\tpath\ttext\tlang\tspeaker\tduration_s"]
        for i in range(utts_per_corpus):
            uid = f"{corpus}_{i:03d}" if data == "dev" else f"{corpus}_c{i:03d}"
            n = int(SAMPLE_RATE * (1.0 + 0.25 * ((c_i + i) % 4)))
            seed = stable_seed(corpus, i) if data == "dev" else stable_seed(data, corpus, i)
            sf.write(str(d / f"{uid}.flac"), _synth_speechlike(n, seed), SAMPLE_RATE, subtype="PCM_16")
            words = " ".join(_SYNTH_WORDS[(c_i * 7 + i * 3 + k) % len(_SYNTH_WORDS)] for k in range(3 + i % 3))
            lines.append(f"{uid}\t{uid}.flac\t{words.capitalize()}.\t{lang}\tspk{i % 2}\t{n / SAMPLE_RATE:.3f}")
        (d / "manifest.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if data == "confirm":
        _write_synthetic_confirm_resources(root)
        return root

    rng = np.random.default_rng(1234)
    noises = {}
    for name in ("doing_the_dishes", "exercise_bike", "running_tap", "white_noise", "pink_noise"):
        n = SAMPLE_RATE * 6
        x = rng.standard_normal(n)
        if name == "pink_noise":
            spec = np.fft.rfft(x)
            spec[1:] /= np.sqrt(np.arange(1, spec.size))
            x = np.fft.irfft(spec, n)
        elif name != "white_noise":
            x = x * (0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(0.5, 3) * np.arange(n) / SAMPLE_RATE))
        noises[name] = (0.5 * x / np.max(np.abs(x))).astype(np.float32)
    _write_resources(root, "noise", noises)
    _write_resources(root, "rir", {name: _synth_rir(rng, t60, pre)
                                   for name, t60, pre in (("rir_clap", 0.3, 40), ("openair_medium_hall", 0.8, 200))})
    return root


def _synth_rir(rng: np.random.Generator, t60: float, pre: int) -> np.ndarray:
    """A synthetic room impulse response: ``pre`` silent samples, a direct tap, decaying noise (peak 0.9)."""
    n = int(SAMPLE_RATE * t60 * 1.2)
    h = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / (SAMPLE_RATE * t60))
    h = np.concatenate([np.zeros(pre), [1.0], 0.3 * h])
    return (0.9 * h / np.max(np.abs(h))).astype(np.float32)


def _write_resources(root: Path, kind: str, clips: dict[str, np.ndarray]) -> None:
    """``<root>/<kind>/<name>.flac`` for each clip and the folder's manifest (``noise`` or ``rir`` layout)."""
    import soundfile as sf

    folder = root / kind
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["id\tpath\tsource\tlicense\tduration_s"]
    for name, x in clips.items():
        sf.write(str(folder / f"{name}.flac"), x, SAMPLE_RATE, subtype="PCM_16")
        lines.append(f"{name}\t{name}.flac\tsynthetic\tnone\t{x.size / SAMPLE_RATE:.3f}")
    (folder / "manifest.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")


#: The CONFIRM set's noises and rooms (harness.domains builds its domains from them).
CONFIRM_NOISES = {  # short name -> id in <confirm>/noise/manifest.tsv
    "rub": "am_130921_iPhone_rub_channel0_chunk83_aug2",          # 0.76 s, rubbing a phone (audiomentations)
    "tapping": "am_130921_laptopmic-dell_tap_channel0_chunk204_aug3",  # 0.62 s, tapping a laptop
    "friction": "am_friction1",                                  # 0.35 s, friction
    "sheep": "am_sheep",                                         # 13.2 s, sheep (background noise)
    "carhorn": "esc50_2-100648-A-43",                            # 5 s, ESC-50 class 43 (car horn)
    "thunder": "esc50_4-156993-A-19",                            # 5 s, ESC-50 class 19 (thunderstorm)
    "sb1": "sb_noise1",                                          # 33.1 s, speechbrain test noise 1
    "sb3": "sb_noise3",                                          # 8.4 s, speechbrain test noise 3
    "sb5": "sb_noise5",                                          # 13.7 s, speechbrain test noise 5
}
CONFIRM_RIRS = {  # short name -> id in <confirm>/rir/manifest.tsv
    "hall": "openair_large_hall",        # OpenAIR "Terry's Typing Room" (large_hall.wav)
    "sb1": "sb_rir1",                    # speechbrain test RIR 1
    "sb3": "sb_rir3",                    # speechbrain test RIR 3
    "am0": "am_impulse_response_0",      # audiomentations demo/ir impulse_response_0
    "amstereo": "am_stereo_impulse_response",  # audiomentations demo/ir stereo IR (first channel)
}

#: seconds of the CONFIRM noises that are shorter than most utterances (the others are written 6 s long)
_CONFIRM_SHORT_NOISES = {"am_friction1": 0.348, "am_130921_laptopmic-dell_tap_channel0_chunk204_aug3": 0.617,
                         "am_130921_iPhone_rub_channel0_chunk83_aug2": 0.756}


def _write_synthetic_confirm_resources(root: Path) -> None:
    """Noise and rir folders with CONFIRM's ids (CONFIRM_NOISES / CONFIRM_RIRS), synthetic audio."""
    rng = np.random.default_rng(4321)
    noises = {}
    for name in CONFIRM_NOISES.values():
        n = int(round(SAMPLE_RATE * _CONFIRM_SHORT_NOISES.get(name, 6.0)))
        t = np.arange(n) / SAMPLE_RATE
        x = rng.standard_normal(n) * (0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(0.5, 3) * t))
        noises[name] = (0.5 * x / np.max(np.abs(x))).astype(np.float32)
    _write_resources(root, "noise", noises)
    _write_resources(root, "rir", {name: _synth_rir(rng, 0.2 + 0.3 * k, 10 + 60 * k)
                                   for k, name in enumerate(CONFIRM_RIRS.values())})
