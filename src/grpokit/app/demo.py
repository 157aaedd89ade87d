"""`grpokit demo`: GRPO visibly improving SmolLM2-135M-Instruct on a CPU in minutes.

The demo is an ordinary run config (`DEMO_CONFIG`), so every field can be overridden on the
command line (`grpokit demo --seed 1 --output_dir runs/demo-seed1`) and the run it leaves behind
restarts with `grpokit train runs/demo/config.yaml --resume`. It evaluates greedy held-out
accuracy before and after training (50 steps; 30 without native bf16); the held-out prompts
depend only on the task seed, so the "before" figure is the same for every training seed.
Re-score a trained model with
`grpokit eval --model runs/demo-S/final_model`. Run time and accuracies per seed are in the
README ("The main job").

The settings follow the CPU found (`demo_config`): with native bf16 (`avx512_bf16`/`amx_bf16` not
capped by `ONEDNN_MAX_CPU_ISA`/`ATEN_CPU_CAPABILITY`, or a CUDA GPU) the config below as is;
without it (e.g. AVX2/FMA only) every matmul runs in fp32, several times slower, so the demo
trains a LoRA adapter on half the completions per step at a higher learning rate, for fewer
steps, and evaluates on fewer held-out prompts (`FP32_SETTINGS`; measured gain and time in the
README); on a single core it also halves the batch. It prints what it chose and why;
command-line overrides still win.

Why this setup: SmolLM2-135M-Instruct does not write `<answer>` tags, so tag rewards stay 0 and
give GRPO no signal, while a plain "Answer with just the number." prompt scored by the last
number of the reply starts above zero and is learnable.
"""

from __future__ import annotations

import json
import os
from typing import Any

DEMO_TEMPLATE = "{prompt}\nAnswer with just the number."
"""Prompt template: the question, then the answer format (the reward reads the last number)."""

DEMO_CONFIG: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "task": {
        "kind": "reasoning_gym",
        "name": "chain_sum",
        "size": 2000,
        "seed": 0,
        "eval_size": 200,
        "config": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
        "template": DEMO_TEMPLATE,
    },
    "rewards": [{"name": "reasoning_gym_score", "extract": "last_number"}],
    "training": {
        "output_dir": "runs/demo",
        "max_steps": 50,
        "learning_rate": 1.0e-5,
        "num_generations": 8,
        "per_device_train_batch_size": 32,
        "max_completion_length": 32,
        "temperature": 0.7,
        "loss_type": "dapo",
        "beta": 0.0,
        "logging_steps": 1,
        # Each checkpoint (1.6 GB) stalled a 4-minute run about 10 s on a 2-core VM (2.5-9.4 s
        # saved alone); Ctrl-C saves one at the last step anyway (bench/RESULTS.md).
        "save_steps": 25,
        "save_total_limit": 1,
        "seed": 0,
    },
    "eval": {"num_prompts": 200, "batch_size": 64},
}
"""The demo's run config (same layout as the YAML files in examples/)."""

DEMO_DESCRIPTION = (
    "GRPO on SmolLM2-135M-Instruct (built in, no download) for two-number sums from "
    "reasoning-gym's chain_sum (prompt: 'Answer with just the number.'; the reward is "
    "reasoning-gym's verifier on the last number of the reply). Evaluates held-out accuracy "
    "(greedy; 200 prompts, 100 without native bf16) before and after training, saves the "
    "trained model to <output_dir>/final_model and writes <output_dir>/curves.png (run time "
    "and results: README). "
    "Every field below can be overridden, e.g. `grpokit demo --seed 1 "
    "--output_dir runs/demo-seed1`."
)


LORA_LEARNING_RATE = 2.0e-4
"""LoRA's learning rate without native bf16: 20x the full fine-tuning one. LoRA usually wants about
10x (Schulman et al., "LoRA Without Regret", Thinking Machines 2025); the other 2x makes up for
the half batch (`FP32_SETTINGS`) and the fewer steps (both settings compared in the README)."""

FP32_SETTINGS: dict[str, dict[str, Any]] = {
    "training": {
        "learning_rate": LORA_LEARNING_RATE,
        "max_steps": 30,
        "per_device_train_batch_size": 16,
    },
    "eval": {"num_prompts": 100},
}
"""Changes to `DEMO_CONFIG` on a device without native bf16 (besides the `lora` section): 30 steps
of 2 prompts x 8 completions instead of 50 of 4 x 8 (training and most of generation cost in
proportion to the completions), 100 held-out prompts instead of 200."""

