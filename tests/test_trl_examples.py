"""GRPO scripts in the shapes TRL's documentation shows, run with only the import changed.

Each script below is written as a TRL user writes it (`from trl import GRPOConfig, GRPOTrainer`).
The test swaps that import for grpokit's and nothing else, then runs the script on a tiny model
saved to disk (no hub here: the model id is a local folder, the dataset a local `Dataset`), and
checks what the run logged against what the settings mean: reward weights combine the per-function
means, KL appears only with beta, a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from tests.tiny import make_reward_model, make_tokenizer, save_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

TRL_IMPORT = "from trl import GRPOConfig, GRPOTrainer"
GRPOKIT_IMPORT = "from grpokit import GRPOConfig, GRPOTrainer"

# Small sizes shared by every script (TRL's defaults would take minutes on a CPU).
TINY = (
    "max_completion_length=8, per_device_train_batch_size=4, num_generations=2, max_steps=2, "
    "logging_steps=1, bf16=False"
)


def run_trl_script(script: str, tmp_path: Path, **names: Any) -> dict[str, Any]:
    """Run `script` with TRL's import replaced by grpokit's (and nothing else changed)."""
    source = textwrap.dedent(script).replace("TINY", TINY)
    assert source.count(TRL_IMPORT) == 1, "every example imports GRPOConfig/GRPOTrainer from trl"
    ported = source.replace(TRL_IMPORT, GRPOKIT_IMPORT)
    changed = [
        (a, b) for a, b in zip(source.splitlines(), ported.splitlines(), strict=True) if a != b
    ]
    assert changed == [(TRL_IMPORT, GRPOKIT_IMPORT)]
    namespace: dict[str, Any] = {
        "MODEL": save_tiny_model(str(tmp_path / "model")),
        "OUTPUT": str(tmp_path / "run"),
        **names,
    }
    exec(compile(ported, "trl_example.py", "exec"), namespace)
    return namespace


def logged(namespace: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(namespace["OUTPUT"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def plain_dataset() -> Dataset:
    return Dataset.from_list([{"prompt": p} for p in ["The sky", "A cat", "Rain", "Ten"]])


def chat_dataset() -> Dataset:
    return Dataset.from_list(
        [{"prompt": [{"role": "user", "content": p}]} for p in ["hi", "yo", "ok", "no"]]
    )


# The reward functions of TRL's GRPO documentation, as a user copies them.
REWARDS = '''
def reward_len(completions, **kwargs):
    """Prefer completions of 20 characters."""
    return [-abs(20 - len(completion)) for completion in completions]

def reward_num_unique_letters(completions, **kwargs):
    """Number of unique letters in the completion."""
    contents = [c if isinstance(c, str) else c[0]["content"] for c in completions]
    return [float(len(set(content))) for content in contents]
'''


def test_quick_start(tmp_path: Path) -> None:
    script = (
        """
        from trl import GRPOConfig, GRPOTrainer
        """
        + textwrap.indent(textwrap.dedent(REWARDS), "        ")
        + """
        dataset = make_dataset()
        training_args = GRPOConfig(output_dir=OUTPUT, TINY)
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_num_unique_letters,
            args=training_args,
            train_dataset=dataset,
        )
        trainer.train()
        """
    )
    ns = run_trl_script(script, tmp_path, make_dataset=plain_dataset)
    records = logged(ns)
    assert [r["step"] for r in records] == [1, 2]
    last = records[-1]
    # One reward function: the logged reward is its mean; beta defaults to 0, so no KL is logged.
    assert last["reward"] == pytest.approx(last["rewards/reward_num_unique_letters/mean"])
    assert "kl" not in last
    for key in ("loss", "grad_norm", "learning_rate", "completions/mean_length"):
        assert math.isfinite(last[key]), key


def test_conversational_dataset_with_a_chat_template(tmp_path: Path) -> None:
    script = (
        """
        from trl import GRPOConfig, GRPOTrainer
        """
        + textwrap.indent(textwrap.dedent(REWARDS), "        ")
        + """
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_num_unique_letters,
            args=GRPOConfig(output_dir=OUTPUT, log_completions=True, TINY),
            train_dataset=make_dataset(),
        )
        trainer.train()
        """
    )
    ns = run_trl_script(script, tmp_path, make_dataset=chat_dataset)
    rows = [
        json.loads(line)
        for line in (Path(ns["OUTPUT"]) / "completions.jsonl").read_text().splitlines()
    ]
    # Chat prompts come back as message lists; completions as one assistant message each.
    assert rows and all(isinstance(r["prompt"], list) for r in rows)
    assert all(r["completion"][0]["role"] == "assistant" for r in rows)


def test_several_reward_functions_with_weights(tmp_path: Path) -> None:
    script = (
        """
        from trl import GRPOConfig, GRPOTrainer
        """
        + textwrap.indent(textwrap.dedent(REWARDS), "        ")
        + """
        training_args = GRPOConfig(output_dir=OUTPUT, reward_weights=[0.25, 2.0], TINY)
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=[reward_len, reward_num_unique_letters],
            args=training_args,
            train_dataset=make_dataset(),
        )
        trainer.train()
        """
    )
    ns = run_trl_script(script, tmp_path, make_dataset=plain_dataset)
    for record in logged(ns):
        # TRL's meaning: the reward is the weighted sum of the functions' rewards, so its mean is
        # 0.25 * mean(reward_len) + 2.0 * mean(reward_num_unique_letters).
        expected = (
            0.25 * record["rewards/reward_len/mean"]
            + 2.0 * (record["rewards/reward_num_unique_letters/mean"])
        )
        assert record["reward"] == pytest.approx(expected, rel=1e-5)


def test_reward_model_given_by_path(tmp_path: Path) -> None:
    reward_dir = tmp_path / "reward-model"
    make_reward_model(make_tokenizer()).save_pretrained(reward_dir)
    make_tokenizer().save_pretrained(reward_dir)
    script = """
        from trl import GRPOConfig, GRPOTrainer
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=REWARD_MODEL,
            args=GRPOConfig(output_dir=OUTPUT, TINY),
            train_dataset=make_dataset(),
        )
        trainer.train()
        """
    ns = run_trl_script(script, tmp_path, make_dataset=plain_dataset, REWARD_MODEL=str(reward_dir))
    last = logged(ns)[-1]
    # The reward model's name in the metrics is its folder's name, as TRL names it by its path.
    reward_keys = [k for k in last if k.startswith("rewards/") and k.endswith("/mean")]
    assert len(reward_keys) == 1 and "reward-model" in reward_keys[0]
    assert last["reward"] == pytest.approx(last[reward_keys[0]])


@pytest.mark.parametrize(
    ("settings", "level"),
    [
        # GSPO (Zheng et al. 2025), as TRL's docs configure it.
        (
            'importance_sampling_level="sequence", loss_type="grpo", beta=0.0, '
            "epsilon=3e-4, epsilon_high=4e-4, steps_per_generation=2",
            "sequence",
        ),
        # Dr. GRPO (Liu et al. 2025).
        ('loss_type="dr_grpo", scale_rewards="none", beta=0.0', "token"),
        # DAPO (Yu et al. 2025): clip-higher, token-level loss, overlong masking.
        (
            'loss_type="dapo", epsilon_high=0.28, beta=0.0, mask_truncated_completions=True',
            "token",
        ),
    ],
    ids=["gspo", "dr_grpo", "dapo"],
)
def test_variant_settings_from_the_docs(tmp_path: Path, settings: str, level: str) -> None:
    script = (
        """
        from trl import GRPOConfig, GRPOTrainer
        """
        + textwrap.indent(textwrap.dedent(REWARDS), "        ")
        + f"""
        training_args = GRPOConfig(output_dir=OUTPUT, {settings}, TINY)
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_num_unique_letters,
            args=training_args,
            train_dataset=make_dataset(),
        )
        trainer.train()
        """
    )
    ns = run_trl_script(script, tmp_path, make_dataset=plain_dataset)
    trainer = ns["trainer"]
    assert trainer.args.importance_sampling_level == level
    assert trainer.state.global_step == 2
    assert all(math.isfinite(r["loss"]) for r in logged(ns))


def test_lora_with_peft_config(tmp_path: Path) -> None:
    script = """
        from peft import LoraConfig
        from trl import GRPOConfig, GRPOTrainer
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_num_unique_letters,
            args=GRPOConfig(output_dir=OUTPUT, learning_rate=1e-2, TINY),
            train_dataset=make_dataset(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        )
        trainer.train()
        trainer.save_model(OUTPUT + "/adapter")
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_num_unique_letters=lambda completions, **kw: [
            float(len(set(c))) for c in completions
        ],
    )
    trainable = [n for n, p in ns["trainer"].model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert (Path(ns["OUTPUT"]) / "adapter" / "adapter_config.json").exists()


def test_evaluation_during_training(tmp_path: Path) -> None:
    script = """
        from trl import GRPOConfig, GRPOTrainer
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_len,
            args=GRPOConfig(output_dir=OUTPUT, eval_strategy="steps", eval_steps=1, TINY),
            train_dataset=make_dataset(),
            eval_dataset=make_dataset(),
        )
        trainer.train()
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_len=lambda completions, **kw: [-abs(20 - len(c)) for c in completions],
    )
    records = logged(ns)
    assert [r["step"] for r in records] == [1, 2]
    # TRL's eval metric names: the eval_ prefix on the training names.
    assert all("eval_reward" in r for r in records)
    assert all(r["eval_reward"] <= 0 for r in records)  # reward_len is never positive


def test_resume_from_checkpoint(tmp_path: Path) -> None:
    script = """
        from trl import GRPOConfig, GRPOTrainer
        def make_trainer(output_dir, max_steps):
            return GRPOTrainer(
                model=MODEL,
                reward_funcs=reward_len,
                args=GRPOConfig(
                    output_dir=output_dir, save_strategy="steps", save_steps=1, seed=3,
                    max_completion_length=8, per_device_train_batch_size=4, num_generations=2,
                    max_steps=max_steps, logging_steps=1, bf16=False, learning_rate=1e-2,
                ),
                train_dataset=make_dataset(),
            )
        full = make_trainer(OUTPUT + "/full", 3)
        full.train()
        # A run that lost its last step (a crash after checkpoint-2), resumed by a new trainer.
        import shutil
        make_trainer(OUTPUT + "/resumed", 3).train()
        shutil.rmtree(OUTPUT + "/resumed/checkpoint-3")
        resumed = make_trainer(OUTPUT + "/resumed", 3)
        resumed.train(resume_from_checkpoint=True)
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_len=lambda completions, **kw: [-abs(20 - len(c)) for c in completions],
    )
    full = dict(ns["full"].model.named_parameters())
    resumed = dict(ns["resumed"].model.named_parameters())
    assert ns["resumed"].state.global_step == 3
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name
