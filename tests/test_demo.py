"""`grpokit demo` chooses its settings from the CPU it finds, and says what and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit.app import demo
from grpokit.app.cli import main
from grpokit.app.run_config import build_config
from grpokit.engines import models


def test_native_bf16_keeps_the_standard_settings() -> None:
    config, reason = demo.demo_config(native_bf16=True, cores=2)
    assert config == demo.DEMO_CONFIG
    assert reason == "demo settings: 2 cores, native bf16: the standard settings."


def test_without_bf16_lora_higher_lr_half_batch_fewer_steps_shorter_eval() -> None:
    config, reason = demo.demo_config(native_bf16=False, cores=2)
    assert config["lora"] == {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
    training, standard = config["training"], demo.DEMO_CONFIG["training"]
    assert training["learning_rate"] == 20 * standard["learning_rate"] == 2e-4
    assert training["max_steps"] == 30 < standard["max_steps"]
    assert (
        training["per_device_train_batch_size"]
        == 16
        == standard["per_device_train_batch_size"] // 2
    )
    assert config["eval"]["num_prompts"] == 100 < demo.DEMO_CONFIG["eval"]["num_prompts"]
    # the rest of the workload is unchanged; DEMO_CONFIG itself is not modified
    assert training["num_generations"] == standard["num_generations"] == 8
    assert training["max_completion_length"] == standard["max_completion_length"]
    assert "lora" not in demo.DEMO_CONFIG
    assert reason.startswith("demo settings: 2 cores, no native bf16: ")
    assert (
        "LoRA r=16 on all linear layers, learning_rate 0.0002, max_steps 30, "
        "batch 16 completions (2 prompts x 8), 100 held-out prompts (every matmul runs in fp32"
    ) in reason
    spec = build_config(config)  # a valid run config
    assert spec.run.lora == config["lora"]
    assert spec.training.per_device_train_batch_size == 16


def test_one_core_halves_the_batch() -> None:
    config, reason = demo.demo_config(native_bf16=True, cores=1)
    assert config["training"]["per_device_train_batch_size"] == 16
    assert "batch 16 completions" in reason and "one core" in reason
    assert "lora" not in config


@pytest.mark.parametrize("native", [True, False])
def test_run_demo_detects_the_cpu_prints_the_choice_and_overrides_win(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    native: bool,
) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA host: the demo would detect the GPU")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx2 fma" + (" avx512_bf16" if native else "") + "\n")
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(name, raising=False)
    models.bf16_supported.cache_clear()
    request.addfinalizer(models.bf16_supported.cache_clear)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    seen: dict[str, Any] = {}

    def fake_run_training(spec: Any, overwrite: bool = False) -> dict[str, Any]:
        seen["spec"] = spec
        return {"before": None, "after": None, "model_dir": "m", "plot": "p"}

    monkeypatch.setattr("grpokit.app.run.run_training", fake_run_training)
    assert main(["demo", "--max_steps", "7"]) == 0
    out = capsys.readouterr().out
    spec = seen["spec"]
    assert spec.training.max_steps == 7  # the command line wins over the CPU's choice
    if native:
        assert "2 cores, native bf16 (avx512_bf16): the standard settings." in out
        assert spec.run.lora is None
        assert spec.training.learning_rate == 1e-5
    else:
        assert "2 cores, no native bf16 (no avx512_bf16/amx_bf16): LoRA r=16" in out
        assert spec.run.lora == demo.DEMO_LORA
        assert spec.training.learning_rate == 2e-4
        assert spec.training.per_device_train_batch_size == 16
        assert spec.eval.num_prompts == 100