DEMO_LORA: dict[str, Any] = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
"""The LoRA adapter trained without native bf16: every linear layer, rank 16."""


def demo_config(
    native_bf16: bool | None = None, cores: int | None = None, bf16_reason: str | None = None
) -> tuple[dict[str, Any], str]:
    """The demo's run config for this machine, and a sentence saying what was chosen and why.

    Args:
        native_bf16: Whether the device computes bf16 natively; None = detect
            (`grpokit.engines.device.DeviceTraits.native_bf16` of the default device: a CUDA GPU
            with native bf16, or a CPU with `avx512_bf16`/`amx_bf16` whose ISA is not capped
            below it by `ONEDNN_MAX_CPU_ISA` or `ATEN_CPU_CAPABILITY`).
        cores: CPU cores; None = `os.cpu_count()`.
        bf16_reason: What the verdict rests on, printed in brackets (e.g. "avx512_bf16 capped by
            ONEDNN_MAX_CPU_ISA=AVX2"); None = detected with the verdict, or nothing when
            `native_bf16` is given.

    Returns:
        A new config dict (`DEMO_CONFIG` with the changes applied) and the reason to print.
    """
    if native_bf16 is None:
        from grpokit.engines.device import device_traits

        traits = device_traits()
        native_bf16 = traits.native_bf16
        if bf16_reason is None:
            bf16_reason = traits.bf16_reason
    cores = cores if cores is not None else (os.cpu_count() or 1)
    config = json.loads(json.dumps(DEMO_CONFIG))  # deep copy
    found = f"{cores} core{'s' if cores != 1 else ''}, " + (
        "native bf16" if native_bf16 else "no native bf16"
    )
    if bf16_reason:
        found += f" ({bf16_reason})"
    changes = []
    if not native_bf16:
        config["lora"] = dict(DEMO_LORA)
        for section, values in FP32_SETTINGS.items():
            config[section].update(values)
        training = FP32_SETTINGS["training"]
        batch, group = (
            training["per_device_train_batch_size"],
            config["training"]["num_generations"],
        )
        changes += [
            f"LoRA r={DEMO_LORA['r']} on all linear layers",
            f"learning_rate {LORA_LEARNING_RATE:g}",
            f"max_steps {training['max_steps']}",
            f"batch {batch} completions ({batch // group} prompts x {group})",
            f"{FP32_SETTINGS['eval']['num_prompts']} held-out prompts",
        ]
    if cores < 2:
        config["training"]["per_device_train_batch_size"] //= 2
        changes.append(f"batch {config['training']['per_device_train_batch_size']} completions")
    if not changes:
        return config, f"demo settings: {found}: the standard settings."
    why = []
    if not native_bf16:
        why.append(
            "every matmul runs in fp32, several times slower than native bf16; a LoRA adapter "
            "(no weight gradients or AdamW state for the base model) on half the completions "
            "per step, for fewer steps, at a 20x learning rate, with a shorter evaluation, "
            "keeps the demo to a few minutes with about the held-out gain of the standard "
            "settings (README)"
        )
    if cores < 2:
        why.append("one core: half the completions per step")
    reason = (
        f"demo settings: {found}: " + ", ".join(changes) + " (" + "; ".join(why) + "). "
        "Command-line overrides still apply."
    )
    return config, reason


def run_demo(overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Run the demo config with command-line overrides and print held-out accuracy before/after.

    An earlier run in the demo's output_dir is replaced (the demo is meant to be run again).

    Returns:
        What `grpokit.app.run.run_training` returns.
    """
    from grpokit.app.run import run_training
    from grpokit.app.run_config import build_config

    config, reason = demo_config()
    print(reason, flush=True)
    spec = build_config(config, overrides)
    result = run_training(spec, overwrite=True)
    before, after = result["before"], result["after"]
    if before is not None and after is not None:
        print(
            f"\nheld-out accuracy ({int(after['num_prompts'])} prompts, greedy): "
            f"before {before['accuracy']:.3f} -> after {after['accuracy']:.3f}",
            flush=True,
        )
    print(f"model: {result['model_dir']}\nplot:  {result['plot']}", flush=True)
    return result
