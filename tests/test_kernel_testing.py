"""tests/kernel_testing.check_close: the criterion the kernel tests rely on fails what it must."""
import pytest
import torch

import kernel_testing as kt


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("n", [192, 100_000])
def test_norm_mode_passes_a_smaller_error_and_fails_a_larger_one(n):
    """The same-dtype reference errs by 1e-3 (RMS); a result erring by 0.6e-3 (about the kernels' measured
    ratio) passes, one erring by 3e-3 fails, on a small result (with its allowance) and on a large one."""
    ref = _noise(n, 0)
    same = ref + 1e-3 * _noise(n, 1)
    kt.check_close("close", ref + 0.6e-3 * _noise(n, 2), ref, same, seed=0, mode="norm")
    with pytest.raises(AssertionError, match="error rms"):
        kt.check_close("far", ref + 3e-3 * _noise(n, 2), ref, same, seed=0, mode="norm")


def test_norm_mode_rejects_nan_and_moved_infinities():
    ref = _noise(50, 0)
    same = ref + 1e-3 * _noise(50, 1)
    bad = ref.clone()
    bad[7] = float("nan")
    with pytest.raises(AssertionError, match="NaN"):
        kt.check_close("nan", bad, ref, same, seed=0, mode="norm")
    ref[3] = float("-inf")
    with pytest.raises(AssertionError, match="infinities"):
        kt.check_close("inf", same, ref, same, seed=0, mode="norm")
