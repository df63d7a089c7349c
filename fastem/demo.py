"""``fastem demo``: a real clip, real noise, the real model; WER before and after adaptation."""
from __future__ import annotations

import time

import torch

from .adapt import adapt
from .config import AdaptConfig

__all__ = ["noisy_sample", "run_demo"]


def noisy_sample(snr_db: float) -> tuple[torch.Tensor, str, str]:
    """The bundled clean clip with the bundled noise added at ``snr_db``; returns (audio, reference, credits)."""
    import torchaudio

    from .audio import load_audio
    from .samples import sample_paths

    speech_path, noise_path, reference = sample_paths()
    speech = load_audio(speech_path)
    noise = load_audio(noise_path)
    if noise.numel() < speech.numel():
        noise = noise.repeat(speech.numel() // noise.numel() + 1)
    noise = noise[: speech.numel()]
    noisy = torchaudio.functional.add_noise(speech[None], noise[None], torch.tensor([snr_db]))[0]
    peak = noisy.abs().max()
    if peak > 1:
        noisy = noisy / peak
    return noisy, reference, f"{speech_path.name} + {noise_path.name} at {snr_db:g} dB SNR"


def run_demo(*, model_name: str = "base", device=None, snr_db: float = -3.0,
             config: AdaptConfig | None = None, language: str | None = None) -> int:
    from .models import load_whisper
    from .text import word_errors

    cfg = config or AdaptConfig()
    audio, reference, what = noisy_sample(snr_db)
    print(f"fastem demo: Whisper {model_name}, {what} ({audio.numel() / 16000:.1f} s)", flush=True)
    t0 = time.perf_counter()
    model, processor = load_whisper(model_name, device=device)
    print(f"model loaded in {time.perf_counter() - t0:.1f} s; adapting {cfg.steps} steps, objective={cfg.objective}, "
          f"K={cfg.num_samples}, params={cfg.params}, lr={cfg.lr:g}", flush=True)
    res = adapt(model, audio, processor=processor, language=language or "en", config=cfg)
    lang = res.language or "en"
    e0, n = word_errors(reference, res.text_before, lang)
    e1, _ = word_errors(reference, res.text, lang)
    print(f"reference : {reference}")
    print(f"before    : {res.text_before}   [WER {e0 / n:.1%}]")
    print(f"after     : {res.text}   [WER {e1 / n:.1%}]")
    if res.skipped == "confident":
        print(f"adaptation: not run, the model is sure of this clip (mean token entropy "
              f"{res.scores['entropy_before']:.3f} < min_entropy {cfg.min_entropy:g}); {res.seconds:.1f} s")
    else:
        print(f"adaptation: {res.seconds:.1f} s, {res.seconds / max(cfg.steps, 1):.2f} s/step; mean token entropy "
              + " -> ".join(f"{h['entropy']:.3f}" for h in (res.history[:1] + res.history[-1:]))
              + (f"; guard {res.guard}: {res.guard_reason}" if res.guard else ""))
    return 0
