"""The compute dtype: `--dtype auto` and what the page says about it (backend/device.py
resolve_dtype), and the bfloat16 products the CPU path uses when the CPU has them."""
from __future__ import annotations

import numpy as np
import pytest

import app
from backend import device
from backend.nn import host
from backend.nn.host import BFLOAT16, cpu_bf16_flags, host_gemm, host_matmul


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend the CPU has the given bfloat16 flags."""
    def set_flags(flags):
        monkeypatch.setattr(host, "cpu_bf16_flags", lambda: list(flags))
    return set_flags


def test_auto_is_bfloat16_on_a_cpu_with_native_bfloat16_products(cpu_flags):
    cpu_flags(["avx512_bf16"])
    dtype, note = device.resolve_dtype("auto", "CPU")
    assert dtype == "bfloat16"
    assert "native: avx512_bf16" in note


def test_auto_is_float32_on_a_cpu_without_them_and_bfloat16_says_it_is_emulated(cpu_flags):
    cpu_flags([])
    assert device.resolve_dtype("auto", "CPU") == ("float32", "float32")
    dtype, note = device.resolve_dtype("bfloat16", "CPU")
    assert dtype == "bfloat16"
    assert "emulated" in note and "slower than float32" in note


@pytest.mark.parametrize("target", ["GPU", "Ascend"])
def test_auto_is_float16_on_accelerators(target):
    assert device.resolve_dtype("auto", target) == ("float16", f"float16 on {target}")


def test_explicit_dtypes_are_kept(cpu_flags):
    cpu_flags(["avx512_bf16"])
    for name in ("float32", "float16", "bfloat16"):
        assert device.resolve_dtype(name.upper(), "CPU")[0] == name


def test_an_unknown_dtype_is_refused_with_the_allowed_names():
    with pytest.raises(ValueError, match="auto, float32, float16, bfloat16"):
        device.resolve_dtype("int8", "CPU")


def test_the_app_defaults_to_auto_and_refuses_unknown_dtypes_at_start(monkeypatch, capsys):
    monkeypatch.delenv("KANDINSKY_STUDIO_ARGS", raising=False)
    assert app.parse_args([]).dtype == "auto"
    with pytest.raises(SystemExit):
        app.parse_args(["--dtype", "half"])
    err = capsys.readouterr().err
    assert "--dtype" in err and "'auto', 'float32', 'float16', 'bfloat16'" in err


def test_cpu_flags_come_from_proc_cpuinfo():
    flags = cpu_bf16_flags()
    with open("/proc/cpuinfo") as info:
        text = info.read()
    assert flags == [flag for flag in ("avx512_bf16", "amx_bf16") if f" {flag}" in text]


def test_a_bfloat16_operand_makes_a_bfloat16_product_with_float32_accumulation():
    """With a native bfloat16 gemm: the product equals the exact product of the bfloat16-rounded
    operands (float32 accumulation), not the float32 product. Without one: the float32 product
    of the rounded weight."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 300), dtype=np.float32)
    w = rng.standard_normal((300, 96), dtype=np.float32).astype(BFLOAT16)
    out = host_matmul(a, w)
    assert out.dtype == np.float32
    w32 = w.astype(np.float32)
    if host_gemm().gemm_bf16 is not None:
        exact = a.astype(BFLOAT16).astype(np.float64) @ w32.astype(np.float64)
    else:
        exact = a.astype(np.float64) @ w32.astype(np.float64)
    np.testing.assert_allclose(out, exact, rtol=0, atol=1e-4 * np.abs(exact).max())
    assert np.abs(out - a @ w32).max() > 1e-3 * np.abs(exact).max() or host_gemm().gemm_bf16 is None
