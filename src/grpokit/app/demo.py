"""`grpokit demo`: GRPO visibly improving SmolLM2-135M-Instruct on a CPU in minutes.

The demo is an ordinary run config (`DEMO_CONFIG`), so every field can be overridden on the
command line (`grpokit demo --seed 1 --output_dir runs/demo-seed1`) and the run it leaves behind
restarts with `grpokit train runs/demo/config.yaml --resume`.

Measured on this project's 2-core CPU machine, otherwise idle, at commit 1bc90ad (grouped
attention, fused log-probs, inverse-CDF sampling, packed sampler weights): `make demo` took 3 min
20 s end to end (a package re-install into the existing .venv, model load, "before" evaluation,
50 steps at about 2-4 s each, "after" evaluation, plot). Held-out accuracy on the 200 held-out
prompts, greedy: 0.100 before training (the same for every seed: the held-out set depends only
on the task seed); after 50 steps, `grpokit demo --seed S --output_dir runs/demo-S` gave 0.385
(S=0), 0.315 (S=1), 0.315 (S=2): mean 0.338, sample standard deviation 0.040. Re-score a trained
model with `grpokit eval --model runs/demo-S/final_model`.

Why this setup: SmolLM2-135M-Instruct never wrote `<answer>` tags in our samples (tag rewards were
always 0, so GRPO had no signal), while a plain "Answer with just the number." prompt scored by the
last number of the reply starts at 9-10% and is learnable.
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
    "<output_dir>/final_model and writes <output_dir>/curves.png. About three to four minutes on "
    "2 idle CPU cores. Every field below can be overridden, e.g. `grpokit demo --seed 1 "
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
