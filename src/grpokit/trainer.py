"""`GRPOTrainer`: one explicit GRPO loop over the components of grpokit.

Read `GRPOTrainer.train` top to bottom: each generation round samples B prompts, renders and
tokenizes them, generates G completions each (N = B*G), scores them, turns rewards into group
advantages, computes old / reference log-probs only when they are needed, then makes
`num_iterations` passes of `steps_per_generation / gradient_accumulation_steps` optimizer steps of
`gradient_accumulation_steps` micro-batches, and finally logs, evaluates and checkpoints.

Batch semantics are TRL's: `per_device_train_batch_size` counts completions per micro-batch, a
generation batch holds `per_device_train_batch_size * steps_per_generation` completions, and
`max_steps` / `global_step` count optimizer steps. Logging, evaluation and checkpoints happen at
the end of a generation round (with the defaults, one round = one optimizer step).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grpokit import checkpoint as ckpt
from grpokit.advantages import group_advantages
from grpokit.checkpoint import PromptSampler, TrainerState
from grpokit.config import GRPOConfig, resolve_steps
from grpokit.data import apply_prompt_length_policy, format_completions, render_prompts
from grpokit.generation import (
    GenerationEngine,
    GenerationOutput,
    RolloutBatch,
    SamplingParams,
    TransformersEngine,
)
from grpokit.logging import (
    RunLogger,
    completion_metrics,
    completion_rows,
    name_reward_metrics,
    reduce_metrics,
)
from grpokit.logprobs import model_completion_logprobs
from grpokit.losses import policy_loss
from grpokit.models import bf16_supported, resolve_model_path
from grpokit.rewards import build_reward_functions, compute_rewards

logger = logging.getLogger("grpokit")

# Loss types whose aggregation divides by `num_items_in_batch`: the micro-batch losses of an
# optimizer step *sum* to the step's loss. Every other aggregation is a per-micro-batch mean and is
# divided by `gradient_accumulation_steps` (as TRL does).
TOKEN_SUM_LOSS_TYPES = ("dapo", "cispo", "vespo")


class GRPOTrainer:
    """Fine-tune a causal LM with GRPO and its variants; TRL's `GRPOTrainer` arguments.

    Args:
        model: A Hugging Face id or path (see `grpokit.models.resolve_model_path`), or a causal-LM
            instance. A bf16/fp16 instance is upcast to float32 (with a warning): weights,
            gradients and optimizer state stay float32; compute uses bf16 autocast (`bf16`).
        reward_funcs: One or a list of callables (sync or async), reward models (instances or
            ids/paths) or built-in reward names; see `grpokit.rewards.build_reward_functions`.
        args: The run's `GRPOConfig` (default: `GRPOConfig()`).
        train_dataset: A `datasets.Dataset` / `IterableDataset` (or list of dicts) with a `prompt`
            column, plain text or chat messages; other columns reach the reward functions.
        eval_dataset: Same format; scored by `evaluate()` every `eval_steps` when enabled.
        processing_class: The policy's tokenizer; loaded from the model's path when None.
        reward_processing_classes: Tokenizers of the reward models, aligned with `reward_funcs`.
        peft_config: A `peft` config (e.g. `LoraConfig`) to train an adapter instead of all weights.
        generation_engine: Optional `GenerationEngine`; default samples with `model.generate`.
    """

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: GRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        peft_config: Any = None,
        generation_engine: GenerationEngine | None = None,
    ) -> None:
        self.args = args if args is not None else GRPOConfig()
        if not isinstance(self.args, GRPOConfig):
            raise TypeError(f"args must be a grpokit.GRPOConfig, got {type(self.args).__name__}.")
        if train_dataset is None:
            raise ValueError("train_dataset is required: a dataset with a 'prompt' column.")
        from transformers import set_seed

        set_seed(self.args.seed)
        self.device = torch.device(
            "cuda" if torch.cuda.is_available() and not self.args.use_cpu else "cpu"
        )
        self.model, self.processing_class = _load_policy(model, processing_class, self.args)
        self.model = self._prepare_model(self.model, peft_config)
        self.is_peft = ckpt.is_peft_model(self.model)
        # Under PEFT the adapters live inside the base model's modules; calling the base model
        # directly keeps its full forward signature (logits_to_keep, position_ids).
        self.forward_model = self.model.get_base_model() if self.is_peft else self.model
        self.ref_model = self._make_ref_model()
        self.reward_funcs = build_reward_functions(
            reward_funcs, reward_processing_classes, device=self.device
        )
        self._check_reward_weights()
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.sampler = PromptSampler(
            train_dataset, seed=self.args.seed, shuffle=self.args.shuffle_dataset
        )
        self.engine = generation_engine or TransformersEngine(self.model, self.processing_class)
        self.sampling = SamplingParams(
            temperature=self.args.temperature,
            top_p=self.args.top_p,
            top_k=self.args.top_k,
            min_p=self.args.min_p,
            repetition_penalty=self.args.repetition_penalty,
            generation_kwargs=dict(self.args.generation_kwargs or {}),
        )
        self.use_bf16 = self._resolve_precision()
        self.max_steps = self._resolve_max_steps()
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.state = TrainerState(max_steps=self.max_steps)
        self._pending: dict[str, list[float]] = defaultdict(list)

    # =============================================================================================
    # The loop
    # =============================================================================================
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainerState:
        """Run GRPO until `max_steps` optimizer steps; resume from a checkpoint if asked.

        Args:
            resume_from_checkpoint: True = the latest `checkpoint-N` in `output_dir`; a path = that
                checkpoint; None/False = start fresh.

        Returns:
            The final `TrainerState`.
        """
        cfg = self.args
        self._maybe_resume(resume_from_checkpoint)
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output_dir) / ckpt.GRPO_CONFIG).write_text(_json(cfg.to_dict()))
        run_log = RunLogger(
            cfg.output_dir,
            total_steps=self.max_steps,
            initial_step=self.state.global_step,
            log_completions=cfg.log_completions,
            run_name=cfg.run_name,
        )
        steps_per_round = cfg.num_iterations * cfg.optimizer_steps_per_generation
        num_rounds = math.ceil(self.max_steps / steps_per_round)
        try:
            for _ in range(self.state.global_step // steps_per_round, num_rounds):
                round_start, first_step = time.perf_counter(), self.state.global_step
                timings: dict[str, float] = {}

                # ---- ALGO: rollouts --------------------------------------------------------
                with _timer(timings, "time/generation"):
                    prompts, prompt_ids, columns = self.sample_prompts()
                    gen = self.generate(prompt_ids)
                with _timer(timings, "time/rewards"):
                    completions, completion_id_lists = self.decode(prompts, gen)
                    rewards = self.score(prompts, completions, completion_id_lists, columns)
                    adv = group_advantages(
                        rewards,  # [N, K]
                        cfg.num_generations,
                        reward_weights=cfg.reward_weights,
                        scale_rewards=str(cfg.scale_rewards),
                        multi_objective_aggregation=cfg.multi_objective_aggregation,
                    )
                with _timer(timings, "time/logprobs"):
                    batch = self.build_rollout_batch(gen, adv.advantages)

                # ---- ALGO: policy update --------------------------------------------------
                with _timer(timings, "time/training"):
                    train_metrics = self.update_policy(batch)

                # ---- Plumbing: metrics, evaluation, checkpoints ---------------------------
                step_time = time.perf_counter() - round_start
                self._record(
                    self._rollout_metrics(gen, adv.metrics),
                    train_metrics,
                    timings,
                    step_time,
                    completion_tokens=float(gen.completion_mask.sum()),
                )
                if cfg.log_completions and self._is_logging_round(first_step):
                    run_log.log_completions(
                        self.state.global_step,
                        completion_rows(
                            prompts,
                            completions,
                            rewards,
                            adv.rewards,
                            adv.advantages,
                            [fn.name for fn in self.reward_funcs],
                            cfg.num_completions_to_print,
                        ),
                    )
                self._after_round(run_log, first_step)
        finally:
            run_log.close()
        return self.state

    # =============================================================================================
    # Steps of the algorithm
    # =============================================================================================
    def sample_prompts(self) -> tuple[list[Any], list[list[int]], dict[str, list[Any]]]:
        """Draw B prompts, render and tokenize them, and enforce `max_prompt_length`.

        Returns:
            `(prompts, prompt_ids, columns)`: N = B*G prompts (each repeated G times, for the reward
            functions), B token-id lists, and every other column repeated G times.
        """
        cfg = self.args
        rows: list[dict[str, Any]] = []
        ids: list[list[int]] = []
        attempts = 0
        while len(rows) < cfg.prompts_per_generation:
            need = cfg.prompts_per_generation - len(rows)
            drawn = [self.sampler.next() for _ in range(need)]
            kept_rows, kept_ids = self._tokenize_prompts(drawn)
            rows += kept_rows
            ids += kept_ids
            attempts += need
            if not rows and attempts > max(1, self.sampler.size or 0) + need:
                raise ValueError(
                    f"Every prompt is longer than max_prompt_length={cfg.max_prompt_length} tokens "
                    "and prompt_length_policy='skip' drops them all; raise max_prompt_length or "
                    "use prompt_length_policy='truncate_left'."
                )
        g = cfg.num_generations
        prompts = [row["prompt"] for row in rows for _ in range(g)]
        columns: dict[str, list[Any]] = {}
        if not cfg.remove_unused_columns:
            for key in rows[0]:
                if key != "prompt":
                    columns[key] = [row.get(key) for row in rows for _ in range(g)]
        return prompts, ids, columns

    def generate(self, prompt_ids: list[list[int]]) -> GenerationOutput:
        """Sample G completions per prompt with the generation engine (under autocast)."""
        with self.autocast():
            return self.engine.generate(
                prompt_ids,
                num_generations=self.args.num_generations,
                max_new_tokens=self.args.max_completion_length,
                sampling=self.sampling,
            )

    def decode(
        self, prompts: list[Any], gen: GenerationOutput
    ) -> tuple[list[Any], list[list[int]]]:
        """Decode completions into the prompts' format and per-row token-id lists (up to EOS)."""
        lengths = gen.completion_mask.sum(1).tolist()  # [N]
        id_lists = [row[:n] for row, n in zip(gen.completion_ids.tolist(), lengths, strict=True)]
        texts = self.processing_class.batch_decode(id_lists, skip_special_tokens=True)
        return format_completions(prompts, texts), id_lists

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
    ) -> Tensor:
        """Rewards `[N, K]` (NaN = does not apply) from every reward function."""
        return compute_rewards(
            self.reward_funcs,
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            columns=columns,
            trainer_state=self.state,
        )

    def build_rollout_batch(self, gen: GenerationOutput, advantages: Tensor) -> RolloutBatch:
        """The training batch; old log-probs only when off-policy, ref log-probs only if beta."""
        cfg = self.args
        loss_mask = gen.completion_mask.clone()  # [N, T] 1 = token counts in the loss
        if cfg.mask_truncated_completions:
            loss_mask[gen.is_truncated] = 0
        batch = RolloutBatch(
            prompt_ids=gen.prompt_ids,
            prompt_mask=gen.prompt_mask,
            completion_ids=gen.completion_ids,
            completion_mask=gen.completion_mask,
            loss_mask=loss_mask,
            advantages=advantages,
            sampling_logprobs=gen.sampling_logprobs,
        )
        if cfg.is_off_policy:
            batch.old_logprobs = self._logprobs_no_grad(self.model, batch)
        if cfg.beta != 0:
            batch.ref_logprobs = self._ref_logprobs(batch)
        return batch

    def update_policy(self, batch: RolloutBatch) -> dict[str, list[float]]:
        """`num_iterations` passes of optimizer steps over the batch; returns per-step metrics."""
        cfg = self.args
        mini = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        metrics: dict[str, list[float]] = defaultdict(list)
        self.model.train()
        for _ in range(cfg.num_iterations):
            for start in range(0, batch.size, mini):
                if self.state.global_step >= self.max_steps:
                    return metrics
                step_metrics = self.optimizer_step(batch, range(start, start + mini))
                for key, value in step_metrics.items():
                    metrics[key].append(value)
        return metrics

    def optimizer_step(self, batch: RolloutBatch, rows: range) -> dict[str, float]:
        """One optimizer step on `rows` of the batch, accumulated over micro-batches."""
        cfg = self.args
        # dapo/cispo/vespo: normalise by the loss tokens of this optimizer step's whole
        # mini-batch, so 1 micro-batch of 4 and 4 micro-batches of 1 give the same update. TRL
        # divides instead by the token count of the whole *generation* batch, counted before
        # `mask_truncated_completions`: the same when steps_per_generation ==
        # gradient_accumulation_steps and nothing is masked, smaller steps otherwise.
        num_items = batch.loss_mask[rows.start : rows.stop].sum().clamp(min=1).float()
        scale = (
            1.0 if cfg.loss_type in TOKEN_SUM_LOSS_TYPES else 1.0 / cfg.gradient_accumulation_steps
        )
        micro_metrics: dict[str, list[Tensor]] = defaultdict(list)
        total_loss = 0.0
        size = cfg.per_device_train_batch_size
        for start in range(rows.start, rows.stop, size):
            loss, metrics = self.micro_batch_loss(batch, slice(start, start + size), num_items)
            (loss * scale).backward()
            total_loss += loss.item() * scale
            for key, value in metrics.items():
                micro_metrics[key].append(value)
        grad_norm = self._clip_gradients()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.engine.update_weights(self.model)
        if cfg.sync_ref_model and self.state.global_step % cfg.ref_model_sync_steps == 0:
            self._sync_ref_model()
        out = reduce_metrics({k: [v.item() for v in vs] for k, vs in micro_metrics.items()})
        out.update(
            loss=total_loss, grad_norm=grad_norm, learning_rate=self.scheduler.get_last_lr()[0]
        )
        return out

    def micro_batch_loss(
        self, batch: RolloutBatch, rows: slice, num_items: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss of one micro-batch (padding trimmed to its longest row)."""
        cfg = self.args
        input_ids, attention_mask, t = batch.trimmed(rows)  # [n, P'+T'], T'
        with self.autocast():
            logprobs, entropies = model_completion_logprobs(
                self.forward_model,
                input_ids.to(self.device),
                attention_mask.to(self.device),
                t,
                temperature=cfg.temperature,
                compute_entropy=True,
            )  # [n, T'] float32 each
        return policy_loss(
            logprobs,
            batch.sliced("old_logprobs", rows, t, self.device),
            batch.advantages[rows].to(self.device),
            batch.loss_mask[rows, :t].to(self.device),
            loss_type=cfg.loss_type,
            importance_sampling_level=cfg.importance_sampling_level,
            epsilon_low=cfg.epsilon,
            epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon,
            delta=cfg.delta,
            beta=cfg.beta,
            ref_logprobs=batch.sliced("ref_logprobs", rows, t, self.device),
            use_bias_correction_kl=cfg.use_bias_correction_kl,
            max_completion_length=cfg.max_completion_length,
            num_items_in_batch=num_items,
            entropies=entropies.detach() if entropies is not None else None,
            top_entropy_quantile=cfg.top_entropy_quantile,
            off_policy_mask_threshold=cfg.off_policy_mask_threshold,
            sampling_logprobs=batch.sliced("sampling_logprobs", rows, t, self.device),
            sapo_temperature_pos=cfg.sapo_temperature_pos,
            sapo_temperature_neg=cfg.sapo_temperature_neg,
        )

    # =============================================================================================
    # Evaluation and saving
    # =============================================================================================
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Generate on `eval_dataset` and score it; returns `eval_`-prefixed reward metrics.

        The training RNG state is saved and restored, so evaluating does not change training.
        """
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset; pass eval_dataset= to GRPOTrainer.")
        cfg = self.args
        g = cfg.num_generations_eval or cfg.num_generations
        per_call = max(1, cfg.per_device_eval_batch_size // g)
        rng = ckpt.rng_state()
        rows = list(PromptSampler(self.eval_dataset, seed=0, shuffle=False).iterate_once())
        rewards, lengths = [], []
        try:
            for start in range(0, len(rows), per_call):
                chunk = rows[start : start + per_call]
                chunk_rows, ids = self._tokenize_prompts(chunk)
                if not chunk_rows:
                    continue
                with self.autocast():
                    gen = self.engine.generate(
                        ids,
                        num_generations=g,
                        max_new_tokens=cfg.max_completion_length,
                        sampling=self.sampling,
                    )
                prompts = [r["prompt"] for r in chunk_rows for _ in range(g)]
                columns = {
                    k: [r.get(k) for r in chunk_rows for _ in range(g)]
                    for k in chunk_rows[0]
                    if k != "prompt"
                }
                completions, id_lists = self.decode(prompts, gen)
                rewards.append(self.score(prompts, completions, id_lists, columns))
                lengths.append(gen.completion_mask.sum(1).float())
        finally:
            ckpt.set_rng_state(rng)
        if not rewards:
            raise ValueError("eval_dataset produced no prompts (empty, or all skipped by length).")
        adv = group_advantages(
            torch.cat(rewards),
            g,
            reward_weights=cfg.reward_weights,
            scale_rewards=str(cfg.scale_rewards),
            multi_objective_aggregation=cfg.multi_objective_aggregation,
        )
        names = [fn.name for fn in self.reward_funcs]
        metrics = {f"eval_{k}": v for k, v in name_reward_metrics(adv.metrics, names).items()}
        metrics["eval_completions/mean_length"] = torch.cat(lengths).mean().item()
        return metrics

    def save_model(self, output_dir: str | None = None, *, merged: bool | None = None) -> None:
        """Save the model (or LoRA adapter) and tokenizer in Hugging Face format.

        Args:
            output_dir: Target directory (default: `args.output_dir`).
            merged: Under LoRA, save the adapter merged into the base weights (default:
                `args.save_merged`).
        """
        merged = self.args.save_merged if merged is None else merged
        ckpt.save_model(
            self.model, self.processing_class, output_dir or self.args.output_dir, merged=merged
        )

    # =============================================================================================
    # Helpers
    # =============================================================================================
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast when enabled and native on this device; otherwise a no-op."""
        if self.use_bf16:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _tokenize_prompts(
        self, rows: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], list[list[int]]]:
        cfg = self.args
        for row in rows:
            if "prompt" not in row:
                raise KeyError(
                    f"The dataset has no 'prompt' column (columns: {sorted(row)}); rename the "
                    "column holding the prompts to 'prompt'."
                )
        texts = render_prompts(
            [row["prompt"] for row in rows],
            self.processing_class,
            chat_template_kwargs=cfg.chat_template_kwargs,
        )
        ids = self.processing_class(texts, add_special_tokens=False)["input_ids"]
        kept_ids, kept = apply_prompt_length_policy(
            ids, cfg.max_prompt_length, cfg.prompt_length_policy
        )
        changed = (
            len(rows) - len(kept)
            if cfg.prompt_length_policy == "skip"
            else sum(len(a) != len(b) for a, b in zip(ids, kept_ids, strict=True))
        )
        if changed:
            self.state.prompts_over_length += changed
            action = "skipped" if cfg.prompt_length_policy == "skip" else "truncated from the left"
            logger.warning(
                "%d prompt(s) longer than max_prompt_length=%d tokens %s (%d so far).",
                changed,
                cfg.max_prompt_length,
                action,
                self.state.prompts_over_length,
            )
        return [rows[i] for i in kept], kept_ids

    @torch.no_grad()
    def _logprobs_no_grad(self, model: Any, batch: RolloutBatch) -> Tensor:
        """`[N, T]` log-probs of the batch under `model` (no grad), micro-batch by micro-batch."""
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32)
        size = self.args.per_device_train_batch_size
        for start in range(0, batch.size, size):
            rows = slice(start, start + size)
            input_ids, attention_mask, t = batch.trimmed(rows)
            with self.autocast():
                logprobs, _ = model_completion_logprobs(
                    model,
                    input_ids.to(self.device),
                    attention_mask.to(self.device),
                    t,
                    temperature=self.args.temperature,
                )
            out[rows, :t] = logprobs.cpu()
        return out

    def _ref_logprobs(self, batch: RolloutBatch) -> Tensor:
        if self.is_peft:
            with self.model.disable_adapter():
                return self._logprobs_no_grad(self.forward_model, batch)
        return self._logprobs_no_grad(self.ref_model, batch)

    def _clip_gradients(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.args.max_grad_norm
        if max_norm:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @torch.no_grad()
    def _sync_ref_model(self) -> None:
        """TR-DPO mix-up: ref = alpha * policy + (1 - alpha) * ref."""
        alpha = self.args.ref_model_mixup_alpha
        for ref_param, param in zip(
            self.ref_model.parameters(), self.model.parameters(), strict=True
        ):
            ref_param.mul_(1 - alpha).add_(param.detach(), alpha=alpha)

    # ---- setup ----------------------------------------------------------------------------------
    def _prepare_model(self, model: Any, peft_config: Any) -> Any:
        """Dropout, gradient checkpointing and the LoRA adapter; move to the device."""
        cfg = self.args
        if cfg.disable_dropout:
            _disable_dropout(model)
        if cfg.gradient_checkpointing:
            kwargs = {"use_reentrant": False, **(cfg.gradient_checkpointing_kwargs or {})}
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        if peft_config is not None:
            if cfg.sync_ref_model:
                raise ValueError(
                    "sync_ref_model=True is not supported with peft_config (the reference model is "
                    "the base model with the adapter disabled); set sync_ref_model=False."
                )
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        return model.to(self.device)

    def _make_ref_model(self) -> Any:
        """A frozen copy of the initial policy when beta != 0 (none under LoRA: adapter off)."""
        if self.args.beta == 0 or self.is_peft:
            return None
        ref = copy.deepcopy(self.model).eval()
        ref.requires_grad_(False)
        return ref

    def _check_reward_weights(self) -> None:
        weights = self.args.reward_weights
        if weights is not None and len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries but there are {len(self.reward_funcs)} "
                "reward functions; give one weight per reward function."
            )

    def _resolve_precision(self) -> bool:
        if not self.args.bf16:
            logger.info("precision: float32 weights and compute (bf16=False)")
            return False
        native = bf16_supported() if self.device.type == "cpu" else torch.cuda.is_bf16_supported()
        if native:
            logger.info("precision: float32 weights/optimizer, bf16 autocast compute")
        else:
            logger.info("precision: float32 (this %s has no native bf16)", self.device.type)
        return native

    def _resolve_max_steps(self) -> int:
        cfg = self.args
        if cfg.max_steps > 0:
            return cfg.max_steps
        if self.sampler.size is None:
            raise ValueError(
                "max_steps=-1 needs a dataset with a length to derive the steps from "
                "num_train_epochs; set max_steps for an IterableDataset."
            )
        rounds = math.ceil(cfg.num_train_epochs * self.sampler.size / cfg.prompts_per_generation)
        return max(1, rounds) * cfg.num_iterations * cfg.optimizer_steps_per_generation

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay on matrices only (not biases or norm weights), as transformers."""
        cfg = self.args
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.learning_rate,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_epsilon,
            fused=cfg.optim == "adamw_torch_fused" or None,
        )

    def _make_scheduler(self) -> Any:
        from transformers import get_scheduler

        cfg = self.args
        if cfg.warmup_steps:
            warmup = resolve_steps(cfg.warmup_steps, self.max_steps)
        else:
            warmup = math.ceil(cfg.warmup_ratio * self.max_steps)
        return get_scheduler(
            cfg.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=warmup,
            num_training_steps=self.max_steps,
            scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or {},
        )

    # ---- plumbing: metrics, evaluation, checkpoints --------------------------------------------
    def _rollout_metrics(
        self, gen: GenerationOutput, reward_metrics: dict[str, float]
    ) -> dict[str, float]:
        """Completion-length, token-count and reward metrics of one generation batch."""
        self.state.num_input_tokens_seen += int(gen.prompt_mask.sum() + gen.completion_mask.sum())
        return {
            **completion_metrics(gen.completion_mask, gen.is_truncated),
            "num_tokens": float(self.state.num_input_tokens_seen),
            "prompts/over_length": float(self.state.prompts_over_length),
            **name_reward_metrics(reward_metrics, [fn.name for fn in self.reward_funcs]),
        }

    def _record(
        self,
        rollout: dict[str, float],
        train: dict[str, list[float]],
        timings: dict[str, float],
        step_time: float,
        completion_tokens: float,
    ) -> None:
        """Queue one round's metrics until the next logging step."""
        for key, value in {**rollout, **timings}.items():
            self._pending[key].append(value)
        for key, values in train.items():
            self._pending[key].extend(values)
        self._pending["step_time"].append(step_time)
        self._pending["tokens_per_second"].append(completion_tokens / max(step_time, 1e-9))

    def _crossed(self, every: int | float, first_step: int) -> bool:
        """Whether this round's optimizer steps crossed a multiple of `every`."""
        n = resolve_steps(every, self.max_steps)
        return self.state.global_step // n > first_step // n

    def _is_logging_round(self, first_step: int) -> bool:
        cfg = self.args
        return (
            self._crossed(cfg.logging_steps, first_step)
            or self.state.global_step >= self.max_steps
            or (cfg.logging_first_step and first_step == 0)
        )

    def _after_round(self, run_log: RunLogger, first_step: int) -> None:
        """Log, evaluate and checkpoint when a multiple of their `*_steps` was crossed."""
        cfg = self.args
        step = self.state.global_step
        self.state.epoch = self.sampler.epochs_done
        self.state.data_epoch, self.state.data_index = self.sampler.epoch, self.sampler.index
        done = step >= self.max_steps

        metrics: dict[str, float] = {}
        if self._is_logging_round(first_step):
            metrics = reduce_metrics(self._pending)
            metrics["epoch"] = self.state.epoch
            self._pending.clear()
        eval_every = cfg.eval_steps if cfg.eval_steps is not None else cfg.logging_steps
        if (
            cfg.eval_strategy == "steps"
            and self.eval_dataset is not None
            and self._crossed(eval_every, first_step)
        ):
            metrics.update(self.evaluate())
        if metrics:
            run_log.log(step, metrics)
        else:
            run_log.advance(step)
        if cfg.save_strategy == "steps" and (self._crossed(cfg.save_steps, first_step) or done):
            self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        cfg = self.args
        path = Path(cfg.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{self.state.global_step}"
        ckpt.save_checkpoint(
            path,
            model=self.model,
            tokenizer=self.processing_class,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            trainer_state=self.state.to_dict(),
            config=cfg.to_dict(),
        )
        if self.ref_model is not None and cfg.sync_ref_model:
            torch.save(self.ref_model.state_dict(), path / "ref_model.pt")
        if cfg.save_merged and self.is_peft:
            ckpt.save_model(self.model, self.processing_class, path / "merged", merged=True)
        ckpt.rotate_checkpoints(cfg.output_dir, cfg.save_total_limit)
        return path

    def _maybe_resume(self, resume_from_checkpoint: bool | str | None) -> None:
        if not resume_from_checkpoint:
            return
        if resume_from_checkpoint is True:
            found = ckpt.latest_checkpoint(self.args.output_dir)
            if found is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint=True but {self.args.output_dir} holds no checkpoint-N "
                    "directory; pass a checkpoint path or start without resuming."
                )
            path = found
        else:
            path = Path(resume_from_checkpoint)
        saved = ckpt.load_checkpoint(
            path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler
        )
        saved["max_steps"] = self.max_steps
        self.state = TrainerState(**saved)
        self.sampler.restore(self.state.data_epoch, self.state.data_index)
        if (path / "ref_model.pt").exists() and self.ref_model is not None:
            self.ref_model.load_state_dict(torch.load(path / "ref_model.pt", weights_only=True))
        steps_per_round = self.args.num_iterations * self.args.optimizer_steps_per_generation
        if self.state.global_step % steps_per_round and self.state.global_step < self.max_steps:
            warnings.warn(
                f"Checkpoint {path} was saved mid generation round "
                f"(step {self.state.global_step}); "
                "the resumed run starts a fresh round.",
                stacklevel=2,
            )
        logger.info("resumed from %s at step %d", path, self.state.global_step)


# =================================================================================================
# Module helpers
# =================================================================================================
def _load_policy(model: Any, processing_class: Any, args: GRPOConfig) -> tuple[Any, Any]:
    """Load the policy (and tokenizer) from a string, or take an instance; keep float32 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, str):
        path = resolve_model_path(model)
        kwargs = {"dtype": torch.float32, **(args.model_init_kwargs or {})}
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif args.model_init_kwargs:
        raise ValueError(
            "model_init_kwargs applies only when model is a string; the model is already an "
            "instance. Remove model_init_kwargs."
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a model id/path or a torch module, got {type(model).__name__}."
        )
    low = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if low:
        logger.warning(
            "The model has %s weights; upcasting to float32 so that small updates are not lost "
            "(compute still uses bf16 autocast when bf16=True).",
            ", ".join(sorted(str(d) for d in low)),
        )
        model = model.float()
    if processing_class is None:
        source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not source:
            raise ValueError(
                "processing_class is None and the model has no path to load a tokenizer from; "
                "pass processing_class=<its tokenizer>."
            )
        processing_class = AutoTokenizer.from_pretrained(source)
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = processing_class.pad_token_id
    return model, processing_class


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


@contextlib.contextmanager
def _timer(timings: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, default=str)
