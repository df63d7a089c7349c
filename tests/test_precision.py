"""fastem.precision: which dtype the adaptation steps' autocast uses."""
import pytest
import torch

import fastem.precision as precision
from tiny_whisper import tiny_whisper


@pytest.fixture
def flags(monkeypatch):
    """Set the CPU flags the module reads."""
    def set_flags(*names):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(names))
    return set_flags


def test_model_and_bfloat16_are_what_they_say(flags):
    model = tiny_whisper()
    flags()
    assert precision.step_dtype("model", model) is None
    assert precision.step_dtype("bfloat16", model) is torch.bfloat16  # asked for: used even where it is emulated
    with pytest.raises(ValueError, match="step_precision"):
        precision.step_dtype("half", model)


@pytest.mark.parametrize("cpu, want", [((), None), (("avx2", "avx512f"), None), (("avx512_bf16",), torch.bfloat16),
                                       (("amx_tile", "amx_bf16"), torch.bfloat16)])
def test_auto_uses_bfloat16_only_where_the_cpu_computes_it_natively(flags, cpu, want):
    model = tiny_whisper()
    flags(*cpu)
    assert precision.native_bfloat16(torch.device("cpu")) is (want is not None)
    assert precision.step_dtype("auto", model) is want
    with precision.step_autocast("auto", model):
        out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == (want or torch.float32)


def test_auto_leaves_a_model_that_is_not_float32_as_it_is(flags):
    flags("amx_bf16")
    assert precision.step_dtype("auto", tiny_whisper().double()) is None
    assert precision.step_dtype("auto", tiny_whisper().to(torch.bfloat16)) is None


def test_cpu_flags_are_read_from_linux_and_empty_elsewhere(monkeypatch, tmp_path):
    precision.cpu_flags.cache_clear()
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16 amx_bf16\n")
    real = precision.Path
    monkeypatch.setattr(precision, "Path", lambda p: real(info) if p == "/proc/cpuinfo" else real(p))
    assert precision.cpu_flags() == {"fpu", "sse2", "avx512_bf16", "amx_bf16"}
    precision.cpu_flags.cache_clear()
    monkeypatch.setattr(precision, "Path", lambda p: real(tmp_path / "missing"))
    assert precision.cpu_flags() == frozenset()
    precision.cpu_flags.cache_clear()


def test_full_precision_turns_autocast_off():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with precision.full_precision(torch.zeros(1)):
            out = torch.nn.functional.linear(torch.randn(2, 4), torch.randn(3, 4))
    assert out.dtype == torch.float32
