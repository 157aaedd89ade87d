"""Running a run config: training, evaluation and the run's output folder."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

from grpokit.app.run_config import (
    RUN_ARTIFACTS,
    RunSpec,
    check_accuracy_reward,
    load_chat_template,
    resolve_rewards,
    write_config,
)
from grpokit.errors import ConfigError, OutputError, output_errors
from grpokit.train.fields import closest_names

logger = logging.getLogger("grpokit")


# =================================================================================================
# Commands
# =================================================================================================
def _load_everything(spec: RunSpec) -> tuple[Any, Any, Any, list[Any]]:
    """Task, rewards (task defaults if none were given), model and tokenizer, in that order."""
    task, rewards = _load_task(spec)
    model, tokenizer = _load_model(spec)
    return task, model, tokenizer, rewards


def _load_task(spec: RunSpec) -> tuple[Any, list[Any]]:
    """The task and the rewards (the task's defaults if none were given), both checked."""
    from grpokit.data.tasks import load_task

    try:
        task = load_task(dict(spec.run.task))
    except (ValueError, ImportError, FileNotFoundError) as error:
        raise ConfigError(f"task: {error}") from error
    if spec.rewards is None:
        spec.rewards = resolve_rewards(task.default_rewards, spec.training_values)
    check_accuracy_reward(spec.eval, spec.rewards)
    return task, spec.rewards


def _load_model(spec: RunSpec) -> tuple[Any, Any]:
    from grpokit.engines.models import load_causal_lm
    from grpokit.train.build import check_generation_server

    check_generation_server(spec.training)  # a vLLM server that does not answer: before loading
    try:
        model, tokenizer = load_causal_lm(
            spec.run.model, trust_remote_code=spec.training.trust_remote_code
        )
    except OSError as error:  # missing folder or file, an id not in the local cache, no access
        raise ConfigError(f"model {spec.run.model!r}: {error}") from error
    if spec.run.chat_template is not None:
        tokenizer.chat_template = load_chat_template(spec.run.chat_template)
    return model, tokenizer


def lora_config(lora: dict[str, Any] | None) -> Any:
    """The `peft.LoraConfig` of the run's `lora` section, checked before any model is loaded.

    Returns:
        A `LoraConfig` with `task_type="CAUSAL_LM"`, or None without a `lora` section.

    Raises:
        ConfigError: a key `LoraConfig` does not have (with the closest one), another
            `task_type`, or a value `LoraConfig` rejects.
    """
    if lora is None:
        return None
    from peft import LoraConfig

    fields = [f.name for f in dataclasses.fields(LoraConfig) if f.init]
    for key in lora:
        if key not in fields:
            close = closest_names(key, fields)
            hint = f"did you mean `{close[0]}`? " if close else ""
            raise ConfigError(
                f"lora: unknown key `{key}` ({hint}the keys are peft.LoraConfig's fields: r, "
                "lora_alpha, lora_dropout, target_modules, ...)."
            )
    if lora.get("task_type", "CAUSAL_LM") != "CAUSAL_LM":
        raise ConfigError(
            f"lora.task_type must be CAUSAL_LM (or left out), got {lora['task_type']!r}."
        )
    try:
        return LoraConfig(**{**lora, "task_type": "CAUSAL_LM"})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"lora: {error}") from error


