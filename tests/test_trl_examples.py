"""GRPO scripts in the shapes TRL's documentation shows, run with only the import changed.

Each script below is written as a TRL user writes it (`from trl import GRPOConfig, GRPOTrainer`).
The test swaps that import for grpokit's and nothing else, then runs the script on a tiny model
saved to disk (no hub here: the model id is a local folder, the dataset a local `Dataset`), and
checks what the run logged against what the settings mean: reward weights combine the per-function
means, KL appears only with beta, a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import json
import logging
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

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


# ---- TRL's scripts/grpo.py: dataclass arguments parsed from the command line ---------------------
# TRL's script takes ScriptArguments, GRPOConfig and ModelConfig from `TrlParser`, a subclass of
# transformers' HfArgumentParser (TRL is not installed here: the script's own dataclasses have
# the fields of TRL's that it reads, and the parser is transformers').
GRPO_SCRIPT = """
from dataclasses import dataclass, field
from peft import LoraConfig
from transformers import HfArgumentParser
from trl import GRPOConfig, GRPOTrainer

@dataclass
class ScriptArguments:
    dataset_name: str | None = None
    dataset_train_split: str = "train"
    dataset_test_split: str = "test"
    reward_model_name_or_path: str | None = None
    reward_funcs: list[str] | None = field(default=None, metadata={"help": "Reward functions."})

@dataclass
class ModelConfig:
    model_name_or_path: str | None = None
    model_revision: str = "main"
    dtype: str | None = None
    attn_implementation: str | None = None
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None
    lora_task_type: str = "CAUSAL_LM"

def get_peft_config(model_args):
    if not model_args.use_peft:
        return None
    return LoraConfig(
        task_type=model_args.lora_task_type, r=model_args.lora_r,
        target_modules=model_args.lora_target_modules, lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout, bias="none",
    )

def main(script_args, training_args, model_args):
    reward_funcs = []
    if script_args.reward_model_name_or_path:
        reward_funcs.append(script_args.reward_model_name_or_path)
    for name in script_args.reward_funcs or []:
        reward_funcs.append(REGISTRY[name])
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs
    dataset = load_dataset(script_args.dataset_name)
    trainer = GRPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=(
            dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None
        ),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()
    return trainer

parser = HfArgumentParser((ScriptArguments, GRPOConfig, ModelConfig))
script_args, training_args, model_args = parser.parse_args_into_dataclasses(ARGV)
trainer = main(script_args, training_args, model_args)
"""


@pytest.mark.usefixtures("restore_field_types")
def test_trl_grpo_script_with_parsed_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datasets import DatasetDict

    reward_dir = tmp_path / "reward-model"
    make_reward_model(make_tokenizer()).save_pretrained(reward_dir)
    make_tokenizer().save_pretrained(reward_dir)
    argv = [
        "--model_name_or_path", str(tmp_path / "model"), "--dtype", "float32",
        "--dataset_name", "tiny", "--reward_model_name_or_path", str(reward_dir),
        "--reward_funcs", "reward_len", "--output_dir", str(tmp_path / "run"),
        "--learning_rate", "1e-2", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.5",
        "--max_completion_length", "8", "--per_device_train_batch_size", "4",
        "--num_generations", "2", "--max_steps", "2", "--logging_steps", "1",
        "--bf16", "false", "--report_to", "none", "--eval_strategy", "steps",
        "--eval_steps", "2", "--per_device_eval_batch_size", "4", "--beta", "0.04",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
        "--lora_target_modules", "q_proj", "v_proj",
    ]  # fmt: skip
    splits = DatasetDict({"train": plain_dataset(), "test": plain_dataset()})
    ns = run_trl_script(
        GRPO_SCRIPT,
        tmp_path,
        ARGV=argv,
        REGISTRY={"reward_len": lambda completions, **kw: [-abs(8 - len(c)) for c in completions]},
        load_dataset=lambda name: splits,
    )
    trainer = ns["trainer"]
    assert "Training completed." in capsys.readouterr().out
    assert trainer.args.lr_scheduler_type == "cosine" and trainer.args.beta == 0.04
    records = logged(ns)
    assert [r["step"] for r in records] == [1, 2]
    assert "eval_reward" in records[-1] and "kl" in records[-1]
    # The reward model's column is named after its folder, the function's after itself.
    assert {"rewards/reward-model/mean", "rewards/<lambda>/mean"} <= set(records[-1])
    # LoRA from ModelConfig; the adapter saved where TRL's script saves the model.
    assert all("lora_" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert (tmp_path / "run" / "adapter_config.json").exists()


# ---- a PEFT model built by the user, with a KL penalty against the base ------------------------
def test_user_built_peft_model_with_kl_to_the_base(tmp_path: Path) -> None:
    script = """
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM
        from trl import GRPOConfig, GRPOTrainer
        base = AutoModelForCausalLM.from_pretrained(MODEL)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
        model.print_trainable_parameters()
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_len,
            args=GRPOConfig(output_dir=OUTPUT, beta=0.04, learning_rate=5e-2, TINY),
            train_dataset=make_dataset(),
        )
        trainer.train()
        trainer.save_model(OUTPUT + "/adapter")
        reloaded = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(MODEL), OUTPUT + "/adapter"
        )
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_len=lambda completions, **kw: [-abs(8 - len(c)) for c in completions],
    )
    records = logged(ns)
    # The reference is the base model (the adapter disabled): the policy equals it before the
    # first update, so the first step's KL is 0 (up to rounding), and training moves it away.
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert records[-1]["kl"] > 0
    trained, reloaded = ns["trainer"].model, ns["reloaded"]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(trained.eval()(ids).logits, reloaded.eval()(ids).logits, atol=1e-5)


