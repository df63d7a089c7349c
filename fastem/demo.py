"""``fastem demo``: a real clip under several conditions (clean, real noise at several SNRs), the real model:
for each, the unadapted greedy transcript, what `adapt` returns, 5-beam search of the unadapted model, their WER, who
decided (the gate, a guard, or the adaptation) and the seconds it took."""
from __future__ import annotations

import time

import torch

from .adapt import adapt
from .config import AdaptConfig

__all__ = ["noisy_sample", "run_demo"]


def noisy_sample(snr_db: float | None) -> tuple[torch.Tensor, str, str]:
    """The bundled clean clip with the bundled noise added at ``snr_db`` (None: clean); returns (audio,
    reference, credits)."""
    import torchaudio

    from .audio import load_audio
    from .samples import sample_paths

    speech_path, noise_path, reference = sample_paths()
    speech = load_audio(speech_path)
    if snr_db is None:
        return speech, reference, f"{speech_path.name}, clean"
    noise = load_audio(noise_path)
    if noise.numel() < speech.numel():
        noise = noise.repeat(speech.numel() // noise.numel() + 1)
    noise = noise[: speech.numel()]
    noisy = torchaudio.functional.add_noise(speech[None], noise[None], torch.tensor([snr_db]))[0]
    peak = noisy.abs().max()
    if peak > 1:
        noisy = noisy / peak
    return noisy, reference, f"{speech_path.name} + {noise_path.name} at {snr_db:g} dB SNR"


def _decided(res) -> str:
    if res.skipped == "confident":
        return "gate: sure of it"
    if res.skipped == "agreed":
        return "gate: greedy = beam"
    if res.skipped:
        return res.skipped
    if res.guard == "medoid":
        return "medoid: greedy" if res.scores.get("medoid", 0) < 0 else "medoid: the draws disagree"
    if res.guard:
        return f"guard: {res.guard}"
    return "adapted" if res.text != res.text_before else "adapted, same text"


def run_demo(*, model_name: str = "base", device=None, snrs=(None, 5.0, -3.0, -6.0), config: AdaptConfig | None = None,
             language: str | None = None, beams: int = 5) -> int:
    """Adapt on each condition (``snrs``: dB of the bundled noise, None for the clean clip) and print a table."""
    from .adapt import transcribe
    from .models import load_whisper
    from .text import word_errors

    cfg = config or AdaptConfig()
    t0 = time.perf_counter()
    model, processor = load_whisper(model_name, device=device)
    print(f"fastem demo: Whisper {model_name} (loaded in {time.perf_counter() - t0:.1f} s); adapting {cfg.draw_count} "
          f"draw(s) x {cfg.step_count} steps, objective={cfg.objective}, K={cfg.num_samples}, params={cfg.params}, "
          f"lr={cfg.lr:g}", flush=True)
    rows = []
    for snr in snrs:
        audio, reference, what = noisy_sample(snr)
        lang = language or "en"
        res = adapt(model, audio, processor=processor, language=lang, config=cfg)
        greedy = transcribe(model, audio, processor=processor, language=lang)
        t1 = time.perf_counter()
        beam = transcribe(model, audio, processor=processor, language=lang, num_beams=beams)
        beam_seconds = time.perf_counter() - t1
        n = word_errors(reference, greedy, lang)[1]
        wer = {k: word_errors(reference, t, lang)[0] / n for k, t in
               (("before", greedy), ("after", res.text), ("beam", beam))}
        label = "clean" if snr is None else f"noise {snr:g} dB"
        rows.append((label, wer, _decided(res), res.seconds, beam_seconds))
        print(f"\n{what} ({audio.numel() / 16000:.1f} s)")
        print(f"reference : {reference}")
        print(f"greedy    : {greedy}   [WER {wer['before']:.1%}]")
        print(f"after     : {res.text}   [WER {wer['after']:.1%}]   ({_decided(res)})")
        print(f"{beams}-beam    : {beam}   [WER {wer['beam']:.1%}]", flush=True)
        if res.history:
            print("adaptation: mean token entropy " + " -> ".join(
                f"{h['entropy']:.3f}" for h in (res.history[:1] + res.history[-1:]))
                + (f"; {res.guard}: {res.guard_reason}" if res.guard else ""))
        elif res.skipped == "confident":
            print(f"adaptation: not run, the model is sure of this clip (mean token entropy "
                  f"{res.scores['entropy_before']:.3f} < min_entropy {cfg.gate_entropy:g})")
        elif res.skipped == "agreed":
            print("adaptation: not run, the greedy and the beam transcript say the same words (the medoid would "
                  "return them whatever the draws said)")
    print(f"\n| condition | greedy | adapted | {beams}-beam | decided by | adapt s | beam s |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for label, wer, decided, secs, beam_secs in rows:
        print(f"| {label} | {wer['before']:.1%} | {wer['after']:.1%} | {wer['beam']:.1%} | {decided} | {secs:.1f} | "
              f"{beam_secs:.1f} |")
    return 0
