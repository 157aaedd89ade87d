"""What a resumed run may change, and how a change it may not make is refused or applied.

A resumed run continues the optimisation the checkpoint started. Its config is compared with the
checkpoint's `grpo_config.json`: every `GRPOConfig` field is in exactly one of the two sets below
(a test keeps them complete). A changed `RESUME_LOCKED_FIELDS` field, or another model, stops the
resume with one message listing each change, unless `resume_config_changes="apply"`; then the new
values take effect from the resumed step, including the optimizer's hyper-parameters and the
learning-rate schedule (the restored scheduler does not override them).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from grpokit.train.checkpoint import CheckpointError
from grpokit.train.trl_compat import AcceptedAtDefault

logger = logging.getLogger("grpokit")


RESUME_FREE_FIELDS = frozenset(
    {
        # Where results go and how often they are written: never change the weights.
        "output_dir",
        "run_name",
        "report_to",
        "project",
        "trackio_space_id",
        "trackio_bucket_id",
        "trackio_static_space_id",
        "hub_private_repo",
        "push_to_hub",
        "logging_steps",
        "logging_first_step",
        "log_completions",
        "num_completions_to_print",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "save_merged",
        "save_only_model",
        "logging_strategy",
        "logging_nan_inf_filter",
        "include_num_input_tokens_seen",
        "log_unique_prompts",
        "log_multimodal",
        "log_level",
        "disable_tqdm",
        "metric_for_best_model",
        "greater_is_better",
        "load_best_model_at_end",
        # How the processes communicate: the same updates (ddp_find_unused_parameters only
        # decides whether DDP looks for parameters without a gradient).
        "ddp_find_unused_parameters",
        "ddp_bucket_cap_mb",
        "ddp_broadcast_buffers",
        "ddp_static_graph",
        "ddp_backend",
        "ddp_timeout",
        # Evaluation: runs on its own RNG state and never changes training.
        "eval_strategy",
        "eval_steps",
        "eval_on_start",
        "eval_delay",
        "per_device_eval_batch_size",
        "num_generations_eval",
        # Limits that stop a run rather than change it; a wall-clock limit depends on the machine.
        "max_consecutive_nonfinite_steps",
        "reward_timeout",
        # Memory settings that compute the same values.
        "retain_freed_memory",
        "release_freed_memory",
        "max_forward_tokens",
        "gradient_checkpointing",
        "gradient_checkpointing_kwargs",
        "vllm_gpu_memory_utilization",
        "use_cache",
        # Compiling computes the same values (up to float rounding), faster.
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        # Where the vLLM server is (a restarted server may have moved) and how long to wait for
        # it: a resumed run pushes all its weights to the server before sampling.
        "vllm_server_base_url",
        "vllm_server_host",
        "vllm_server_port",
        "vllm_server_timeout",
        "vllm_group_port",
        # How this very check, the output folder and the resume itself are handled.
        "resume_config_changes",
        "overwrite_output_dir",
        "resume_from_checkpoint",
        "ignore_data_skip",
        # Flags for the user's script, model code allowed to run, and data-loader worker settings
        # (prompts are read in the training process): none changes the weights.
        "do_train",
        "do_eval",
        "do_predict",
        "trust_remote_code",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "dataloader_multiprocessing_context",
        "dataloader_in_order",
    }
    # TRL fields accepted only at their default (train.trl_compat): they cannot differ.
    | {f.name for f in dataclasses.fields(AcceptedAtDefault)}
)
"""`GRPOConfig` fields a resumed run may change freely."""

RESUME_LOCKED_FIELDS = frozenset(
    {
        # The model, its numerics and the generation engine.
        "model_init_kwargs",
        "disable_dropout",
        "use_cpu",
        "bf16",
        "fp16",
        "tf32",
        "full_determinism",
        "attention",
        "use_vllm",
        "vllm_mode",
        "vllm_tensor_parallel_size",
        "vllm_max_model_length",
        "vllm_enforce_eager",
        # Data: which prompts, in which order, and how they are rendered.
        "seed",
        "data_seed",
        "remove_unused_columns",
        "shuffle_dataset",
        "max_prompt_length",
        "prompt_length_policy",
        "chat_template_kwargs",
        # Sampling and batch geometry.
        "num_generations",
        "max_completion_length",
        "generation_batch_size",
        "steps_per_generation",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "generation_kwargs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        # The objective: loss, advantages, KL and reference model.
        "loss_type",
        "beta",
        "num_iterations",
        "epsilon",
        "epsilon_high",
        "delta",
        "importance_sampling_level",
        "scale_rewards",
        "reward_weights",
        "multi_objective_aggregation",
        "reward_timeout_policy",
        "mask_truncated_completions",
        # Multi-turn rollouts: which tool calls run and how they are read.
        "max_tool_calling_iterations",
        "tool_timeout",
        "tool_call_parser",
        "top_entropy_quantile",
        "off_policy_mask_threshold",
        "use_bias_correction_kl",
        "sapo_temperature_pos",
        "sapo_temperature_neg",
        "vespo_k_pos",
        "vespo_lambda_pos",
        "vespo_k_neg",
        "vespo_lambda_neg",
        "cispo_cap_mode",
        "kl_bias_correction_level",
        "entropy_coef",
        "use_adaptive_entropy",
        "entropy_coef_min",
        "entropy_coef_max",
        "entropy_coef_delta",
        "entropy_target",
        "dynamic_sampling",
        "max_dynamic_sampling_draws",
        "vllm_importance_sampling_correction",
        "vllm_importance_sampling_mode",
        "vllm_importance_sampling_clip_min",
        "vllm_importance_sampling_clip_max",
        "vllm_importance_sampling_cap",
        "sync_ref_model",
        "ref_model_mixup_alpha",
        "ref_model_sync_steps",
        # The optimizer and the learning-rate schedule (whose length is max_steps).
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "optim",
        "optim_args",
        "lr_scheduler_type",
        "lr_scheduler_kwargs",
        "warmup_ratio",
        "warmup_steps",
        "max_grad_norm",
        "max_steps",
        "num_train_epochs",
    }
)
"""`GRPOConfig` fields that change the optimisation or its numerics: refused on resume unless
`resume_config_changes="apply"`."""

MODEL_KEY = "model"
"""Name of the policy's `name_or_path` in the list of changes."""


