"""Where one adaptation step spends its time, per phase, on a real model and clip.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/step_time.py --model base --repeats 3

Phases of one step (K hypotheses, LayerNorm parameters of encoder and decoder): the encoder forward
with grad, sampling K hypotheses with the KV cache, the teacher-forced scoring forward, and the
backward pass.  Prints the median over ``--repeats`` steps of each phase and of the whole step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastem
from fastem import sampling
from fastem.objective import em_loss
from fastem.params import select_parameters, touches_encoder


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="base")
    ap.add_argument("--audio", default=None, help="default: the bundled clean sample clip")
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--params", default="layernorm")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)

    from fastem.samples import sample_paths

    model, processor = fastem.load_whisper(args.model, device=args.device)
    audio = fastem.load_audio(args.audio or sample_paths().speech)
    param = next(model.parameters())
    feats = processor.feature_extractor(audio.numpy(), sampling_rate=16000, return_tensors="pt").input_features
    feats = feats.to(param.device, param.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    named = select_parameters(model, args.params)
    for _, p in named:
        p.requires_grad_(True)
    encoder_trains = touches_encoder(named)
    with torch.no_grad():
        enc_fixed = sampling.encode(model, feats)
    prompt = sampling.build_prompt(model, enc_fixed, "en")
    generator = torch.Generator(device=param.device).manual_seed(0)

    def sync():
        if param.is_cuda:
            torch.cuda.synchronize()

    phases: dict[str, list[float]] = {k: [] for k in ("encode", "sample", "score", "backward", "step")}
    tokens = []
    for _ in range(args.repeats + 1):  # the first step warms up
        times = {}
        t_step = t = time.perf_counter()
        enc = sampling.encode(model, feats) if encoder_trains else enc_fixed
        sync()
        times["encode"] = time.perf_counter() - t
        t = time.perf_counter()
        hyps = sampling.decode(model, enc.detach(), prompt, num_samples=args.num_samples, max_new_tokens=128,
                               generator=generator)
        sync()
        times["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        entropy, logp, mask = sampling.score(model, enc, prompt, hyps)
        loss = em_loss(entropy, logp, mask)
        sync()
        times["score"] = time.perf_counter() - t
        t = time.perf_counter()
        loss.backward()
        sync()
        times["backward"] = time.perf_counter() - t
        times["step"] = time.perf_counter() - t_step
        model.zero_grad(set_to_none=True)
        for k, v in times.items():
            phases[k].append(v)
        tokens.append(int(hyps.lengths.sum()))
    print(f"model {args.model}, device {param.device}, K={args.num_samples}, params={args.params}, "
          f"threads={torch.get_num_threads()}, tokens sampled per step {tokens[1:]}")
    print("| phase | median s | share of step |")
    print("|---|---:|---:|")
    step = statistics.median(phases["step"][1:])
    for k, v in phases.items():
        med = statistics.median(v[1:])
        print(f"| {k} | {med:.3f} | {med / step:.0%} |")


if __name__ == "__main__":
    main()
