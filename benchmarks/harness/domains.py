"""Named evaluation domains: a source corpus (or pool), a language and a deterministic audio transform.

Every corrupted domain is ``transform(clean audio, rng)`` where ``rng`` is seeded by
``crc32(utt_id | domain | seed)`` (see :func:`harness.data.stable_seed`), so rerunning gives
bit-identical audio in any process.  The transforms run single-threaded in float64 and return 1-D
float32 in ``[-1, 1]`` with no NaN/Inf.

Domain families (see :data:`DOMAINS` for the full list, ``python benchmarks/wer_domains.py
--list-domains`` prints it):

* natural shifts on unmodified audio: the clean pool, each clean US-English corpus, non-native
  English read by Mandarin-L1 children and adults (speechocean762), Czech and Dutch acted game lines;
* additive real noise (each recording of ``noise/manifest.tsv`` at 10, 5 and 0 dB SNR, via
  ``torchaudio.functional.add_noise``; random deterministic offset into the noise file).  SNR is
  speech energy over noise energy on the whole utterance.  When the mixture would exceed full scale
  it is scaled down as a whole (which keeps the SNR exact) instead of being clipped;
* reverberation by each room impulse response (unit-energy RIR, ``fftconvolve``, output aligned on
  the direct path, cut to the speech length and RMS-matched to the dry speech);
* speed perturbation 0.9 / 1.1 (``torchaudio.functional.speed``: resampling, so pitch moves too,
  as in Kaldi-style speed perturbation; the length changes by 1/factor);
* telephone channel: 8 kHz round trip, 300-3400 Hz band-pass (2x2nd-order high- and low-pass
  biquads) and 8-bit G.711 mu-law companding, RMS-matched;
* hard clipping of the loudest 2 % or 10 % of the samples (clip level at that quantile of ``|x|``;
  the output is scaled back to the original peak level).

All corruptions use the same clean English source pool (LibriSpeech + Kathleen + LJSpeech + JFK)
and the same utterance selection, so corrupted domains are paired with the ``clean`` domain.

CONFIRM domains (:data:`CONFIRM_DOMAINS`, names ``confirm_*``): a held-out protocol on the CONFIRM data
(``<repo>/../shared/confirm``, ``$FASTEM_CONFIRM_DATA``), which shares no speech, noise or room with DEV.
They are fixed here before their first run, and are not part of :data:`DOMAINS` (the DEV registry: ``"all"``
and every DEV profile stay as they were); :func:`get_domain` and :func:`resolve_domains` know both.  27:

* 4 natural domains on unmodified audio: ``confirm_nonnative_en`` (speechocean762, Mandarin-L1 English),
  ``confirm_kathleen`` (US English), ``confirm_czech`` (fillets_cs), ``confirm_dutch`` (fillets_nl);
* each of the 9 CONFIRM noises (:data:`CONFIRM_NOISES`) at 5 and 0 dB SNR (18 domains,
  ``confirm_noise_<short>_<snr>db``) and each of the 5 CONFIRM rooms (:data:`CONFIRM_RIRS`, 5 domains,
  ``confirm_reverb_<short>``), with exactly the DEV noise / reverb transforms, on the English pool
  :data:`CONFIRM_POOL` (Kathleen and speechocean762 interleaved, language ``en``).  Noises shorter than the
  utterance (three CONFIRM noises last 0.35-0.76 s) are looped from the random offset (the code DEV uses;
  DEV's noises are all longer than its utterances, so none of them was ever looped).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from .data import (
    CONFIRM_NOISES,
    CONFIRM_RIRS,
    DATA_DIRS,
    SAMPLE_RATE,
    Utterance,
    load_resources,
    read_audio,
    read_audio_cached,
    select_utterances,
    stable_seed,
)

__all__ = [
    "Domain",
    "DOMAINS",
    "CONFIRM_DOMAINS",
    "CLEAN_POOL",
    "CONFIRM_POOL",
    "NOISES",
    "RIRS",
    "NOISE_SNRS",
    "CONFIRM_NOISES",
    "CONFIRM_RIRS",
    "CONFIRM_NOISE_SNRS",
    "DATA_SETS",
    "get_domain",
    "resolve_domains",
    "domain_audio",
    "measure_snr",
]

CLEAN_POOL = ("librispeech", "kathleen", "ljspeech", "jfk")
NOISES = {  # short name -> id in noise/manifest.tsv
    "dishes": "doing_the_dishes",
    "bike": "exercise_bike",
    "tap": "running_tap",
    "white": "white_noise",
    "pink": "pink_noise",
}
RIRS = {"clap": "rir_clap", "hall": "openair_medium_hall"}
NOISE_SNRS = (10, 5, 0)

#: The data sets a domain can read from (see :func:`harness.data.default_data_dir`).
DATA_SETS = tuple(DATA_DIRS)
#: CONFIRM's English pool: every confirm noise / reverb domain draws these, interleaved (Kathleen first).
CONFIRM_POOL = ("kathleen", "speechocean762")
CONFIRM_NOISE_SNRS = (5, 0)
PEAK_LIMIT = 0.99  # mixtures louder than this are scaled down to it


Transform = Callable[[torch.Tensor, np.random.Generator, Path], torch.Tensor]


@dataclass(frozen=True)
class Domain:
    """One evaluation condition.

    ``corpora``: the source corpus names (``speech/<corpus>``); several form a pool, interleaved.
    ``language``: the language passed to the model and used for scoring.
    ``transform``: ``(audio float64 [T], rng, data_dir) -> audio``, or None for unmodified audio.
    ``spec``: a stable text that identifies the transform and its parameters (part of the result key,
    so changing a domain's definition invalidates its cached results).
    ``resources``: ``("noise", id)`` / ``("rir", id)`` files the transform reads.
    ``data``: the data set the domain reads (``"dev"`` or ``"confirm"``, :data:`DATA_SETS`); not part of
    ``spec`` (DEV row hashes predate it; CONFIRM domains have names and resources of their own).
    """
    name: str
    corpora: tuple[str, ...]
    language: str
    kind: str
    description: str
    spec: str
    transform: Transform | None = None
    resources: tuple[tuple[str, str], ...] = ()
    changes_length: bool = False
    utterance_filter: Callable[[Utterance], bool] | None = field(default=None, compare=False)
    data: str = "dev"

    def utterances(self, data_dir: str | os.PathLike, n: int | None = None, *,
                   max_seconds: float | None = None) -> list[Utterance]:
        """The first ``n`` utterances of this domain (deterministic, prefix-stable)."""
        return select_utterances(data_dir, self.corpora, n, max_seconds=max_seconds,
                                 filter_fn=self.utterance_filter)

    def rng(self, utt_id: str, seed: int = 0) -> np.random.Generator:
        return np.random.default_rng(stable_seed(utt_id, self.name, seed))

    def apply(self, audio: torch.Tensor, utt_id: str, *, seed: int = 0,
              data_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """The domain's audio for one clean utterance: 1-D float32 in [-1, 1], finite."""
        x = torch.as_tensor(audio).detach().to("cpu").reshape(-1)
        if self.transform is None:
            y = x.to(torch.float32)
        else:
            if data_dir is None and self.resources:
                raise ValueError(f"domain {self.name!r} needs data_dir (it reads {self.resources})")
            with _single_thread():
                y = self.transform(x.to(torch.float64), self.rng(utt_id, seed), Path(data_dir or "."))
            y = y.to(torch.float32)
        y = torch.nan_to_num(y, nan=0.0, posinf=1.0, neginf=-1.0).clamp_(-1.0, 1.0)
        return y.contiguous()

    def load(self, utt: Utterance, *, seed: int = 0, data_dir: str | os.PathLike | None = None) -> torch.Tensor:
        """Read ``utt``'s clean audio and apply the domain."""
        return self.apply(read_audio(utt.path), utt.utt_id, seed=seed, data_dir=data_dir)


def domain_audio(domain: str | Domain, utt: Utterance, *, seed: int = 0,
                 data_dir: str | os.PathLike | None = None) -> torch.Tensor:
    d = get_domain(domain) if isinstance(domain, str) else domain
    return d.load(utt, seed=seed, data_dir=data_dir)


@contextlib.contextmanager
def _single_thread():
    """Run torch ops on one thread so results do not depend on the process's thread count."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------

def _rms(x: torch.Tensor) -> float:
    return float(torch.sqrt(torch.mean(x.double() ** 2))) if x.numel() else 0.0


def _peak_guard(y: torch.Tensor, limit: float = PEAK_LIMIT) -> torch.Tensor:
    peak = float(y.abs().max()) if y.numel() else 0.0
    if peak > limit:
        y = y * (limit / peak)
    return y


def _rms_match(y: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    r_y, r_ref = _rms(y), _rms(ref)
    if r_y > 0 and r_ref > 0:
        y = y * (r_ref / r_y)
    return y


def _noise_segment(noise: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` samples of ``noise`` from a random offset.  A noise at least ``n`` long is cut at an offset in
    ``[0, m - n]``; a shorter one (e.g. a 0.35 s clip under 5 s of speech) is looped: it starts at an offset
    in ``[0, m)`` and repeats end to start (no cross-fade) until ``n`` samples are filled."""
    m = noise.numel()
    if m == 0:
        return torch.zeros(n, dtype=torch.float64)
    if m >= n:
        off = int(rng.integers(0, m - n + 1))
        return noise[off:off + n].double()
    off = int(rng.integers(0, m))
    reps = (off + n + m - 1) // m
    return noise.double().repeat(reps)[off:off + n]


def mix_at_snr(speech: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """``speech + g * noise`` with ``g`` set so that ``10 log10(|speech|^2 / |g noise|^2) = snr_db``
    (``torchaudio.functional.add_noise``); unchanged speech when either part is silent."""
    import torchaudio.functional as AF

    if not float(speech.abs().max() if speech.numel() else 0) > 0 or not float(noise.abs().max()) > 0:
        return speech.clone()
    snr = torch.tensor([float(snr_db)], dtype=speech.dtype)
    return AF.add_noise(speech[None], noise[None].to(speech.dtype), snr)[0]


def make_noise_transform(noise_id: str, snr_db: float) -> Transform:
    def transform(x: torch.Tensor, rng: np.random.Generator, data_dir: Path) -> torch.Tensor:
        res = load_resources(data_dir, "noise")[noise_id]
        noise = read_audio_cached(str(res.path))
        seg = _noise_segment(noise, x.numel(), rng)
        return _peak_guard(mix_at_snr(x, seg, snr_db))
    return transform


def make_reverb_transform(rir_id: str) -> Transform:
    def transform(x: torch.Tensor, rng: np.random.Generator, data_dir: Path) -> torch.Tensor:
        import torchaudio.functional as AF

        res = load_resources(data_dir, "rir")[rir_id]
        rir = read_audio_cached(str(res.path)).double()
        norm = float(torch.linalg.vector_norm(rir))
        if not norm > 0 or x.numel() == 0:
            return x.clone()
        rir = rir / norm
        direct = int(torch.argmax(rir.abs()))
        y = AF.fftconvolve(x, rir)[direct:direct + x.numel()]
        return _peak_guard(_rms_match(y, x))
    return transform


def make_speed_transform(factor: float) -> Transform:
    def transform(x: torch.Tensor, rng: np.random.Generator, data_dir: Path) -> torch.Tensor:
        import torchaudio.functional as AF

        y, _ = AF.speed(x, SAMPLE_RATE, float(factor))
        return _peak_guard(y)
    return transform


def telephone_transform(x: torch.Tensor, rng: np.random.Generator, data_dir: Path) -> torch.Tensor:
    import torchaudio.functional as AF

    n = x.numel()
    if n == 0:
        return x.clone()
    y = AF.resample(x, SAMPLE_RATE, 8000)
    y = y / max(1.0, float(y.abs().max()))  # biquads clamp to [-1, 1]; keep headroom instead
    y = 0.5 * y
    for _ in range(2):
        y = AF.highpass_biquad(y, 8000, 300.0)
        y = AF.lowpass_biquad(y, 8000, 3400.0)
    y = y.clamp(-1.0, 1.0)
    y = AF.mu_law_decoding(AF.mu_law_encoding(y.float(), 256), 256).double()
    y = AF.resample(y, 8000, SAMPLE_RATE)
    if y.numel() >= n:
        y = y[:n]
    else:
        y = torch.nn.functional.pad(y, (0, n - y.numel()))
    return _peak_guard(_rms_match(y, x))


def make_clip_transform(fraction: float) -> Transform:
    """Hard clipping of the loudest ``fraction`` of the samples (clip level = the ``1 - fraction``
    quantile of ``|x|``, so the severity does not hinge on one peak), then gain back to the original peak."""
    def transform(x: torch.Tensor, rng: np.random.Generator, data_dir: Path) -> torch.Tensor:
        a = x.abs()
        peak = float(a.max()) if x.numel() else 0.0
        if not peak > 0:
            return x.clone()
        t = float(torch.sort(a).values[min(a.numel() - 1, int(round((1.0 - fraction) * a.numel())))])
        if not t > 0:
            return x.clone()
        return x.clamp(-t, t) * (peak / t)
    return transform


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

def _build_registry() -> dict[str, Domain]:
    doms: list[Domain] = [
        Domain("clean", CLEAN_POOL, "en", "natural",
               "clean read US English pool (LibriSpeech, Kathleen, LJSpeech, JFK); source of every corruption",
               "identity"),
        Domain("clean_librispeech", ("librispeech",), "en", "natural", "LibriSpeech test/dev-clean audiobooks",
               "identity"),
        Domain("clean_kathleen", ("kathleen",), "en", "natural", "CMU-ARCTIC prompts, one US female voice",
               "identity"),
        Domain("clean_ljspeech", ("ljspeech",), "en", "natural", "LJSpeech audiobook clips, US female", "identity"),
        Domain("nonnative_en", ("speechocean762",), "en", "natural",
               "speechocean762: Mandarin-L1 children and adults reading English prompts", "identity"),
        Domain("czech", ("fillets_cs",), "cs", "natural", "Czech acted game voice lines (Fish Fillets NG)",
               "identity"),
        Domain("dutch", ("fillets_nl",), "nl", "natural", "Dutch acted game voice lines (Fish Fillets NG)",
               "identity"),
    ]
    for short, noise_id in NOISES.items():
        for snr in NOISE_SNRS:
            doms.append(Domain(
                f"noise_{short}_{snr}db", CLEAN_POOL, "en", "noise",
                f"{noise_id} noise added at {snr} dB SNR", f"add_noise(noise={noise_id},snr_db={snr},offset=rng)",
                make_noise_transform(noise_id, snr), resources=(("noise", noise_id),)))
    for short, rir_id in RIRS.items():
        doms.append(Domain(
            f"reverb_{short}", CLEAN_POOL, "en", "reverb", f"convolved with the {rir_id} room impulse response",
            f"fftconvolve(rir={rir_id},unit_energy,direct_path_aligned,rms_match)",
            make_reverb_transform(rir_id), resources=(("rir", rir_id),)))
    for factor in (0.9, 1.1):
        doms.append(Domain(
            f"speed_{factor}", CLEAN_POOL, "en", "speed", f"speed x{factor} (resampling: tempo and pitch)",
            f"speed(factor={factor})", make_speed_transform(factor), changes_length=True))
    doms.append(Domain(
        "telephone", CLEAN_POOL, "en", "channel", "8 kHz telephone band 300-3400 Hz with 8-bit mu-law",
        "resample8k+hp300x2+lp3400x2+mulaw256+resample16k+rms_match", telephone_transform))
    for pct in (2, 10):
        doms.append(Domain(
            f"clip_{pct}pct", CLEAN_POOL, "en", "channel", f"hard clipping of the loudest {pct}% of the samples",
            f"clip(fraction={pct / 100},quantile_level,keep_peak)", make_clip_transform(pct / 100)))
    return {d.name: d for d in doms}


DOMAINS: dict[str, Domain] = _build_registry()


def _build_confirm_registry() -> dict[str, Domain]:
    """The 27 CONFIRM domains (held out: defined before their first run; see the module docstring)."""
    doms: list[Domain] = [
        Domain("confirm_nonnative_en", ("speechocean762",), "en", "natural",
               "CONFIRM speechocean762 (test-split speakers): Mandarin-L1 children and adults reading English",
               "identity", data="confirm"),
        Domain("confirm_kathleen", ("kathleen",), "en", "natural",
               "CONFIRM Kathleen: ARCTIC prompts not in DEV, one US female voice", "identity", data="confirm"),
        Domain("confirm_czech", ("fillets_cs",), "cs", "natural",
               "CONFIRM Czech acted game voice lines (Fish Fillets NG) not in DEV", "identity", data="confirm"),
        Domain("confirm_dutch", ("fillets_nl",), "nl", "natural",
               "CONFIRM Dutch acted game voice lines (Fish Fillets NG) not in DEV", "identity", data="confirm"),
    ]
    for short, noise_id in CONFIRM_NOISES.items():
        for snr in CONFIRM_NOISE_SNRS:
            doms.append(Domain(
                f"confirm_noise_{short}_{snr}db", CONFIRM_POOL, "en", "noise",
                f"CONFIRM {noise_id} noise added at {snr} dB SNR (Kathleen + speechocean762)",
                f"add_noise(noise={noise_id},snr_db={snr},offset=rng)",
                make_noise_transform(noise_id, snr), resources=(("noise", noise_id),), data="confirm"))
    for short, rir_id in CONFIRM_RIRS.items():
        doms.append(Domain(
            f"confirm_reverb_{short}", CONFIRM_POOL, "en", "reverb",
            f"CONFIRM: convolved with the {rir_id} room impulse response (Kathleen + speechocean762)",
            f"fftconvolve(rir={rir_id},unit_energy,direct_path_aligned,rms_match)",
            make_reverb_transform(rir_id), resources=(("rir", rir_id),), data="confirm"))
    return {d.name: d for d in doms}


#: The held-out CONFIRM registry (27 domains, data set ``"confirm"``); not in ``"all"``.
CONFIRM_DOMAINS: dict[str, Domain] = _build_confirm_registry()
_REGISTRY: dict[str, Domain] = {**DOMAINS, **CONFIRM_DOMAINS}
if len(_REGISTRY) != len(DOMAINS) + len(CONFIRM_DOMAINS):
    raise RuntimeError("a CONFIRM domain reuses a DEV domain's name")


def get_domain(name: str) -> Domain:
    """A DEV or CONFIRM domain by name (``KeyError`` if neither registry has it)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown domain {name!r}; known: {', '.join(_REGISTRY)}") from None


def resolve_domains(spec: str | Sequence[str] | None) -> list[str]:
    """Domain names from ``"all"`` (every DEV domain, never a CONFIRM one), ``"confirm"`` (the 27 CONFIRM
    domains), a comma-separated list, or shell-style patterns (``noise_*``, ``confirm_noise_*``; matched
    against both registries), in registry order (DEV, then CONFIRM; duplicates removed).  Unknown names raise
    ``KeyError``."""
    if spec is None:
        return list(DOMAINS)
    items: Iterable[str] = spec.split(",") if isinstance(spec, str) else spec
    wanted: list[str] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        if item == "all":
            matches = list(DOMAINS)
        elif item == "confirm":
            matches = list(CONFIRM_DOMAINS)
        elif any(ch in item for ch in "*?["):
            matches = [n for n in _REGISTRY if fnmatch.fnmatchcase(n, item)]
            if not matches:
                raise KeyError(f"no domain matches {item!r}")
        elif item in _REGISTRY:
            matches = [item]
        else:
            raise KeyError(f"unknown domain {item!r}; known: {', '.join(_REGISTRY)}")
        for m in matches:
            if m not in wanted:
                wanted.append(m)
    order = {n: i for i, n in enumerate(_REGISTRY)}
    return sorted(wanted, key=order.__getitem__)


def measure_snr(mixture: torch.Tensor, speech: torch.Tensor) -> float:
    """SNR (dB) of ``mixture`` against the clean ``speech``, allowing a global gain on the mixture:
    ``mixture = g (speech + n)``; ``g`` is the least-squares gain (noise is uncorrelated with speech)."""
    m = mixture.double().reshape(-1)
    s = speech.double().reshape(-1)
    g = float(torch.dot(m, s) / torch.dot(s, s))
    noise = m / g - s
    return 10.0 * math.log10(float(torch.dot(s, s)) / float(torch.dot(noise, noise)))