def check_lora_targets(model: Any, peft_config: Any) -> None:
    """Every name in `lora.target_modules` (a list) must match a module of the loaded model.

    PEFT matches a name against the end of module paths (`q_proj` matches
    `model.layers.0.self_attn.q_proj`) and raises only when no name matches at all, so a misspelt
    name beside a correct one would otherwise be dropped without a word.

    Raises:
        ConfigError: naming the unmatched entries and the model's linear layer names.
    """
    targets = getattr(peft_config, "target_modules", None)
    if peft_config is None or not isinstance(targets, set | list | tuple):
        return  # None (PEFT's default for the architecture), a regex, or "all-linear"
    names = [name for name, _ in model.named_modules()]
    missing = sorted(t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names))
    if missing:
        import torch

        linear = sorted(
            {
                n.rpartition(".")[2]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ConfigError(
            f"lora.target_modules: {missing} match no module of {type(model).__name__}; its "
            f"linear layers are named {linear}."
        )


def run_eval(
    spec: RunSpec,
    model: Any,
    tokenizer: Any,
    task: Any,
    rewards: list[Any],
    *,
    engine: Any = None,
    tools: tuple[Any, Any] | None = None,
) -> dict[str, float]:
    """Evaluate `model` on the task's held-out split with the `eval` section's settings.

    Sampling uses `engine` when given (a trainer's engine), else the engine the `training`
    section asks for (`VLLMEngine` with `use_vllm`, see `train.build.make_generation_engine`).
    Prompts follow the `training` section's `max_prompt_length` / `prompt_length_policy`.
    With the run's tools (or environments), rollouts are multi-turn as in training: `tools` is
    a trainer's `(tool_calling, environment_pool)`, else they are built from the spec.
    """
    from grpokit.app.evaluation import evaluate
    from grpokit.engines.base import SamplingParams
    from grpokit.train.build import make_generation_engine, make_tool_calling, resolve_precision

    if task.eval_dataset is None or len(task.eval_dataset) == 0:
        raise ConfigError("task: has no held-out split to evaluate on; set task.eval_size > 0.")
    cfg, training = spec.eval, spec.training
    data = task.eval_dataset
    if cfg.num_prompts is not None:
        data = data.select(range(min(cfg.num_prompts, len(data))))
    max_new_tokens = cfg.max_completion_length or training.max_completion_length
    if engine is None:
        engine = make_generation_engine(model, tokenizer, training, max_new_tokens=max_new_tokens)
    if tools is None:
        tools = make_tool_calling(spec.tools, spec.environment_factory, tokenizer, training)
    tool_calling, environments = tools
    if environments is not None and environments.has_reward:
        rewards = [*rewards, environments.reward_function()]
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
        tool_calling=tool_calling,
        environments=environments,
    )


def _log_eval(output_dir: Path, when: str, step: int, metrics: dict[str, float]) -> None:
    with (output_dir / "eval.jsonl").open("a") as f:
        f.write(json.dumps({"when": when, "step": step, **metrics}) + "\n")
    names = ("accuracy", "reward", "completion_length", "tools/call_rate")
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in names if k in metrics)
    print(f"[grpokit] held-out eval {when} (step {step}): {shown}", flush=True)


def check_output_dir(output_dir: Path, min_free_gb: float | None) -> None:
    """Create `output_dir`, write and delete a probe file in it, and check its disk's free space.

    Raises:
        OutputError: the folder cannot be created or written (with the reason), or its disk has
            less than `min_free_gb` GB free (with both numbers; None = no fixed minimum).
    """
    probe = output_dir / f".grpokit-write-test-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"grpokit write test\n")
        probe.unlink()
    except OSError as error:
        raise OutputError(
            f"training.output_dir {str(output_dir)!r} cannot be written "
            f"({error.strerror or error}); make it writable or set another --output_dir."
        ) from error
    free = shutil.disk_usage(output_dir).free
    if min_free_gb is not None and free < min_free_gb * 1e9:
        raise OutputError(
            f"training.output_dir {str(output_dir)!r}: {free / 1e9:.2f} GB free on its disk, below "
            f"min_free_disk_gb={min_free_gb:g}; free some space, set another --output_dir, or "
            "lower --min_free_disk_gb."
        )


