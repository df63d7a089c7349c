"""pytest set-up for the benchmarks.

The speed tables: ``pytest benchmarks --benchmark-only`` (``make bench-gpu`` on a CUDA machine).  Files
named ``bench_*.py`` are collected here, so they are not picked up by a plain ``pytest`` of the tests.
The harness's own tests (``benchmarks/tests``) are part of the default run; the harness package
(``benchmarks/harness``) is imported from this folder, as the benchmark scripts do.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself (whatever its name): not twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_extra_bytes(fn) -> int | None:
    """Peak CUDA memory allocated while ``fn()`` runs, above what was allocated before (None on CPU)."""
    if not CUDA:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return torch.cuda.max_memory_allocated() - base


@pytest.fixture
def run_timed(benchmark):
    """``run_timed(fn, rounds)``: time ``fn`` (which synchronises itself) with warm-up rounds, record
    the device and the peak extra memory in ``benchmark.extra_info``."""

    def go(fn, *, rounds: int, warmup: int, **info):
        benchmark.extra_info.update(info)
        benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else f"cpu ({os.cpu_count()} cores)"
        fn()  # first call: compilation / autotuning / allocator warm-up, outside the memory figure
        peak = peak_extra_bytes(fn)
        if peak is not None:
            benchmark.extra_info["peak_extra_MiB"] = round(peak / 2 ** 20, 1)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        return benchmark

    return go
