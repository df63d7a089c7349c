"""Bandwidth floor of token_stats (and compute floor of linear_token_stats), as a markdown table.

    python benchmarks/kernel_floor.py [--n 256 2048 16384] [--v 51865] [--dtype bf16] [--d 384 512 1280]

token_stats must at least read the logits once in the forward, and read them once and write the
gradient once in the backward: ``3 * N * V * bytes`` (the per-row floats are negligible).  On a
GPU the script measures the achieved copy bandwidth (a 1 GiB device-to-device copy: read + write),
times the Triton forward + backward, and prints the fraction of the floor reached
(``floor time at copy bandwidth / measured time``).  The target is >= 70 %.

linear_token_stats is matmul-bound: at least ``3 * 2 N V D`` FLOPs (the forward logits and the
two gradient GEMMs; the fused backward adds a recompute of the logits, ``4 * 2 N V D`` in all).
On a GPU the script measures cuBLAS's throughput on the same GEMM shape and reports the fraction.

Without CUDA it prints the floors (bytes, FLOPs, and times at H100 SXM's nominal 3.35 TB/s and
~990 dense bf16 TFLOP/s) and "n/a" for the measured columns.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

NOMINAL_BW = 3.35e12        # H100 SXM HBM3, bytes/s
NOMINAL_BF16 = 989e12       # H100 SXM dense bf16, FLOP/s
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Achieved device bandwidth in bytes/s: a 1 GiB copy reads and writes 1 GiB each."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = cuda_time(lambda: b.copy_(a))
    return 2 * n / t


def token_stats_rows(ns, V, dtype, bw):
    from fastem.kernels.token_stats import token_stats_triton

    rows = []
    for n in ns:
        elem = torch.tensor([], dtype=dtype).element_size()
        floor_bytes = 3 * n * V * elem
        row = {"N": n, "V": V, "dtype": str(dtype).split(".")[-1], "floor MB": f"{floor_bytes / 1e6:.0f}",
               "floor ms @nominal": f"{floor_bytes / NOMINAL_BW * 1e3:.3f}"}
        if bw is None:
            row.update({"floor ms @copy": "n/a", "triton fwd+bwd ms": "n/a", "fraction of floor": "n/a (no CUDA)"})
        else:
            x = (torch.randn(n, V, device="cuda") * 4).to(dtype).requires_grad_()
            y = torch.randint(0, V, (n,), device="cuda")
            gh, gl = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")

            def step():
                ent, logp = token_stats_triton(x, y)
                torch.autograd.grad((ent, logp), (x,), (gh, gl))

            t = cuda_time(step)
            floor_t = floor_bytes / bw
            row.update({"floor ms @copy": f"{floor_t * 1e3:.3f}", "triton fwd+bwd ms": f"{t * 1e3:.3f}",
                        "fraction of floor": f"{floor_t / t:.0%}"})
            del x
        rows.append(row)
    return rows


def linear_rows(ns, ds, V, dtype, cuda):
    from fastem.kernels.linear_token_stats import linear_token_stats_triton

    rows = []
    for n in ns:
        for d in ds:
            flops = 3 * 2 * n * V * d
            row = {"N": n, "D": d, "V": V, "min TFLOP": f"{flops / 1e12:.2f}",
                   "floor ms @nominal": f"{flops / NOMINAL_BF16 * 1e3:.3f}"}
            if not cuda:
                row.update({"cuBLAS TFLOP/s": "n/a", "triton fwd+bwd ms": "n/a", "fraction of floor": "n/a (no CUDA)"})
            else:
                h = torch.randn(n, d, device="cuda").to(dtype).requires_grad_()
                w = (torch.randn(V, d, device="cuda") / d ** 0.5).to(dtype).requires_grad_()
                y = torch.randint(0, V, (n,), device="cuda")
                gemm = cuda_time(lambda: h.detach() @ w.detach().t())
                rate = 2 * n * V * d / gemm

                def step():
                    ent, logp = linear_token_stats_triton(h, w, y)
                    torch.autograd.grad((ent.sum() + logp.sum()), (h, w))

                t = cuda_time(step, reps=10)
                row.update({"cuBLAS TFLOP/s": f"{rate / 1e12:.0f}", "triton fwd+bwd ms": f"{t * 1e3:.3f}",
                            "fraction of floor": f"{flops / rate / t:.0%}"})
                del h, w
            rows.append(row)
    return rows


def markdown(rows) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[256, 2048, 16_384])
    ap.add_argument("--v", type=int, default=51_865)
    ap.add_argument("--d", type=int, nargs="+", default=[384, 512, 1280])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device (floors only)"
    bw = copy_bandwidth() if cuda else None
    print(f"device: {device}")
    if bw is not None:
        print(f"achieved copy bandwidth: {bw / 1e9:.0f} GB/s")
    print("\n### token_stats forward + backward: bandwidth floor\n")
    print(markdown(token_stats_rows(args.n, args.v, dtype, bw)))
    print("\n### linear_token_stats forward + backward: matmul floor\n")
    print(markdown(linear_rows(args.n, args.d, args.v, dtype, cuda)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
