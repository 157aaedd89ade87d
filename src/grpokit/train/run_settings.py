"""`GRPOConfig`'s fields around the update: the output folder and the model, the optimizer and
schedule, and logging, saving and evaluation; the `*_steps` arithmetic they share.

Three of `GRPOConfig`'s bases (`train.config`), each a group of fields under its own heading in
`grpokit train --help`; the values each field accepts are checked in `train.config_checks`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from grpokit.train.fields import KwargsField, at_default, option

_TRACKIO_ONLY = "another value without 'trackio' in report_to is refused (nothing would read it)"


@dataclass
class ModelSettings:
    """The output folder, and loading and running the policy (precision, attention, memory)."""

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
    fp16: bool = at_default(
        False,
        "fp16 mixed precision.",
        "fp16 is not supported: it needs loss scaling (a GradScaler), which grpokit does not do; "
        "use bf16 (autocast where native: CUDA GPUs of compute capability 8.0 or newer, CPUs "
        "with avx512_bf16/amx_bf16) or bf16=False (float32)",
    )
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
        "Recompute activations in the backward pass to save memory (slower). TRL defaults to "
        'True. Left False, max_forward_tokens="auto" may still recompute them (on a CPU with '
        "native bf16).",
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
        "process for reuse (`train.host_memory.retain_freed_memory`) instead of returning large "
        "blocks to the OS, which the next micro-batch must then page-fault in again (system "
        "time spent in the kernel). Process-wide and never undone. Effect on step time and "
        "memory: bench/RESULTS.md.",
    )
    release_freed_memory: bool = option(
        False,
        "Where `retain_freed_memory` applies: return what glibc kept to the OS before every "
        "phase (generation, each training micro-batch, the optimizer step), not only before a "
        "generation that finds the resident memory grown by a quarter since the second full step "
        "(`train.host_memory.KeptMemory`). A lower peak RSS where the phases' tensor sizes "
        "leave kept blocks unused, for more step time (each phase page-faults its memory in "
        "again). Effect on step time and memory: bench/RESULTS.md.",
    )
    max_forward_tokens: int | str | None = option(
        "auto",
        "Split a training micro-batch into parts of at most this many tokens (rows x trimmed "
        "width), each forwarded and backpropagated alone: the same update, the activations of "
        "one part at a time (`train.microbatch`). Applies when the loss does not depend on "
        "which rows share a micro-batch (not bnpo, the top-entropy filter or the entropy "
        'bonus). "auto" = as the device decides (`DeviceTraits.activation_bound`; memory and '
        "speed in bench/RESULTS.md): on a CPU with native bf16, under bf16 autocast, no bound "
        "and the decoder layers recompute their activations in the backward pass (gradient "
        "checkpointing; gradient_checkpointing=True keeps the token bound), except in forwards "
        "small enough to keep them (`ActivationBound.keep_up_to`) and in as many of a larger "
        "forward's last layers as the same memory holds (`ActivationBound.kept_layers`), "
        "that memory widened by the gradients frozen weights do not need (LoRA); "
        "elsewhere on the CPU 512 tokens under bf16 autocast and 768 in float32; on a GPU no "
        "bound. None = one forward per "
        "micro-batch.",
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
    torch_compile: bool = option(
        False,
        "Compile the policy (and reference) model with `torch.compile` for its training and "
        "log-prob forwards (`train.build.compile_policy`): each repeated decoder block is "
        "compiled (the model's `_no_split_modules`; the whole model if it names none), so one "
        "compilation serves every layer. The first forwards compile (tens of seconds on a CPU; "
        "a new width or grad mode compiles again), later ones run faster; the same update up "
        "to float rounding. Generation is not compiled. Set by torch_compile_backend or "
        "torch_compile_mode too, as in transformers. Effect on step time: bench/RESULTS.md.",
        limit="refused under FSDP and DeepSpeed (not yet supported); TRL compiles the whole "
        "model, grpokit each decoder block (the same forwards, compiled once for all layers), "
        "and leaves generation eager",
    )
    torch_compile_backend: str | None = option(
        None,
        'The `torch.compile` backend ("inductor", "aot_eager", ... `torch._dynamo.'
        'list_backends()`). Setting it sets torch_compile. None = "inductor" when compiling.',
    )
    torch_compile_mode: str | None = option(
        None,
        'The `torch.compile` mode ("default", "lite", "reduce-overhead", "max-autotune", '
        '"max-autotune-no-cudagraphs"). Setting it sets torch_compile. None = the default mode.',
    )


@dataclass
class OptimisationSettings:
    """Optimisation: micro-batches, the optimizer, its schedule and the length of the run."""

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


@dataclass
class ReportingSettings:
    """Logging, saving and evaluation: metrics, trackers, checkpoints, held-out evaluation."""

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
