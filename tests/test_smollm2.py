"""The README's "Switching from TRL" example: on the real SmolLM2-135M-Instruct for two GRPO steps
on the CPU, and the README's snippet itself executed verbatim except for the model (a tiny saved
model), so the example in the README cannot rot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from tests.tiny import save_tiny_model

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL = "smollm2-135m-instruct"


def readme_snippet() -> str:
    """The first python block under the README's "Switching from TRL" heading."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Switching from TRL", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "README.md lost its 'Switching from TRL' python example"
    return match.group(1)


@pytest.mark.slow
def test_smollm2_two_grpo_steps_on_cpu(tmp_path: Path) -> None:
    # The README snippet's shape, cut to two steps of 4 completions of at most 16 tokens.
    calls: list[int] = []

    def reward_len(completions: list[str], **kwargs: Any) -> list[float]:
        calls.append(len(completions))
        return [-abs(20 - len(c)) for c in completions]

    dataset = Dataset.from_list([{"prompt": "Say hi:"}] * 64)
    args = GRPOConfig(
        output_dir=str(tmp_path / "hi"),
        num_generations=4,
        per_device_train_batch_size=4,
        max_completion_length=16,
        max_steps=2,
        learning_rate=1e-5,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    trainer = GRPOTrainer(model=MODEL, reward_funcs=reward_len, args=args, train_dataset=dataset)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    state = trainer.train()

    assert state.global_step == 2 and calls == [4, 4]
    logged = [json.loads(x) for x in (tmp_path / "hi" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [1, 2]
    for key in ("reward", "loss", "grad_norm", "entropy", "completions/mean_length"):
        assert all(isinstance(m[key], float) for m in logged), key
    # Float32 master weights take the lr-1e-5 update even under bf16 autocast.
    after = dict(trainer.model.named_parameters())
    changed = sum(not torch.equal(before[k], after[k]) for k in before)
    assert changed > len(before) // 2, f"only {changed} of {len(before)} tensors changed"


def test_readme_snippet_runs_with_a_tiny_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    snippet = readme_snippet()
    assert "from grpokit import GRPOConfig, GRPOTrainer" in snippet
    assert f'model="{MODEL}"' in snippet
    tiny = save_tiny_model(str(tmp_path / "tiny"))
    monkeypatch.chdir(tmp_path)  # the snippet writes to runs/hi
    namespace: dict[str, Any] = {}
    exec(compile(snippet.replace(f'"{MODEL}"', repr(tiny)), "README.md", "exec"), namespace)

    trainer = namespace["trainer"]
    assert trainer.state.global_step == trainer.args.max_steps
    assert (tmp_path / "runs" / "hi" / "metrics.jsonl").exists()
    assert (tmp_path / "runs" / "hi" / "final" / "model.safetensors").exists()
