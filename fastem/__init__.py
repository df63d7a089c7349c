"""fastem: test-time adaptation of speech recognizers by exact sequence-entropy minimization.

    import fastem
    model, processor = fastem.load_whisper("base")
    result = fastem.adapt(model, "clip.flac")          # the model is restored afterwards
    print(result.text_before, "->", result.text)

    with fastem.Adapter(model, processor) as adapter:  # continual: keeps adapting over a stream
        for clip in stream:
            print(adapter.adapt(clip).text)
"""
from . import ops
from .adapt import adapt, adapt_batch, transcribe, transcribe_batch
from .adapter import Adapter
from .config import AdaptConfig, AdaptResult
from .objective import em_loss

__version__ = "0.1.0"

__all__ = ["Adapter", "AdaptConfig", "AdaptResult", "adapt", "adapt_batch", "transcribe", "transcribe_batch", "em_loss",
           "ops", "load_whisper", "load_lm", "load_audio", "__version__"]


def __getattr__(name):
    # Loaders import heavier modules (soundfile, safetensors); resolve them on first use.
    if name == "load_whisper":
        from .models import load_whisper

        return load_whisper
    if name == "load_lm":
        from .lm import load_lm

        return load_lm
    if name == "load_audio":
        from .audio import load_audio

        return load_audio
    raise AttributeError(f"module 'fastem' has no attribute {name!r}")
