"""Whisper model loading: bundled CTranslate2 weights converted to transformers, hub checkpoints.

Public entry point: :func:`load_whisper`. The CTranslate2 reader and converter are exposed for
tools and tests.
"""
from .convert import ConversionError, convert_ct2_whisper
from .ctranslate2 import CT2FormatError, CT2Model, read_ct2_model
from .load import BUILTIN_MODELS, LoadInfo, WeightsNotInstalledError, available_models, is_installed, load_whisper

__all__ = [
    "load_whisper",
    "available_models",
    "is_installed",
    "BUILTIN_MODELS",
    "LoadInfo",
    "WeightsNotInstalledError",
    "read_ct2_model",
    "CT2Model",
    "CT2FormatError",
    "convert_ct2_whisper",
    "ConversionError",
]