def checkpoints_on_disk(args: Any) -> int:
    """The most checkpoints a run holds on disk at once: none without saving; with
    `save_strategy="steps"` and a known `max_steps`, one per `save_steps` interval (a fraction
    below 1 is that share of `max_steps`, as transformers reads it); otherwise at least one.
    `save_total_limit` caps it at the limit plus the new checkpoint, which is written before the
    oldest is deleted."""
    if args.save_strategy == "no":
        return 0
    count = 1
    max_steps = getattr(args, "max_steps", -1) or -1
    save_steps = getattr(args, "save_steps", None)
    if args.save_strategy == "steps" and max_steps > 0 and save_steps:
        interval = save_steps if save_steps >= 1 else math.ceil(save_steps * max_steps)
        count = max(1, int(max_steps // interval))
    limit = getattr(args, "save_total_limit", None)
    return count if limit is None else min(count, limit + 1)


def check_space_for_the_run(trainer: Any, output_dir: Path, min_free_gb: float | None) -> None:
    """Check that the disk of `output_dir` can hold the run's checkpoints (`checkpoints_on_disk`)
    plus the final model.

    Sizes assume float32: 4 bytes per saved weight (the adapter under LoRA), 8 per trainable
    weight for AdamW's two moments, 4 per weight for a synced reference model.

    Args:
        trainer: The run's `GRPOTrainer` (its model loaded).
        output_dir: The run's folder.
        min_free_gb: `min_free_disk_gb`: None = too little room is an error; a number (already
            checked before the model loaded) = only a warning.

    Raises:
        OutputError: `min_free_gb` is None and the disk has less room than the estimate.
    """
    params = list(trainer.model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    saved = trainable if trainer.is_peft else sum(p.numel() for p in params)
    checkpoint = 4 * saved + 8 * trainable
    if trainer.args.sync_ref_model:
        checkpoint += 4 * saved
    kept = checkpoints_on_disk(trainer.args)
    need = 4 * saved + kept * checkpoint
    free = shutil.disk_usage(output_dir).free
    if free >= need:
        return
    sizes = (
        f"training.output_dir {output_dir}: {_size(free)} free, but a checkpoint of this model "
        f"takes about {_size(checkpoint)} ({kept} on disk at once with these save settings) "
        f"and the final model {_size(4 * saved)}"
    )
    if min_free_gb is None:
        raise OutputError(
            f"{sizes}; free some space, keep fewer checkpoints (--save_total_limit, "
            "--save_steps), set --save_strategy no or another --output_dir, or "
            "--min_free_disk_gb 0 to start anyway."
        )
    logger.warning(
        "%s; the run may stop when it saves (free space, or set --save_strategy no / another "
        "--output_dir).",
        sizes,
    )


def _size(num_bytes: float) -> str:
    """A disk size for a message: GB with two decimals, MB below 0.1 GB."""
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


def _prepare_output_dir(output_dir: Path, resume: bool | str, overwrite: bool) -> None:
    from grpokit.train import build
    from grpokit.train.checkpoint import list_checkpoints

    existing = list_checkpoints(output_dir)
    if resume is True and not existing:
        raise ConfigError(
            f"--resume: training.output_dir {str(output_dir)!r} holds no checkpoint to resume; "
            "start without --resume, or set --output_dir to the run to continue."
        )
    if existing and not resume and not overwrite:
        raise ConfigError(
            f"training.output_dir {str(output_dir)!r} already holds a run ({existing[-1].name}); "
            "pass --resume to continue it, --overwrite to start again, or set another "
            "--output_dir."
        )
    if overwrite and not resume:
        build.remove_checkpoints(output_dir, say=lambda line: print(f"[grpokit] {line}"))
        for name in RUN_ARTIFACTS:
            (output_dir / name).unlink(missing_ok=True)


def _resume_checkpoint(spec: RunSpec, resume: bool | str, model: Any, policy: str) -> Path | None:
    """The verified checkpoint `--resume` continues from, after checking that the run config
    (and `model`, when given) does not change its optimisation, per `policy`; before
    config.yaml is rewritten."""
    from grpokit.train import build
    from grpokit.train.checkpoint import CheckpointError

    try:
        path = build.find_checkpoint(resume, spec.training.output_dir)
        if path is not None:
            build.check_resume_config(path, spec.training, model, policy=policy)
    except (CheckpointError, FileNotFoundError) as error:
        raise ConfigError(f"--resume: {error}") from error
    return path


def run_training(
    spec: RunSpec,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    apply_config_changes: bool = False,
) -> dict[str, Any]:
    """Train as the spec says: eval before, GRPO, save the model, eval after, plot.

    Everything that can be checked without the model (LoRA keys, task, rewards, the evaluation's
    accuracy reward, the output folder and its free space, the checkpoint to resume and whether
    the config changes its optimisation) is checked before the model loads; what needs the model
    (LoRA target modules, the model resumed, room for a prompt in its context) right after it
    loads and when the trainer is built, before any evaluation or training.

    Args:
        spec: the run config.
        resume: True = continue from the newest valid checkpoint in output_dir; a path = from that
            checkpoint; False = a fresh run.
        overwrite: a fresh run may delete an earlier run's checkpoints in output_dir (each named).
        apply_config_changes: on resume, apply config changes that alter the optimisation
            (`resume_config_changes="apply"` for this run only; not written to config.yaml).

    `resume` is `--resume` (True: the latest checkpoint) or a checkpoint path; when it is not
    given, the training section's `resume_from_checkpoint` (TRL scripts' field) is used.

    Returns:
        `{"before": metrics | None, "after": metrics | None, "model_dir": str, "plot": str | None}`.

    Raises:
        UserError: a config, data or output-folder problem (`grpokit.errors`), including a write
            that fails on a full disk or for lack of permission.
    """
    output_dir = Path(spec.training.output_dir)
    resume = resume or spec.training.resume_from_checkpoint or False  # TRL scripts' field
    with output_errors(output_dir):
        return _train(
            spec,
            output_dir,
            resume=resume,
            overwrite=overwrite or spec.training.overwrite_output_dir,
            apply_config_changes=apply_config_changes,
        )


def _train(
    spec: RunSpec,
    output_dir: Path,
    *,
    resume: bool | str,
    overwrite: bool,
    apply_config_changes: bool,
) -> dict[str, Any]:
    from grpokit.train.distributed import launched_process_index

    # Under torchrun / accelerate launch every process trains; only the main one writes files
    # and runs the held-out evaluations (the others wait in the trainer's first collective).
    main = launched_process_index() == 0
    peft_config = lora_config(spec.run.lora)
    task, rewards = _load_task(spec)
    if main:
        _prepare_output_dir(output_dir, resume, overwrite)
    policy = "apply" if apply_config_changes else spec.training.resume_config_changes
    checkpoint = _resume_checkpoint(spec, resume, None, policy) if resume else None
    if main:
        check_output_dir(output_dir, spec.run.min_free_disk_gb)
    model, tokenizer = _load_model(spec)
    check_lora_targets(model, peft_config)
    if checkpoint is not None:
        _resume_checkpoint(spec, str(checkpoint), model, policy)
    if main:
        write_config(spec, output_dir / "config.yaml")
    if apply_config_changes:
        spec.training.resume_config_changes = "apply"
    if main:
        print(f"[grpokit] run config written to {output_dir / 'config.yaml'}", flush=True)

    from grpokit.train.trainer import GRPOTrainer

    result: dict[str, Any] = {"before": None, "after": None, "plot": None}
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=rewards,
        args=spec.training,
        train_dataset=task.train_dataset,
        eval_dataset=task.eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        tools=spec.tools,
        environment_factory=spec.environment_factory,
    )
    tools = (trainer.tool_calling, trainer.environment_pool)
    if main:
        check_space_for_the_run(trainer, output_dir, spec.run.min_free_disk_gb)
    # Held-out evaluation samples with the trainer's own engine (vLLM with use_vllm), which
    # follows the policy's weights after every optimizer step.
    if spec.eval.before and not resume and main:
        result["before"] = run_eval(
            spec, trainer.model, tokenizer, task, rewards, engine=trainer.engine, tools=tools
        )
        _log_eval(output_dir, "before", 0, result["before"])
    trained = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    result["model_dir"] = str(output_dir / "final_model")
    # every process calls it; the main one writes it whole or not at all (a crash leaves the
    # previous final_model or none)
    trainer.save_model(result["model_dir"], atomic=True)
    if not main:
        # The evaluations after training run on the main process alone (no collective), so
        # the others leave the process group now: a process that exits with its group (and
        # DeepSpeed's communication threads) still alive can abort at interpreter exit.
        trainer.end()
        return result
    print(f"[grpokit] trained model saved to {result['model_dir']}", flush=True)
    if spec.eval.after:
        result["after"] = run_eval(
            spec, trainer.model, tokenizer, task, rewards, engine=trainer.engine, tools=tools
        )
        _log_eval(output_dir, "after", trained.global_step, result["after"])
    if spec.run.plot:
        from grpokit.app.plotting import plot_run

        accuracy_name = spec.eval.accuracy_reward or rewards[0].name
        result["plot"] = str(plot_run(output_dir, accuracy_reward=accuracy_name))
        print(f"[grpokit] curves written to {result['plot']}", flush=True)
    trainer.end()
    return result