# ---- a reward-model instance with its tokenizer, next to a function, weighted -------------------
def test_reward_model_instance_with_its_tokenizer_and_weights(tmp_path: Path) -> None:
    reward_dir = tmp_path / "reward-model"
    make_reward_model(make_tokenizer()).save_pretrained(reward_dir)
    make_tokenizer().save_pretrained(reward_dir)
    script = """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from trl import GRPOConfig, GRPOTrainer
        reward_model = AutoModelForSequenceClassification.from_pretrained(
            REWARD_MODEL, num_labels=1
        )
        reward_tokenizer = AutoTokenizer.from_pretrained(REWARD_MODEL)
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=[reward_model, reward_len],
            reward_processing_classes=[reward_tokenizer, None],
            args=GRPOConfig(output_dir=OUTPUT, reward_weights=[1.0, 0.1], TINY),
            train_dataset=make_dataset(),
        )
        trainer.train()
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=chat_dataset,
        REWARD_MODEL=str(reward_dir),
        reward_len=lambda completions, **kw: [-abs(8 - len(c[0]["content"])) for c in completions],
    )
    for record in logged(ns):
        # TRL names a reward-model instance by its config's name_or_path (last part).
        model_mean = record["rewards/reward-model/mean"]
        assert record["reward"] == pytest.approx(
            model_mean + 0.1 * record["rewards/<lambda>/mean"], rel=1e-5, abs=1e-6
        )


# ---- conversational data with a system prompt and a solution column (TRL's docs) ----------------
def test_system_prompt_conversations_with_a_solution_column(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    script = r"""
        import re
        from trl import GRPOConfig, GRPOTrainer
        SYSTEM_PROMPT = (
            "A conversation between User and Assistant. The assistant first thinks about the "
            "reasoning process and then provides the answer, in <think> </think> and "
            "<answer> </answer> tags."
        )
        def make_conversation(example):
            return {
                "prompt": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": example["problem"]},
                ],
            }
        dataset = make_dataset().map(make_conversation).remove_columns(["problem"])

        def format_reward(completions, **kwargs):
            pattern = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
            contents = [completion[0]["content"] for completion in completions]
            return [1.0 if re.match(pattern, c, re.DOTALL) else 0.0 for c in contents]

        def accuracy_reward(completions, solution, prompts, **kwargs):
            rewards = []
            for completion, sol, prompt in zip(completions, solution, prompts):
                record(prompt[-1]["content"], sol)
                rewards.append(1.0 if sol in completion[0]["content"] else 0.0)
            return rewards

        training_args = GRPOConfig(output_dir=OUTPUT, log_completions=True, TINY)
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=[format_reward, accuracy_reward],
            args=training_args,
            train_dataset=dataset,
        )
        trainer.train()
        """
    problems = Dataset.from_list(
        [{"problem": f"{a} + {a}?", "solution": str(2 * a)} for a in range(1, 5)]
    )
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=lambda: problems,
        record=lambda problem, solution: seen.append((problem, solution)),
    )
    # Each reward call got the solution of its own row's problem (columns stay aligned).
    assert seen and all(int(p.split()[0]) * 2 == int(s) for p, s in seen)
    rows = [
        json.loads(line)
        for line in (Path(ns["OUTPUT"]) / "completions.jsonl").read_text().splitlines()
    ]
    assert rows and all(
        r["prompt"][0] == {"role": "system", "content": ns["SYSTEM_PROMPT"]} for r in rows
    )
    assert set(rows[0]["rewards"]) == {"format_reward", "accuracy_reward"}


# ---- evaluation every step, the best checkpoint loaded at the end, early stopping ---------------
def test_eval_steps_load_best_model_at_end_and_early_stopping(tmp_path: Path) -> None:
    script = """
        from transformers import EarlyStoppingCallback
        from trl import GRPOConfig, GRPOTrainer
        training_args = GRPOConfig(
            output_dir=OUTPUT, eval_strategy="steps", eval_steps=1, save_strategy="steps",
            save_steps=1, load_best_model_at_end=True, metric_for_best_model="eval_reward",
            greater_is_better=True, save_total_limit=1, per_device_eval_batch_size=4,
            learning_rate=5e-2, seed=1, max_completion_length=8, per_device_train_batch_size=4,
            num_generations=2, max_steps=6, logging_steps=1, bf16=False,
        )
        trainer = GRPOTrainer(
            model=MODEL,
            reward_funcs=reward_len,
            args=training_args,
            train_dataset=make_dataset(),
            eval_dataset=make_dataset(),
            callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],
        )
        trainer.train()
        final_metrics = trainer.evaluate()
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_len=lambda completions, **kw: [-abs(8 - len(c)) for c in completions],
    )
    trainer, state = ns["trainer"], ns["trainer"].state
    evals = {r["step"]: r["eval_reward"] for r in logged(ns) if "eval_reward" in r}
    # Early stopping as transformers' callback means it: stop at the 2nd evaluation in a row
    # that does not beat the best so far (else run to max_steps).
    best, misses, stop = -math.inf, 0, 6
    for step in sorted(evals):
        best, misses = (evals[step], 0) if evals[step] > best else (best, misses + 1)
        if misses == 2:
            stop = step
            break
    assert state.global_step == stop == max(evals)
    best_step = min(s for s in evals if evals[s] == best)  # the first of equal bests
    assert state.best_global_step == best_step and state.best_metric == best
    assert state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    # save_total_limit=1 keeps the best checkpoint besides the newest, as transformers does.
    kept = sorted(int(p.name.split("-")[1]) for p in Path(ns["OUTPUT"]).glob("checkpoint-*"))
    assert kept == sorted({best_step, stop})
    # The model at the end is the best checkpoint's, and evaluate() reports on it.
    saved = load_file(str(Path(state.best_model_checkpoint) / "model.safetensors"))
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    assert (
        set(ns["final_metrics"]) >= {"eval_reward", "eval_loss"}
        or "eval_reward" in ns["final_metrics"]
    )


