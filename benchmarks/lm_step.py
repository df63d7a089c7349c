"""One adaptation step on a language model (SmolLM2-135M-Instruct, bundled): fastem's step against a step
built on ``generate`` (K samples by ``generate(do_sample=True)``, teacher forced with full logits, the same
loss, backward), in one process, the median of ``--repeats`` runs each.

    OMP_NUM_THREADS=2 python benchmarks/lm_step.py --out benchmarks/results/lm_step_smollm2_cpu.json

Both steps draw K continuations of at most ``--new-tokens`` tokens after the same chat prompt and adapt
every RMSNorm; fastem's is ``fastem.adapt(..., steps=1)`` minus one greedy answer (timed separately and
subtracted: ``adapt`` also answers before and after).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import fastem  # noqa: E402
from fastem.lm import lm_prompt_ids  # noqa: E402
from fastem.params import select_parameters  # noqa: E402
from harness.naive import full_logits_backward, median_seconds  # noqa: E402

PROMPT = "If I have 3 apples and buy 4 more, how many apples do I have?"


def generate_step(model, ids, eos, k, budget, params):
    """One step the obvious way: generate K samples, teacher-force them with full logits, backward."""
    n = ids.shape[1]
    with torch.no_grad():
        out = model.generate(ids, do_sample=True, num_return_sequences=k, max_new_tokens=budget, pad_token_id=eos)
    for p in params:
        p.requires_grad_(True)
    full_logits_backward(model(input_ids=out[:, :-1]).logits[:, n - 1:], out[:, n:], eos, params)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model, tok = fastem.load_lm("smollm2-135m")
    ids = torch.tensor([lm_prompt_ids(tok, PROMPT)])
    eos = int(model.generation_config.eos_token_id)
    params = [p for _, p in select_parameters(model, "layernorm")]
    for p in model.parameters():
        p.requires_grad_(False)
    kw = dict(tokenizer=tok, num_samples=args.samples, max_new_tokens=args.new_tokens, min_entropy=0.0, guards=())
    answer = median_seconds(lambda: fastem.adapt(model, PROMPT, steps=0, **kw), args.repeats)
    one = median_seconds(lambda: fastem.adapt(model, PROMPT, steps=1, **kw), args.repeats)
    baseline = median_seconds(lambda: generate_step(model, ids, eos, args.samples, args.new_tokens, params), args.repeats)
    fastem_step = one - 2 * answer  # adapt(steps=1) answers before and after the step
    row = {"model": "SmolLM2-135M-Instruct (bundled GGUF, float32)", "device": "cpu",
           "threads": torch.get_num_threads(), "samples": args.samples, "new_tokens": args.new_tokens,
           "greedy_answer_s": answer, "adapt_steps1_s": one, "fastem_step_s": fastem_step,
           "generate_step_s": baseline, "speedup": baseline / fastem_step if fastem_step > 0 else None}
    print(json.dumps(row, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
