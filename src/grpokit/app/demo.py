"""`grpokit demo`: GRPO visibly improving SmolLM2-135M-Instruct on a CPU in minutes.

The demo is an ordinary run config (`DEMO_CONFIG`), so every field can be overridden on the
command line (`grpokit demo --seed 1 --output_dir runs/demo-seed1`) and the run it leaves behind
restarts with `grpokit train runs/demo/config.yaml --resume`. It evaluates greedy held-out
accuracy before and after 50 steps; the held-out prompts depend only on the task seed, so the
"before" figure is the same for every training seed. Re-score a trained model with
`grpokit eval --model runs/demo-S/final_model`. Run time and accuracies per seed are in the
README ("The main job").

Why this setup: SmolLM2-135M-Instruct does not write `<answer>` tags, so tag rewards stay 0 and
give GRPO no signal, while a plain "Answer with just the number." prompt scored by the last
number of the reply starts above zero and is learnable.
"""

from __future__ import annotations

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
        "save_steps": 10,
        "seed": 0,
    },
    "eval": {"num_prompts": 200, "batch_size": 64},
}
"""The demo's run config (same layout as the YAML files in examples/)."""

DEMO_DESCRIPTION = (
    "GRPO on SmolLM2-135M-Instruct (built in, no download) for two-number sums from "
    "reasoning-gym's chain_sum (prompt: 'Answer with just the number.'; the reward is "
    "reasoning-gym's verifier on the last number of the reply). Evaluates held-out accuracy "
    "(greedy, 200 prompts) before and after training, saves the trained model to "
    "<output_dir>/final_model and writes <output_dir>/curves.png (run time and results: README). "
    "Every field below can be overridden, e.g. `grpokit demo --seed 1 "
    "--output_dir runs/demo-seed1`."
)


def run_demo(overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    """Run the demo config with command-line overrides and print held-out accuracy before/after.

    An earlier run in the demo's output_dir is replaced (the demo is meant to be run again).

    Returns:
        What `grpokit.app.run.run_training` returns.
    """
    from grpokit.app.run import run_training
    from grpokit.app.run_config import build_config

    spec = build_config(DEMO_CONFIG, overrides)
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