# ---- the script shape of open-r1's grpo.py: the TrainingArguments helpers around training -------
def test_training_arguments_helpers_metrics_state_and_model_card(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = """
        import logging
        import os
        import datasets
        import transformers
        from transformers import set_seed
        from transformers.trainer_utils import get_last_checkpoint
        from trl import GRPOConfig, GRPOTrainer
        logger = logging.getLogger(__name__)
        training_args = GRPOConfig(
            output_dir=OUTPUT, save_strategy="steps", save_steps=1, log_level="info",
            do_eval=True, TINY,
        )
        set_seed(training_args.seed)
        log_level = training_args.get_process_log_level()
        logger.setLevel(log_level)
        datasets.utils.logging.set_verbosity(log_level)
        transformers.utils.logging.set_verbosity(log_level)
        logger.warning(
            f"Process rank: {training_args.local_rank}, device: {training_args.device}, "
            f"n_gpu: {training_args.n_gpu}, distributed training: "
            f"{bool(training_args.local_rank != -1)}, 16-bits training: {training_args.fp16}"
        )
        last_checkpoint = None
        if os.path.isdir(training_args.output_dir):
            last_checkpoint = get_last_checkpoint(training_args.output_dir)
        with training_args.main_process_first(desc="dataset map"):
            dataset = make_dataset().map(lambda row: {"prompt": row["prompt"] + ":"})
        trainer = GRPOTrainer(
            model=MODEL, reward_funcs=reward_len, args=training_args,
            train_dataset=dataset, eval_dataset=dataset,
        )
        checkpoint = training_args.resume_from_checkpoint or last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        metrics = train_result.metrics
        metrics["train_samples"] = len(dataset)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        trainer.save_model(training_args.output_dir)
        if trainer.accelerator.is_main_process:
            trainer.create_model_card(dataset_name="tiny-prompts", tags=["open-r1"])
            trainer.model.config.use_cache = True
            trainer.model.config.save_pretrained(training_args.output_dir)
        if training_args.do_eval:
            metrics = trainer.evaluate()
            metrics["eval_samples"] = len(dataset)
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
        """
    ns = run_trl_script(
        script,
        tmp_path,
        make_dataset=plain_dataset,
        reward_len=lambda completions, **kw: [-abs(8 - len(c)) for c in completions],
    )
    out = Path(ns["OUTPUT"])
    assert ns["training_args"].get_process_log_level() == logging.INFO
    assert (ns["training_args"].world_size, ns["training_args"].n_gpu) == (1, 0)
    # train() returns transformers' TrainOutput: the mean loss of the steps, and their metrics.
    result, records = ns["train_result"], logged(ns)
    assert result.global_step == 2
    assert result.training_loss == pytest.approx(sum(r["loss"] for r in records) / 2, abs=1e-7)
    assert result.metrics["train_loss"] == result.training_loss
    assert result.metrics["train_steps_per_second"] > 0
    train_results = json.loads((out / "train_results.json").read_text())
    assert train_results["train_samples"] == 4 and train_results["epoch"] == result.metrics["epoch"]
    everything = json.loads((out / "all_results.json").read_text())
    assert "eval_reward" in everything and "train_runtime" in everything
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert "***** train metrics *****" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "tiny-prompts" in card and '"open-r1"' in card and "GRPO" in card
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
