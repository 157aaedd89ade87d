"""Running a run config: training, evaluation and the run's output folder."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from grpokit.app.run_config import (
    RUN_ARTIFACTS,
    ConfigError,
    RunSpec,
    resolve_rewards,
    write_config,
)

logger = logging.getLogger("grpokit")


# =================================================================================================
# Commands
# =================================================================================================
def _load_everything(spec: RunSpec) -> tuple[Any, Any, Any, list[Any]]:
    """Task, rewards (task defaults if none were given), model and tokenizer, in that order."""
    from grpokit.data.tasks import load_task
    from grpokit.engines.models import load_causal_lm

    try:
        task = load_task(dict(spec.run.task))
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise ConfigError(f"task: {error}") from error
    if spec.rewards is None:
        spec.rewards = resolve_rewards(task.default_rewards, spec.training_values)
    model, tokenizer = load_causal_lm(spec.run.model)
    return task, model, tokenizer, spec.rewards


def run_eval(
    spec: RunSpec,
    model: Any,
    tokenizer: Any,
    task: Any,
    rewards: list[Any],
    *,
    engine: Any = None,
) -> dict[str, float]:
    """Evaluate `model` on the task's held-out split with the `eval` section's settings.

    Sampling uses `engine` when given (a trainer's engine), else the engine the `training`
    section asks for (`VLLMEngine` with `use_vllm`, see `train.build.make_generation_engine`).
    Prompts follow the `training` section's `max_prompt_length` / `prompt_length_policy`.
    """
    from grpokit.app.evaluation import evaluate
    from grpokit.engines.base import SamplingParams
    from grpokit.train.build import make_generation_engine, resolve_precision

    if task.eval_dataset is None or len(task.eval_dataset) == 0:
        raise ConfigError("task: has no held-out split to evaluate on; set task.eval_size > 0.")
    cfg, training = spec.eval, spec.training
    data = task.eval_dataset
    if cfg.num_prompts is not None:
        data = data.select(range(min(cfg.num_prompts, len(data))))
    max_new_tokens = cfg.max_completion_length or training.max_completion_length
    if engine is None:
        engine = make_generation_engine(model, tokenizer, training, max_new_tokens=max_new_tokens)
    return evaluate(
        model,
        tokenizer,
        data,
        rewards,
        engine=engine,
        num_samples=cfg.num_samples,
        max_completion_length=max_new_tokens,
        sampling=None if cfg.num_samples == 1 else SamplingParams(temperature=cfg.temperature),
        batch_size=cfg.batch_size,
        accuracy_reward=cfg.accuracy_reward,
        accuracy_threshold=cfg.accuracy_threshold,
        reward_weights=training.reward_weights,
        chat_template_kwargs=training.chat_template_kwargs,
        max_prompt_length=training.max_prompt_length,
        prompt_length_policy=training.prompt_length_policy,
        seed=cfg.seed,
        bf16=resolve_precision(spec.training, next(model.parameters()).device),
    )


def _log_eval(output_dir: Path, when: str, step: int, metrics: dict[str, float]) -> None:
    with (output_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"when": when, "step": step, **metrics}) + "\n")
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("accuracy", "reward", "completion_length"))
    print(f"[grpokit] held-out eval {when} (step {step}): {shown}", flush=True)


def _prepare_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> None:
    existing = sorted(output_dir.glob("checkpoint-*")) if output_dir.is_dir() else []
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"training.output_dir {str(output_dir)!r} already holds a run ({existing[-1].name}); "
            "pass --resume to continue it, --overwrite to start again, or set another "
            "--output_dir."
        )
    if overwrite and not resume:
        for path in existing:
            shutil.rmtree(path)
        for name in RUN_ARTIFACTS:
            (output_dir / name).unlink(missing_ok=True)


def run_training(
    spec: RunSpec, *, resume: bool | str = False, overwrite: bool = False
) -> dict[str, Any]:
    """Train as the spec says: eval before, GRPO, save the model, eval after, plot.

    Returns:
        `{"before": metrics | None, "after": metrics | None, "model_dir": str, "plot": str | None}`.
    """
    output_dir = Path(spec.training.output_dir)
    _prepare_output_dir(output_dir, resume, overwrite)
    task, model, tokenizer, rewards = _load_everything(spec)
    write_config(spec, output_dir / "config.yaml")
    print(f"[grpokit] run config written to {output_dir / 'config.yaml'}", flush=True)

    from grpokit.train.trainer import GRPOTrainer

    peft_config = None
    if spec.run.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec.run.lora)
    result: dict[str, Any] = {"before": None, "after": None, "plot": None}
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=spec.training,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    # Held-out evaluation samples with the trainer's own engine (vLLM with use_vllm), which
    # follows the policy's weights after every optimizer step.
    if spec.eval.before and not resume:
        result["before"] = run_eval(
            spec, trainer.model, tokenizer, task, rewards, engine=trainer.engine
        )
        _log_eval(output_dir, "before", 0, result["before"])
    state = trainer.train(resume_from_checkpoint=resume or None)
    result["model_dir"] = str(output_dir / "final_model")
    trainer.save_model(result["model_dir"])
    print(f"[grpokit] trained model saved to {result['model_dir']}", flush=True)
    if spec.eval.after:
        result["after"] = run_eval(
            spec, trainer.model, tokenizer, task, rewards, engine=trainer.engine
        )
        _log_eval(output_dir, "after", state.global_step, result["after"])
    if spec.run.plot:
        from grpokit.app.plotting import plot_run

        accuracy_name = spec.eval.accuracy_reward or rewards[0].name
        result["plot"] = str(plot_run(output_dir, accuracy_reward=accuracy_name))
        print(f"[grpokit] curves written to {result['plot']}", flush=True)
    return result
