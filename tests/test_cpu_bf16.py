"""Native-bf16 detection on CPU: the `/proc/cpuinfo` flags, less the ISA caps a user sets
(`ONEDNN_MAX_CPU_ISA`, `ATEN_CPU_CAPABILITY`), and where the verdict is reported."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.app import demo
from grpokit.engines import models
from grpokit.engines.device import device_traits
from grpokit.engines.models import (
    bf16_isa_caps,
    bf16_supported,
    cpu_bf16,
    cpu_flags,
)
from grpokit.train.build import resolve_precision

# Two CPUs listed: only the first one's flags count.
CPUINFO = """processor\t: 0
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16
processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma avx512f avx512_bf16 amx_bf16
"""
ZEN2 = CPUINFO.replace(" avx512f avx512_bf16\n", "\n", 1)  # first CPU: AVX2/FMA only


@pytest.fixture
def fresh_probe() -> Iterator[None]:
    """`bf16_supported` caches its answer: forget it before and after the test."""
    bf16_supported.cache_clear()
    yield
    bf16_supported.cache_clear()


def test_flags_of_the_first_cpu() -> None:
    assert cpu_flags(CPUINFO) == {"fpu", "sse", "avx2", "fma", "avx512f", "avx512_bf16"}
    assert cpu_flags(ZEN2) == {"fpu", "sse", "avx2", "fma"}
    assert cpu_flags("") == set()


@pytest.mark.parametrize(
    ("environ", "caps"),
    [
        ({}, []),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, ["ONEDNN_MAX_CPU_ISA=AVX2"]),
        ({"ONEDNN_MAX_CPU_ISA": "avx2"}, ["ONEDNN_MAX_CPU_ISA=avx2"]),  # any case
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}, ["ONEDNN_MAX_CPU_ISA=AVX512_CORE"]),  # no BF16
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, ["ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI"]),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI_2"}, ["ONEDNN_MAX_CPU_ISA=AVX2_VNNI_2"]),
        ({"DNNL_MAX_CPU_ISA": "SSE41"}, ["DNNL_MAX_CPU_ISA=SSE41"]),  # oneDNN's older name
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, []),  # at the bf16 level: no cap
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}, []),
        ({"ONEDNN_MAX_CPU_ISA": "DEFAULT"}, []),
        ({"ONEDNN_MAX_CPU_ISA": ""}, []),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, ["ATEN_CPU_CAPABILITY=avx2"]),
        ({"ATEN_CPU_CAPABILITY": "default"}, ["ATEN_CPU_CAPABILITY=default"]),
        ({"ATEN_CPU_CAPABILITY": "avx512"}, []),  # ATen's highest x86 level
        (
            {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OTHER": "AVX2"},
            ["ONEDNN_MAX_CPU_ISA=AVX2", "ATEN_CPU_CAPABILITY=avx2"],
        ),
    ],
)
def test_which_settings_cap_below_avx512_bf16(environ: dict[str, str], caps: list[str]) -> None:
    assert bf16_isa_caps(environ) == caps
    verdict = cpu_bf16(CPUINFO, environ)
    assert verdict.native is (not caps)
    assert verdict.flags == ("avx512_bf16",)
    assert verdict.caps == tuple(caps)


def test_the_reason_names_the_flag_and_the_caps() -> None:
    native = cpu_bf16(CPUINFO, {})
    assert native.reason == "avx512_bf16"
    assert native.describe() == "native bf16 (avx512_bf16)"
    capped = cpu_bf16(CPUINFO, {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"})
    caps = "ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2"
    assert capped.reason == f"avx512_bf16 capped by {caps}"
    assert capped.describe() == f"no native bf16 ({capped.reason})"
    # Without the flag a cap changes nothing: the reason is the missing flag.
    zen2 = cpu_bf16(ZEN2, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert (zen2.native, zen2.flags, zen2.reason) == (False, (), "no avx512_bf16/amx_bf16")
    # A cap above the hardware adds nothing either.
    assert cpu_bf16(ZEN2, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}).native is False
    assert cpu_bf16("", {}).native is False  # no /proc/cpuinfo (not Linux)


def test_bf16_supported_reads_cpuinfo_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_probe: None
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA host: the default device is the GPU")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    assert bf16_supported("cpu") is True
    bf16_supported.cache_clear()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert bf16_supported("cpu") is False
    assert bf16_supported() is False  # default device = the CPU
    bf16_supported.cache_clear()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    cpuinfo.write_text(ZEN2)
    assert bf16_supported("cpu") is False
    bf16_supported.cache_clear()
    monkeypatch.setattr(models, "CPUINFO", tmp_path / "missing")
    assert bf16_supported("cpu") is False


def test_the_demo_banner_says_the_cpu_is_capped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_probe: None
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA host: the demo would report the GPU")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    config, reason = demo.demo_config(cores=2)
    assert reason.startswith(
        "demo settings: 2 cores, no native bf16 (avx512_bf16 capped by ONEDNN_MAX_CPU_ISA=AVX2): "
    )
    assert config["lora"] == demo.DEMO_LORA  # the settings for a CPU without native bf16
    bf16_supported.cache_clear()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    config, reason = demo.demo_config(cores=2)
    assert reason == "demo settings: 2 cores, native bf16 (avx512_bf16): the standard settings."
    assert config == demo.DEMO_CONFIG


def test_device_traits_and_the_precision_rule_follow_the_caps(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    fresh_probe: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO)
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    traits = device_traits("cpu")
    assert traits.native_bf16 is False and traits.sampler_dtype is None
    assert traits.bf16_reason == "avx512_bf16 capped by ATEN_CPU_CAPABILITY=avx2"
    caplog.set_level("INFO", logger="grpokit")
    assert resolve_precision(GRPOConfig(bf16=True), "cpu") is False  # float32 compute
    assert "no native bf16: avx512_bf16 capped by ATEN_CPU_CAPABILITY=avx2" in caplog.text
    bf16_supported.cache_clear()
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    traits = device_traits("cpu")
    assert (traits.native_bf16, traits.bf16_reason) == (True, "avx512_bf16")
    assert traits.sampler_dtype == torch.bfloat16
    assert resolve_precision(GRPOConfig(bf16=True), "cpu") is True