class ResumeConfigError(CheckpointError):
    """A resume whose config changes the optimisation, without `resume_config_changes="apply"`."""


def config_changes(
    saved: dict[str, Any],
    current: dict[str, Any],
    *,
    saved_model: str | None = None,
    current_model: str | None = None,
) -> list[tuple[str, Any, Any]]:
    """The locked fields whose value differs between a checkpoint's config and this run's.

    Args:
        saved: the checkpoint's `grpo_config.json`.
        current: this run's `GRPOConfig.to_dict()`; compared after a JSON round trip, as saved.
        saved_model, current_model: the policy's `name_or_path` then and now (None = not
            compared).

    Returns:
        `(field, old, new)` per change, `"model"` first, then in field order. Fields only one
        side knows (another grpokit version) are not compared.
    """
    import json

    now = json.loads(json.dumps(current, default=str))
    changes: list[tuple[str, Any, Any]] = []
    if saved_model is not None and current_model is not None and saved_model != current_model:
        changes.append((MODEL_KEY, saved_model, current_model))
    for name, value in now.items():
        if name in RESUME_LOCKED_FIELDS and name in saved and saved[name] != value:
            changes.append((name, saved[name], value))
    return changes


def check_config_changes(
    checkpoint: str | Path, changes: list[tuple[str, Any, Any]], policy: str
) -> None:
    """Refuse `changes` (policy "refuse") with one message listing each, or log them ("apply").

    Raises:
        ResumeConfigError: there are changes and `policy` is "refuse".
    """
    if not changes:
        return
    listed = "; ".join(f"{name}: {old!r} -> {new!r}" for name, old, new in changes)
    if policy == "apply":
        logger.warning("resuming from %s with config changes applied: %s", checkpoint, listed)
        return
    processes = ""
    if any(name == "generation_batch_size" for name, _, _ in changes):
        processes = (
            " generation_batch_size counts the completions of every process, so another number "
            "of processes changes it: resume with as many processes as the run that saved."
        )
    raise ResumeConfigError(
        checkpoint,
        f"this run's config changes the optimisation ({listed}). Resume with the checkpoint's "
        "values, or apply the changes from the resumed step with "
        f"resume_config_changes='apply' (CLI: --apply_config_changes).{processes}",
    )


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The hyper-parameters of each param group (everything but the parameters themselves)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def apply_new_settings(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    settings: list[dict[str, Any]],
    global_step: int,
) -> None:
    """After loading a checkpoint's optimizer state: put back this run's hyper-parameters and
    move its (fresh, never loaded) scheduler to `global_step`.

    The optimizer keeps the checkpoint's moments; learning rate, betas, epsilon and weight decay
    are this run's, and the learning rate follows this run's schedule at `global_step` (as if it
    had been used from the start).

    Args:
        optimizer: with the checkpoint's state loaded.
        scheduler: built for this run's config and not yet stepped past step 0.
        settings: `optimizer_settings` of the optimizer before the checkpoint was loaded.
        global_step: the resumed optimizer step.
    """
    if len(settings) != len(optimizer.param_groups):
        raise ValueError(
            f"the checkpoint has {len(optimizer.param_groups)} parameter groups, this run "
            f"{len(settings)}; the new settings cannot be applied."
        )
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)
    with warnings.catch_warnings():
        # "lr_scheduler.step() before optimizer.step()": intended, this only replays the schedule.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(global_step):
            scheduler.step()
