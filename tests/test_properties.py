"""Property-based tests (hypothesis): load_audio, ops.token_stats (PyTorch reference) and em_loss on random input.

Each property runs a few dozen examples with no deadline; the whole file takes a few seconds on one CPU core.
"""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastem import em_loss
from fastem.audio import SAMPLE_RATE, SILENCE_PEAK, AudioError, SilentAudioError, is_silent, load_audio
from fastem.objective import BASELINES, REDUCTIONS, SEQUENCE_OBJECTIVES as OBJECTIVES
from fastem.ops import IGNORE_INDEX, token_stats

# FASTEM_HYPOTHESIS_EXAMPLES=1000 for a longer search.
FAST = settings(max_examples=int(os.environ.get("FASTEM_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# --- load_audio ----------------------------------------------------------------------------------

RATES = st.one_of(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]), st.integers(1000, 384000))
AMPLITUDES = st.sampled_from([0.0, 1e-7, SILENCE_PEAK * 0.9, SILENCE_PEAK * 1.1, 1e-3, 0.5, 1.0])


@st.composite
def audio_arrays(draw, dtypes=("float32", "float64", "int16")):
    """(samples, rate): mono [T], or [T, C] / [C, T] with T > 8 and C <= 2, as numpy or torch."""
    rate = draw(RATES)
    n = draw(st.integers(1, 3000))
    dtype = draw(st.sampled_from(dtypes))
    channels = draw(st.sampled_from([0, 1, 2])) if n > 8 else 0  # 0: 1-D
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (n,) if channels == 0 else (n, channels)
    kind = draw(st.sampled_from(["noise", "impulse", "constant"]))
    if kind == "noise":
        x = rng.uniform(-1, 1, size=shape)
    elif kind == "impulse":
        x = np.zeros(shape)
        x[(rng.integers(n),) + ((rng.integers(channels),) if channels else ())] = rng.choice([-1.0, 1.0])
    else:
        x = np.ones(shape)
    x = x * draw(AMPLITUDES)
    x = np.round(x * 32767).astype(np.int16) if dtype == "int16" else x.astype(dtype)
    if channels and draw(st.booleans()):
        x = np.ascontiguousarray(x.T)  # [C, T], torchaudio's layout
    return (torch.from_numpy(x) if draw(st.booleans()) else x), rate


@FAST
@given(audio_arrays())
def test_load_audio_gives_finite_mono_float32_at_16k_or_refuses_silence(case):
    samples, rate = case
    n = max(samples.shape)
    try:
        wave = load_audio(samples, rate)
    except SilentAudioError:
        wave = load_audio(samples, rate, allow_silence=True)
        assert is_silent(wave)
    else:
        assert not is_silent(wave)
    assert wave.dtype == torch.float32 and wave.ndim == 1 and wave.is_contiguous()
    assert wave.shape[0] == -(-n * SAMPLE_RATE // rate)  # ceil(n * 16000 / rate)
    assert torch.isfinite(wave).all()
    if rate == SAMPLE_RATE and samples.ndim == 1 and samples.dtype in (np.float32, torch.float32):
        assert np.array_equal(wave.numpy(), np.asarray(samples))


@FAST
@given(audio_arrays(dtypes=("float32", "float64")), st.sampled_from([math.nan, math.inf, -math.inf]),
       st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_load_audio_refuses_nan_and_inf(case, bad, count, seed):
    samples, rate = case
    x = samples.clone() if isinstance(samples, torch.Tensor) else samples.copy()
    flat = x.reshape(-1)
    flat[np.random.default_rng(seed).integers(flat.shape[0], size=count)] = bad
    for allow_silence in (False, True):
        with pytest.raises(AudioError, match="contains NaN or Inf samples"):
            load_audio(x, rate, allow_silence=allow_silence)


@FAST
@given(st.integers(-10**6, 999) | st.integers(384001, 10**7) | st.floats(allow_nan=True, allow_infinity=True))
def test_load_audio_refuses_bad_rates_by_name(rate):
    assume(not (isinstance(rate, float) and rate.is_integer() and 1000 <= rate <= 384000))
    with pytest.raises(AudioError, match="sampling rate"):
        load_audio(np.full(100, 0.5, dtype=np.float32), rate)


# --- ops.token_stats (backend="torch") ------------------------------------------------------------


@st.composite
def logits_cases(draw):
    n, v = draw(st.integers(1, 6)), draw(st.integers(1, 257))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    z = rng.standard_normal((n, v)) * scale
    extreme = rng.random((n, v)) < draw(st.sampled_from([0.0, 0.05, 0.5]))
    z[extreme] = rng.choice([-1e4, 1e4], size=int(extreme.sum()))
    neg_inf = rng.random((n, v)) < draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    keep = rng.integers(v, size=n)                     # at least one finite entry per row
    neg_inf[np.arange(n), keep] = False
    z[neg_inf] = -np.inf
    # Targets: a finite entry of the row, or ignored.
    targets = np.array([rng.choice(np.flatnonzero(~neg_inf[i])) for i in range(n)])
    targets[rng.random(n) < 0.25] = IGNORE_INDEX
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return torch.from_numpy(z).to(dtype), torch.from_numpy(targets).long()


def _float64_stats(logits: torch.Tensor, targets: torch.Tensor):
    z = logits.double()
    lse = torch.logsumexp(z, -1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - torch.where(p > 0, p * z, torch.zeros_like(z)).sum(-1)
    valid = targets != IGNORE_INDEX
    logp = torch.where(valid, z.gather(1, targets.clamp_min(0)[:, None])[:, 0] - lse, torch.zeros_like(lse))
    return entropy, logp


@FAST
@given(logits_cases())
def test_token_stats_bounds_and_float64_agreement(case):
    logits, targets = case
    logits = logits.clone().requires_grad_(True)
    entropy, logp = token_stats(logits, targets, backend="torch")
    assert entropy.shape == logp.shape == targets.shape
    assert not torch.isnan(entropy).any() and not torch.isnan(logp).any()
    assert torch.isfinite(entropy).all() and torch.isfinite(logp).all()  # targets are finite entries
    # The reference computes H = logsumexp(z) - sum(p * z): two numbers of the size of the logits that
    # cancel, so its absolute error grows with max |z| (measured: up to ~10 roundoff units of max |z|).
    # At |z| ~ 1e4 in float32 that is ~1e-3, enough to put H above log V (e.g. z = [1e4, 1e4]: H =
    # 0.6934 > log 2); shifting z by its row maximum first would remove it. Tolerance accordingly.
    peak = logits.detach().double().masked_fill(~torch.isfinite(logits.detach()), 0).abs().amax(-1)
    unit = 2.0**-53 if logits.dtype == torch.float64 else 2.0**-24  # float32 compute for float32/bfloat16
    tol = 1e-6 + 32 * unit * (peak + 1)
    n_finite = torch.isfinite(logits.detach()).sum(-1).double()
    assert (entropy >= 0).all()
    assert (entropy.double() <= torch.log(n_finite) + tol).all()  # so <= log V as well
    assert (logp <= 0).all() and (logp[targets == IGNORE_INDEX] == 0).all()

    ref_entropy, ref_logp = _float64_stats(logits.detach(), targets)
    assert ((entropy.double() - ref_entropy).abs() <= tol).all()
    assert ((logp.double() - ref_logp).abs() <= tol).all()

    (entropy.sum() + logp.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[torch.isneginf(logits.detach())] == 0).all()


# --- em_loss ------------------------------------------------------------------------------------------


@st.composite
def loss_cases(draw):
    k, t = draw(st.integers(1, 5)), draw(st.integers(1, 9))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    entropy = torch.from_numpy(rng.random((k, t)) * scale)
    logp = torch.from_numpy(-rng.random((k, t)) * scale)
    # Masks as the sampler makes them: a prefix of real tokens per row; some rows may be empty.
    lengths = rng.integers(0, t + 1, size=k)
    if draw(st.booleans()):
        lengths[rng.integers(k)] = 0
    mask = torch.arange(t)[None, :] < torch.from_numpy(lengths)[:, None]
    if draw(st.booleans()):  # arbitrary (non-prefix) masks too
        mask = torch.from_numpy(rng.random((k, t)) < 0.6)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return entropy.to(dtype), logp.to(dtype), mask


OPTIONS = st.tuples(st.sampled_from(OBJECTIVES), st.sampled_from(BASELINES), st.sampled_from(REDUCTIONS))


@FAST
@given(loss_cases(), OPTIONS)
def test_em_loss_is_finite_with_finite_gradients(case, options):
    objective, baseline, reduction = options
    entropy, logp, mask = (x.clone() for x in case)
    entropy.requires_grad_(True)
    logp.requires_grad_(True)
    loss = em_loss(entropy, logp, mask, objective=objective, baseline=baseline, reduction=reduction)
    assert loss.shape == () and loss.dtype == entropy.dtype and torch.isfinite(loss)
    loss.backward()
    for x in (entropy, logp):
        grad = torch.zeros_like(x) if x.grad is None else x.grad  # objective="entropy" does not read logp
        assert torch.isfinite(grad).all()
        assert (grad[~mask] == 0).all()  # padding gets no gradient


@FAST
@given(loss_cases(), st.sampled_from(REDUCTIONS))
def test_entropy_objective_is_the_masked_entropy_sum(case, reduction):
    entropy, logp, mask = case
    k = entropy.shape[0]
    loss = em_loss(entropy, logp, mask, objective="entropy", reduction=reduction)
    total = (entropy.double() * mask).sum()
    expected = total / k if reduction == "sum" else total / max(int(mask.sum()), 1)
    rtol = 1e-12 if entropy.dtype == torch.float64 else 1e-5
    assert math.isclose(loss.item(), expected.item(), rel_tol=rtol, abs_tol=rtol)


@FAST
@given(loss_cases(), OPTIONS, st.integers(0, 2**32 - 1))
def test_masked_out_entries_contribute_nothing(case, options, seed):
    """Values under a zero mask (padding, and rows whose mask is all zero) never change the loss."""
    objective, baseline, reduction = options
    entropy, logp, mask = case
    g = torch.Generator().manual_seed(seed)
    noise_h = torch.rand(entropy.shape, generator=g, dtype=torch.float64).to(entropy.dtype) * 1e3
    noise_l = -torch.rand(entropy.shape, generator=g, dtype=torch.float64).to(entropy.dtype) * 1e3
    kw = dict(objective=objective, baseline=baseline, reduction=reduction)
    # objective="random" draws its coins per sample: the same generator seed, the same coins
    loss = em_loss(entropy, logp, mask, generator=torch.Generator().manual_seed(seed), **kw)
    other = em_loss(torch.where(mask, entropy, noise_h), torch.where(mask, logp, noise_l), mask,
                    generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(loss, other)


@FAST
@given(loss_cases(), st.sampled_from([o for o in OBJECTIVES if o != "random"]), st.integers(1, 3),
       st.integers(0, 2**32 - 1))
def test_all_zero_mask_rows_contribute_nothing(case, objective, extra, seed):
    """Inserting rows with an all-zero mask (any values) leaves the loss as it was: unchanged per token
    (reduction="mean"), and only rescaled by K / (K + extra) for the per-sample average (reduction="sum").
    With baseline="none": the other baselines average over the K samples, as they should.  (Not for the
    random objective: inserted rows take coins, so the others' coins move.)"""
    entropy, logp, mask = case
    k, t = entropy.shape
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(k + extra, generator=g)[:k].sort().values  # where the original rows go
    big_h = (torch.rand(k + extra, t, generator=g, dtype=torch.float64) * 1e3).to(entropy.dtype)
    big_l = (-torch.rand(k + extra, t, generator=g, dtype=torch.float64) * 1e3).to(entropy.dtype)
    big_m = torch.zeros(k + extra, t, dtype=torch.bool)
    big_h[rows], big_l[rows], big_m[rows] = entropy, logp, mask
    rtol = 1e-12 if entropy.dtype == torch.float64 else 1e-5
    for reduction, scale in (("mean", 1.0), ("sum", (k + extra) / k)):
        kw = dict(objective=objective, baseline="none", reduction=reduction)
        small, big = em_loss(entropy, logp, mask, **kw).item(), em_loss(big_h, big_l, big_m, **kw).item()
        assert math.isclose(big * scale, small, rel_tol=rtol, abs_tol=rtol * (1 + abs(small)))
