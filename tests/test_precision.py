"""One precision rule (`train.build.resolve_precision`) for training and evaluation."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from datasets import Dataset

from grpokit.app import evaluation, run
from grpokit.app.run_config import build_config
from grpokit.engines import device
from grpokit.engines.models import bf16_supported
from grpokit.train import build
from grpokit.train.config import GRPOConfig


def _native(monkeypatch: pytest.MonkeyPatch, **by_device: bool) -> None:
    """Pretend the devices named in `by_device` do (True) or do not (False) compute bf16."""
    monkeypatch.setattr(device, "bf16_supported", lambda device_type=None: by_device[device_type])


@pytest.mark.parametrize(
    ("bf16", "native", "expected"),
    [
        (True, True, True),  # asked for and native: bf16 autocast
        (True, False, False),  # asked for, but the CPU would emulate bf16: float32
        (False, True, False),  # not asked for: float32
        (False, False, False),
    ],
)
def test_cpu_decisions(monkeypatch: pytest.MonkeyPatch, bf16: bool, native: bool, expected: bool):
    _native(monkeypatch, cpu=native)
    assert build.resolve_precision(GRPOConfig(bf16=bf16), torch.device("cpu")) is expected
    assert build.resolve_precision(GRPOConfig(bf16=bf16), "cpu") is expected


def test_the_rule_asks_the_device_it_runs_on(monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU with bf16 next to a CPU without: bf16 on the GPU (not turned off there), float32 on
    # the CPU (use_cpu=True on a CUDA host).
    _native(monkeypatch, cuda=True, cpu=False)
    assert build.resolve_precision(GRPOConfig(), torch.device("cuda")) is True
    assert build.resolve_precision(GRPOConfig(), torch.device("cpu")) is False


def test_fp16_is_refused_before_precision_is_decided() -> None:
    with pytest.raises(ValueError, match="fp16=True is not supported"):
        GRPOConfig(fp16=True)


def test_bf16_probe_per_device_type() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA host")
    assert bf16_supported("cuda") is False  # no CUDA device
    assert bf16_supported("mps") is False
    assert bf16_supported() == bf16_supported("cpu")  # default device = the CPU here


@pytest.mark.parametrize("native", [True, False])
def test_grpokit_eval_uses_the_same_rule(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    _native(monkeypatch, cpu=native)
    seen: dict[str, Any] = {}

    def fake_evaluate(model: Any, tokenizer: Any, data: Any, rewards: Any, **kwargs: Any):
        seen.update(kwargs)
        return {}

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    spec = build_config({"rewards": ["accuracy_reward"]})
    task = SimpleNamespace(eval_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}]))
    model = torch.nn.Linear(2, 2)  # on the CPU
    run.run_eval(spec, model, None, task, spec.rewards or [], engine=object())
    assert seen["bf16"] is native
    assert seen["bf16"] is build.resolve_precision(spec.training, "cpu")
