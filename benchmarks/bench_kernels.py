"""Forward + backward timings of the token-statistics ops: PyTorch eager, torch.compile, Triton.

    pytest benchmarks --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds

CUDA: bfloat16, V = 51,865 (Whisper), N in {256, 2048, 16384}; the linear op also over
D in {384, 512, 1280}.  Language-model rows beside them: SmolLM2's vocabulary (V = 49,152, D = 576),
Qwen2.5's (151,936, D = 896) and Gemma 3's (262,144, D = 640) at N = 2048.
``extra_info`` holds the peak extra memory (``peak_extra_MiB``: max allocated during one forward +
backward minus what was allocated before) and, for token_stats, the effective bandwidth over the bytes
that must move (``floor_GBps``).
Without CUDA the Triton and torch.compile rows skip with a reason and a small CPU table of the
eager references runs (float32, small N; well under a minute on 2 cores).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastem.kernels.linear_token_stats import linear_token_stats_reference
from fastem.kernels.token_stats import IGNORE_INDEX, token_stats_reference

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
V = 51_865
#: language models' (hidden size, vocabulary): SmolLM2-135M, Qwen2.5-0.5B, Gemma 3 270M
LM_SHAPES = [(576, 49_152), (896, 151_936), (640, 262_144)]
if CUDA:
    DTYPE = torch.bfloat16
    TS_SIZES = [(n, V) for n in (256, 2048, 16_384)] + [(2048, v) for _, v in LM_SHAPES]
    LIN_SIZES = [(n, d, V) for n in (256, 2048, 16_384) for d in (384, 512, 1280)] + [(2048, d, v) for d, v in LM_SHAPES]
    ROUNDS, WARMUP = 20, 3
else:
    DTYPE = torch.float32
    TS_SIZES = [(32, V), (128, V), (32, 49_152), (16, 151_936)]
    LIN_SIZES = [(32, 384, V), (64, 1280, V), (32, 576, 49_152), (16, 896, 151_936)]
    ROUNDS, WARMUP = 5, 1

SKIP_NO_CUDA = {
    "triton": "Triton rows need CUDA (on CPU Triton only runs in its interpreter, which is not a benchmark)",
    "compile": "torch.compile rows are timed on CUDA only",
}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(token_stats_reference, dynamic=False)


def _token_stats_fn(impl: str):
    if impl == "eager":
        return token_stats_reference
    if impl == "compile":
        return _compiled_reference()
    from fastem.kernels.token_stats import token_stats_triton

    return token_stats_triton


def _linear_fn(impl: str):
    if impl == "eager":
        return linear_token_stats_reference
    from fastem.kernels.linear_token_stats import linear_token_stats_triton

    return linear_token_stats_triton


def _targets(n: int, v: int) -> torch.Tensor:
    y = torch.randint(0, v, (n,), device=DEVICE)
    y[::17] = IGNORE_INDEX
    return y


@pytest.mark.parametrize("impl", ["eager", "compile", "triton"])
@pytest.mark.parametrize("n,v", TS_SIZES)
def test_token_stats_fwd_bwd(benchmark, run_timed, impl, n, v):
    if not CUDA and impl in SKIP_NO_CUDA:
        pytest.skip(SKIP_NO_CUDA[impl])
    benchmark.group = f"token_stats fwd+bwd N={n} V={v} {str(DTYPE).split('.')[-1]}"
    fn = _token_stats_fn(impl)
    logits = (torch.randn(n, v, device=DEVICE) * 4).to(DTYPE)
    logits[:, ::97] = float("-inf")          # suppressed tokens, as in decoding
    y = _targets(n, v)
    hit_inf = torch.isinf(logits.gather(1, y.clamp_min(0)[:, None]).squeeze(1)) & (y >= 0)
    y = torch.where(hit_inf, y + 1, y)                # targets on finite logits
    gh = torch.randn(n, device=DEVICE)
    gl = torch.randn(n, device=DEVICE)
    x = logits.requires_grad_()

    def step():
        ent, logp = fn(x, y)
        torch.autograd.grad((ent, logp), (x,), (gh, gl))
        _sync()

    bench = run_timed(step, rounds=ROUNDS, warmup=WARMUP, impl=impl, N=n, V=v, dtype=str(DTYPE))
    floor_bytes = 3 * n * v * logits.element_size()   # read fwd, read + write bwd
    bench.extra_info["floor_bytes"] = floor_bytes
    median = bench.stats.stats.median if bench.stats else None
    if median:
        bench.extra_info["floor_GBps"] = round(floor_bytes / median / 1e9, 1)


@pytest.mark.parametrize("impl", ["eager", "triton"])
@pytest.mark.parametrize("n,d,v", LIN_SIZES)
def test_linear_token_stats_fwd_bwd(benchmark, run_timed, impl, n, d, v):
    if not CUDA and impl in SKIP_NO_CUDA:
        pytest.skip(SKIP_NO_CUDA[impl])
    benchmark.group = f"linear_token_stats fwd+bwd N={n} D={d} V={v} {str(DTYPE).split('.')[-1]}"
    fn = _linear_fn(impl)
    hidden = torch.randn(n, d, device=DEVICE).to(DTYPE).requires_grad_()
    weight = (torch.randn(v, d, device=DEVICE) / d ** 0.5 * 3).to(DTYPE).requires_grad_()
    y = _targets(n, v)
    gh = torch.randn(n, device=DEVICE)
    gl = torch.randn(n, device=DEVICE)

    def step():
        ent, logp = fn(hidden, weight, y)
        torch.autograd.grad((ent, logp), (hidden, weight), (gh, gl))
        _sync()

    bench = run_timed(step, rounds=ROUNDS, warmup=WARMUP, impl=impl, N=n, D=d, V=v, dtype=str(DTYPE))
    bench.extra_info["matmul_TFLOP"] = round(3 * 2 * n * v * d / 1e12, 4)   # fwd + two gradient GEMMs
