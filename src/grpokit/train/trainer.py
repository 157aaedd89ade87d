"""`GRPOTrainer`: one explicit GRPO loop over the components of grpokit.

Read `GRPOTrainer.train` and `_training_round` top to bottom: each generation round samples B
prompts, renders and tokenizes them, generates G completions each (N = B*G), scores them, turns
rewards into group advantages, computes old / reference log-probs only when they are needed, then
makes `num_iterations` passes of `steps_per_generation / gradient_accumulation_steps` optimizer
steps of `gradient_accumulation_steps` micro-batches, and finally logs, evaluates and checkpoints.

Batch semantics are TRL's: `per_device_train_batch_size` counts completions per micro-batch, a
generation batch holds `per_device_train_batch_size * steps_per_generation` completions, and
`max_steps` / `global_step` count optimizer steps. Logging, evaluation and checkpoints happen at
the end of a generation round (with the defaults, one round = one optimizer step). Callbacks
(`transformers.TrainerCallback`, see grpokit.train.callbacks) observe every step.

Under `torchrun` / `accelerate launch` the same loop runs in every process on its share of each
generation batch (grpokit.train.distributed, docs/DISTRIBUTED.md): the batch sizes are per
process as in TRL, rewards are gathered so advantages use the global batch, the loss normalisers
count the global step, DDP (or FSDP2) averages the gradients, and only the main process writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import TrainerControl, trainer_pt_utils
from transformers.trainer_utils import TrainOutput

from grpokit.core import norms
from grpokit.core.advantages import AdvantageOutput, check_reward_weights, group_advantages
from grpokit.core.entropy import entropy_bonus
from grpokit.core.logprobs import (
    forward_module,
    forward_tokens,
    is_prompt_learning,
    model_completion_logprobs,
    prompt_sharing_supported,
)
from grpokit.core.losses import policy_loss, rollout_importance_weights, top_entropy_threshold
from grpokit.data.prompts import prompt_token_limit
from grpokit.engines.base import GenerationEngine, GenerationOutput
from grpokit.engines.device import device_traits, synchronize
from grpokit.engines.models import context_length
from grpokit.engines.weight_sync import is_shard, whole_tensor
from grpokit.errors import ConfigError
from grpokit.rewards.scoring import RewardLog, build_reward_functions
from grpokit.train import build, guards, host_memory, optimizers, quantization
from grpokit.train import checkpoint as ckpt
from grpokit.train import distributed as dist
from grpokit.train.callbacks import (
    CallbackHandler,
    default_flow,
    describe_run,
    update_best_metric,
)
from grpokit.train.checkpoint import TrainerState
from grpokit.train.config import GRPOConfig, as_grpo_config
from grpokit.train.loggers import (
    MetricsBuffer,
    RunLogger,
    SilentRunLogger,
    completion_rows,
    length_metrics,
    name_reward_metrics,
    reduce_metrics,
    tool_metrics,
)
from grpokit.train.microbatch import chunk_loss_tokens, pad_plan, plan_micro_batches, select_rows
from grpokit.train.prompt_drawer import PromptDrawer, with_environment_reward
from grpokit.train.prompt_sampler import PromptSampler
from grpokit.train.rollout import (
    RolloutBatch,
    RolloutPipeline,
    ScoredRollout,
    concatenate_rollouts,
    evaluate_rewards,
    reward_columns,
)
from grpokit.train.trackers import (
    completions_table_columns,
    log_completions_table,
    tracker_callbacks,
)

logger = logging.getLogger("grpokit")


class GRPOTrainer:
    """Fine-tune a causal LM with GRPO and its variants; TRL's `GRPOTrainer` arguments.

    Args:
        model: A Hugging Face id or path (see `engines.models.resolve_model_path`), or a causal-LM
            instance. A bf16/fp16 instance is upcast to float32 (with a warning): weights,
            gradients and optimizer state stay float32; compute uses bf16 autocast (`bf16`).
        reward_funcs: One or a list of callables (sync or async), reward models (instances or
            ids/paths) or built-in reward names; see `rewards.scoring.build_reward_functions`.
        args: The run's `GRPOConfig` (default: `GRPOConfig()`), or a `trl.GRPOConfig`, converted
            field by field (`GRPOConfig.from_trl`).
        train_dataset: A `datasets.Dataset` / `IterableDataset` (or list of dicts) with a `prompt`
            column, plain text or chat messages; other columns reach the reward functions.
        eval_dataset: Same format; scored by `evaluate()` every `eval_steps` when enabled.
        processing_class: The policy's tokenizer; loaded from the model's path when None.
        reward_processing_classes: Tokenizers of the reward models, aligned with `reward_funcs`.
        callbacks: `transformers.TrainerCallback` instances or classes, called at each event of
            the loop (grpokit.train.callbacks lists them and where they happen), after the
            trackers of `args.report_to` (grpokit.train.trackers).
        optimizers: `(optimizer, scheduler)` to use instead of building them from `args`; either
            may be None (it is then built, as in transformers). The optimizer must hold exactly
            the trainable parameters of the model as trained (after `peft_config`).
        quantization_config: A quantization config (e.g. `transformers.BitsAndBytesConfig`) to
            load `model` (a path or id) with; needs `peft_config` (QLoRA, grpokit.train.
            quantization).
        peft_config: A `peft` config (e.g. `LoraConfig`) to train an adapter instead of all weights.
        tools: Callables (sync or async, type-hinted, Google-style docstrings) the model may
            call during generation (TRL's `tools`): their schemas go into the chat template,
            rollouts become multi-turn (`grpokit.tools`), and the tool replies inside a
            completion are masked out of the loss. Needs conversational prompts and a chat
            template with tool support. Settings: `max_tool_calling_iterations`,
            `tool_timeout`, `tool_call_parser`.
        rollout_func: Replaces generation (TRL's contract): `rollout_func(prompts, trainer)`
            gets the B prompts of a batch (not repeated) and returns a dict with `prompt_ids`,
            `completion_ids` and `logprobs` (N = B*G lists each; `logprobs` may be None), an
            optional `env_mask` (1 = the model wrote the token) and any extra fields, which reach
            the reward functions (`grpokit.tools.environments.rollout_output`).
        environment_factory: Makes one environment per rollout (TRL's contract,
            `grpokit.tools.environments`): `reset(**row)` starts it and may return text appended
            to the prompt, its public methods are tools, and an optional `get_reward()` gives
            the rollout's reward (then `reward_funcs` may be empty). Reward functions receive
            the instances as `environments`.
        generation_engine: Optional `GenerationEngine` (grpokit's; after TRL's 13 arguments);
            default: `VLLMEngine` with `use_vllm`, else `TransformersEngine`.
    """

    # Exact speed-ups of the update (see grpokit.train.microbatch); False runs the plain path.
    skip_zero_advantage: bool = True
    bucket_by_length: bool = True
    # Forward a prompt once for the rows of a micro-batch that share it (the same log-probs and
    # gradients; grpokit.core.logprobs.model_completion_logprobs; a training wrapper, DDP's or
    # DeepSpeed's engine, takes the completion pass). On one process, under DDP and, where every
    # process's forward shares (`_prompt_agreement`), FSDP2 and DeepSpeed.
    share_prompts: bool = True
    # With num_iterations > 1 and one optimizer step per generation, that step's first pass runs
    # on the sampling-time weights, so its forward gives the old log-probs: no separate pass.
    old_logprobs_from_first_pass: bool = True

    def __init__(
        self,
        model: Any,
        reward_funcs: Any,
        args: GRPOConfig | Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        reward_processing_classes: Any = None,
        callbacks: list[Any] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        tools: list[Any] | None = None,
        rollout_func: Any = None,
        environment_factory: Any = None,
        generation_engine: GenerationEngine | None = None,
    ) -> None:
        self.args = as_grpo_config(args)  # a trl.GRPOConfig is converted field by field
        if train_dataset is None:
            raise ValueError("train_dataset is required: a dataset with a 'prompt' column.")
        # Joins the launcher's processes (or is a plain single process); refuses a missing backend.
        self.world = dist.World.from_env(self.args)
        self._accelerator: Any = None  # made by the `accelerator` property, for one process
        dist.check_config_world(self.args, self.world)
        build.apply_process_settings(self.args)  # seed, full determinism, tf32, log level
        self.device = self.world.device(self.args.use_cpu)
        self.device_traits = device_traits(self.device)  # what differs on this device type
        self.use_bf16 = build.resolve_precision(self.args, self.device)
        # glibc keeps freed blocks for reuse; `kept_memory` says when they go back to the OS.
        self.kept_memory = host_memory.KeptMemory(
            active=self.device_traits.retain_freed_memory
            and self.args.retain_freed_memory
            and host_memory.retain_freed_memory(),
            every_phase=self.args.release_freed_memory,
        )
        if self.device_traits.retain_freed_memory:  # the CPU's allocator
            host_memory.log_huge_pages()
        build.check_generation_server(self.args)  # a wrong server address fails before loading
        quantization_config = quantization.resolve_quantization(
            model, quantization_config, peft_config, self.args
        )
        self.model, self.processing_class = build.load_policy(
            model,
            processing_class,
            self.args,
            quantization_config=quantization_config,
            device=self.device,
        )
        # Training forwards bound their activations by a token limit or by recomputing them.
        self.activation_bound = build.resolve_activation_bound(
            self.args,
            self.device_traits,
            bf16=self.use_bf16,
            model=self.model,
            agree_forwards=self.world.deepspeed,
            frozen_gradient_bytes=build.frozen_gradient_bytes(
                self.model,
                peft_config,
                shards=self.world.num_processes
                if self.world.fsdp or self.world.zero_stage >= 2
                else 1,
            ),
        )
        self.max_forward_tokens = self.activation_bound.max_forward_tokens
        self.model = build.prepare_model(
            self.model,
            peft_config,
            self.args,
            self.device,
            recompute=self.activation_bound.recompute,
        )
        # Small training forwards keep their activations (ActivationBound.keep_up_to).
        self.layer_recompute = build.LayerRecompute(self.model)
        # CPU parameters still mapped from the checkpoint file, else copied page by page in step 1
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        copied = host_memory.own_file_mapped(trainable)
        logger.info("trainable parameters copied out of their checkpoint's mapping: %d", copied)
        if self.use_bf16:  # one cast of each norm's output for the linear layers reading it
            cast = norms.cast_norm_outputs(self.model)
            logger.info("norms casting their output once under autocast: %d", cast)
        self.is_peft = ckpt.is_peft_model(self.model)
        self.context_length = context_length(self.model)  # prompts are limited to fit in it
        self.ref_model = build.make_ref_model(self.model, self.args)
        build.compile_policy(self.model, self.args, ref_model=self.ref_model)
        # Tools and environments first: an environment may own a reward (`get_reward`).
        self.tool_calling, self.environment_pool = build.make_tool_calling(
            tools, environment_factory, self.processing_class, self.args
        )
        reward_funcs = with_environment_reward(reward_funcs, self.environment_pool)
        self.rollout_func = rollout_func
        self.environments: list[Any] | None = None  # the batch's instances, one per rollout
        self._prompt_rows: list[dict[str, Any]] = []
        self.reward_funcs = build_reward_functions(
            reward_funcs,
            reward_processing_classes,
            device=self.device,
            trust_remote_code=self.args.trust_remote_code,
        )
        check_reward_weights(
            self.args.reward_weights, len(self.reward_funcs), [f.name for f in self.reward_funcs]
        )
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        if eval_dataset is None and (self.args.eval_strategy != "no" or self.args.eval_on_start):
            raise ValueError(
                f"eval_strategy={self.args.eval_strategy!r} / eval_on_start="
                f"{self.args.eval_on_start} need an eval_dataset; pass eval_dataset= or set "
                "eval_strategy='no' and eval_on_start=False."
            )
        self.sampler = PromptSampler(
            train_dataset, seed=self.args.resolved_data_seed, shuffle=self.args.shuffle_dataset
        )
        self.prompt_drawer = PromptDrawer(self.sampler, self.world)  # this process's prompts
        self.engine = generation_engine or build.make_generation_engine(
            self.model, self.processing_class, self.args
        )
        self.sampling = build.sampling_params(self.args)
        # A completion that fills the model's context is refused now, not at the first step.
        prompt_token_limit(
            self.args.max_prompt_length, self.context_length, self.args.max_completion_length
        )
        self.loss_options = self.args.loss_options()  # built and checked once
        self.entropy_regularization = self.args.entropy_regularization()
        self.max_steps = build.resolve_max_steps(self.args, self.sampler.size)
        # Training forwards go through `train_model` (DDP's wrapper with several processes;
        # the model itself, sharded, under FSDP2, whose optimizer must see the shards; the
        # DeepSpeed engine, built over the model and its optimizer).
        prompt_learning = is_prompt_learning(self.model)
        dist.check_fsdp_run(self.world, self.args, self.engine, prompt_learning=prompt_learning)
        dist.check_deepspeed_run(
            self.world, self.args, self.engine, prompt_learning=prompt_learning
        )
        if self.world.fsdp and isinstance(optimizers, tuple) and optimizers[:1] != (None,):
            raise ConfigError(
                "optimizers=(optimizer, scheduler) cannot be used with FSDP: the optimizer must be "
                "built over the sharded parameters. Leave optimizers unset and choose the "
                "optimizer with args.optim / args.optim_args."
            )
        if not self.world.deepspeed:
            self.train_model = self.world.prepare(self.model)
        self.optimizer, self.scheduler = build.make_optimizers(
            self.model, self.args, self.max_steps, optimizers
        )
        if self.world.deepspeed:
            self.train_model = self.world.prepare(self.model, self.optimizer)
        self.state = self._describe_run(
            TrainerState(model_name_or_path=build.model_name(self.model))
        )
        # metrics queued until the next logging step
        self.pending = MetricsBuffer(nan_inf_filter=self.args.logging_nan_inf_filter)
        self.control = TrainerControl()
        self.callback_handler = CallbackHandler(  # trackers first, as transformers' Trainer
            [*tracker_callbacks(self.args.report_to), *(callbacks or [])],
            model=self.model,
            processing_class=self.processing_class,
            optimizer=self.optimizer,
            lr_scheduler=self.scheduler,
        )
        dist.seed_process(self.args.seed, self.world)  # a sampling stream per process
        self._event("on_init_end")

    # ---- callbacks (transformers' TrainerCallback contract) -----------------------------------
    def add_callback(self, callback: Any) -> None:
        """Add a `TrainerCallback` instance, or a class to instantiate."""
        self.callback_handler.add(callback)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return the first callback of that class, or that instance (None if absent)."""
        return self.callback_handler.pop(callback)

    def remove_callback(self, callback: Any) -> None:
        """Remove the first callback of that class, or that instance."""
        self.callback_handler.remove(callback)

    # =============================================================================================
    # The loop
    # =============================================================================================
    def train(self, resume_from_checkpoint: bool | str | None = None) -> TrainOutput:
        """Run GRPO until `max_steps` optimizer steps; resume from a checkpoint if asked.

        Args:
            resume_from_checkpoint: True = the newest `checkpoint-N` in `output_dir` that
                verifies (newer ones that do not are skipped with a warning); a path = that
                checkpoint; None/False = start fresh, which an `output_dir` holding checkpoints
                refuses unless `overwrite_output_dir`. A resume whose config changes the
                optimisation is refused unless `resume_config_changes="apply"` (`train.resume`).

        Returns:
            transformers' `TrainOutput` (as TRL's trainer returns it): `global_step`,
            `training_loss` (the mean loss of this call's optimizer steps; NaN/inf steps left
            out) and `metrics` (`train_runtime`, `train_samples_per_second` (completions),
            `train_steps_per_second`, `train_loss`, `epoch`). The full state is `self.state`.

        Raises:
            CheckpointError: no usable checkpoint, or a fresh run into another run's folder.
            ResumeConfigError: the config changes the optimisation (a `CheckpointError`).
        """
        cfg = self.args
        self._maybe_resume(resume_from_checkpoint)
        if not self.world.deepspeed:  # the engine holds its own state
            optimizers.allocate_state(self.optimizer)
        run_log: RunLogger | SilentRunLogger = SilentRunLogger()
        if self.world.is_main_process:  # the one process that writes
            Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
            ckpt.write_text_atomic(
                Path(cfg.output_dir) / ckpt.GRPO_CONFIG,
                json.dumps(cfg.to_dict(), indent=2, default=str),
            )
            run_log = RunLogger(
                cfg.output_dir,
                total_steps=self.max_steps,
                initial_step=self.state.global_step,
                log_completions=cfg.log_completions,
                run_name=cfg.run_name,
                disable_tqdm=bool(cfg.disable_tqdm),
            )
        num_rounds = math.ceil(self.max_steps / cfg.steps_per_round)
        started, first_step = time.perf_counter(), self.state.global_step
        self._step_losses: list[float] = []  # each optimizer step's loss, for the TrainOutput
        restart = guards.RoundStart.capture(self.state)  # where Ctrl-C rewinds to
        self._event("on_train_begin")
        try:
            if cfg.eval_on_start:
                self._log(run_log, self.evaluate())
            for _ in range(self.state.global_step // cfg.steps_per_round, num_rounds):
                if self.control.should_training_stop:
                    break
                restart = guards.RoundStart.capture(self.state)
                self._training_round(run_log)
            if cfg.load_best_model_at_end:
                self._load_best_model()
            self._event("on_train_end")
        except KeyboardInterrupt as interrupt:
            raise self._save_on_interrupt(restart) from interrupt
        finally:
            run_log.close()
        return self._train_output(first_step, time.perf_counter() - started)

    def _training_round(self, run_log: RunLogger | SilentRunLogger) -> None:
        """One generation round: rollouts, `num_iterations` passes of optimizer steps over them,
        then metrics, evaluation and checkpoints."""
        cfg = self.args
        round_start, first_step = time.perf_counter(), self.state.global_step
        first_epoch = self.state.epoch or 0.0
        timings: dict[str, float] = {}
        self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        self._event("on_step_begin")  # the round's first step begins with its rollouts (as TRL)

        # ---- ALGO: rollouts ----------------------------------------------------------------
        self.kept_memory.before_generation()
        rollout, sampling_metrics = self.collect_rollouts(timings)
        with _timer(timings, "time/rewards", self.device):
            adv = self.advantages(rollout.rewards)
        gen = rollout.gen
        with _timer(timings, "time/logprobs", self.device):
            batch = self.build_rollout_batch(gen, adv.advantages)

        # ---- ALGO: policy update ----------------------------------------------------------
        with _timer(timings, "time/training", self.device):
            train_metrics = self.update_policy(batch)
        self._step_losses.extend(train_metrics.get("loss", []))

        # ---- Plumbing: metrics, evaluation, checkpoints -----------------------------------
        rollout_metrics, completion_tokens = self._rollout_metrics(gen, adv.metrics)
        step_time = max(time.perf_counter() - round_start, 1e-9)
        self.pending.add(
            {
                **rollout_metrics,
                **sampling_metrics,
                **timings,
                "step_time": step_time,
                "tokens_per_second": completion_tokens / step_time,
            }
        )
        self.pending.extend(train_metrics)
        # when to log, evaluate and save
        default_flow(cfg, self.state, self.control, first_step, first_epoch)
        rows = self._log_completions(run_log, rollout, adv)
        self._log_evaluate_save(run_log)
        if rows and self.world.is_main_process:  # after the step's metrics, as TRL
            names = [fn.name for fn in self.reward_funcs]
            table = completions_table_columns(
                self.state.global_step, rows, names, unique_prompts=cfg.log_unique_prompts
            )
            log_completions_table(cfg.report_to, self.state.global_step, table)

    # =============================================================================================
    # Steps of the algorithm
    # =============================================================================================
    def collect_rollouts(
        self, timings: dict[str, float] | None = None
    ) -> tuple[ScoredRollout, dict[str, float]]:
        """The generation batch: B prompts, G scored completions each (N = B*G rows).

        With `dynamic_sampling` (DAPO, arXiv 2503.14476 §3.2), groups whose G rewards are all
        equal (advantage 0, no policy gradient) are dropped and more prompts are drawn, as many
        as groups are still missing, until all B groups have varied rewards or
        `max_dynamic_sampling_draws` extra draws are used up; then the batch is completed with
        dropped groups (advantage 0, as without dynamic sampling) and a warning is logged.

        With several processes each fills its own share of `B / P` groups: an extra draw reads
        every process's shortfall from the shared prompt order and hands it out in rank order
        (`PromptDrawer.draw_shares`), so a process whose share is full takes no prompts but
        still draws with the others. Whether to draw again is decided on the shortfalls of all
        (gathered once per draw), so every process makes the same number of draws and
        collective calls; a process still short when the cap is reached completes its share
        with its own dropped groups. The global draws are those one process would make.

        Args:
            timings: Seconds spent are added to its `time/generation` and `time/rewards`.

        Returns:
            `(rollout, metrics)`: this process's rows; with dynamic sampling, `dynamic_sampling/*`
            metrics for the round (docs/METRICS.md), counts summed over the processes, else none.
        """
        cfg, world = self.args, self.world
        timings = {} if timings is None else timings
        g, share = cfg.num_generations, cfg.prompts_per_process
        rollout = self.draw_rollouts(cfg.prompts_per_generation, timings)
        if not cfg.dynamic_sampling:
            return rollout, {}
        kept: list[ScoredRollout] = []
        dropped: list[ScoredRollout] = []
        drawn = num_kept = extra_draws = 0
        while True:
            if rollout.rewards.shape[0]:  # none when this process's share was already full
                with _timer(timings, "time/rewards", self.device):
                    equal = self.equal_reward_groups(rollout.rewards)  # [b]
                drawn += len(equal)
                kept.append(rollout.select_groups(torch.nonzero(~equal).view(-1), g))
                dropped.append(rollout.select_groups(torch.nonzero(equal).view(-1), g))
                num_kept += int((~equal).sum())
            missing = [share - held for held in world.gather_objects(num_kept)]  # per process
            if not sum(missing) or extra_draws == cfg.max_dynamic_sampling_draws:
                break
            extra_draws += 1
            rollout = self.draw_rollouts(sum(missing), timings, shares=missing)
        fill = share - num_kept
        if fill:
            reserve = concatenate_rollouts(dropped, self._pad_token_id)
            kept.append(reserve.select_groups(torch.arange(fill), g))
        counts = world.gather(torch.tensor([[drawn, num_kept, fill]]))  # [P, 3] per process
        metrics = _dynamic_sampling_report(counts, extra_draws, share, world)
        return concatenate_rollouts(kept, self._pad_token_id), metrics

    def draw_rollouts(
        self,
        num_prompts: int,
        timings: dict[str, float] | None = None,
        *,
        shares: Sequence[int] | None = None,
    ) -> ScoredRollout:
        """Sample `num_prompts` prompts, generate G completions each, decode and score them
        (seconds added to `timings`' `time/generation` and `time/rewards`). What the reward
        functions log goes with it (`log_extra` columns) or to the next log line (`log_metric`:
        each scoring call's mean, as TRL).

        With several processes `num_prompts` is split evenly, or as `shares` says (every
        process's count, summing to `num_prompts`; see `sample_prompts`). A process whose share
        is 0 gets an empty rollout (N = 0)."""
        timings = {} if timings is None else timings
        with _timer(timings, "time/generation", self.device):
            prompts, prompt_ids, columns = self.sample_prompts(num_prompts, shares=shares)
            if not prompt_ids:
                return self.rollout.empty()
            gen = self.generate(prompt_ids)
        with _timer(timings, "time/rewards", self.device):
            completions, completion_id_lists = self.decode(prompts, gen)
            columns = reward_columns(columns, gen, self.environments or [])
            reward_log = RewardLog()
            rewards = self.score(
                prompts, completions, completion_id_lists, columns, reward_log=reward_log
            )  # [N, K]
        self.pending.add(reward_log.batch_metrics(), mean=True)
        return ScoredRollout(
            prompts, columns, completions, completion_id_lists, rewards, gen, extra=reward_log.extra
        )

    def equal_reward_groups(self, rewards: Tensor) -> Tensor:
        """`[b]` bool: which of the b groups of `rewards` (`[b*G, K]`, this process's) have
        advantage 0 throughout, i.e. equal rewards, the groups dynamic sampling drops.

        Decided on this process's rows alone (a group is whole on one process, and whether its
        advantages are 0 does not depend on the other groups), with no collective call, so the
        processes may hold different numbers of groups while they draw.
        """
        cfg = self.args
        adv = group_advantages(
            rewards,
            cfg.num_generations,
            reward_weights=cfg.reward_weights,
            scale_rewards=cfg.resolved_scale_rewards,
            multi_objective_aggregation=cfg.multi_objective_aggregation,
        )
        return (adv.advantages.view(-1, cfg.num_generations) == 0).all(-1)

    def advantages(self, rewards: Tensor) -> AdvantageOutput:
        """Group advantages `[N]` (and reward metrics) of `[N, K]` rewards, per the config.

        With several processes every process's rewards are gathered first, so the group
        statistics, `scale_rewards="batch"` and the reward metrics are those of the global
        generation batch; the returned `advantages` and `rewards` are this process's N rows.
        """
        cfg = self.args
        adv = group_advantages(
            self.world.gather(rewards),  # [P*N, K]
            cfg.num_generations,
            reward_weights=cfg.reward_weights,
            scale_rewards=cfg.resolved_scale_rewards,
            multi_objective_aggregation=cfg.multi_objective_aggregation,
        )
        if not self.world.is_distributed:
            return adv
        own = self.world.own_rows(rewards.shape[0])
        return adv._replace(advantages=adv.advantages[own], rewards=adv.rewards[own])

    def sample_prompts(
        self, num_prompts: int | None = None, *, shares: Sequence[int] | None = None
    ) -> tuple[list[Any], list[list[int]], dict[str, list[Any]]]:
        """Draw prompts, render and tokenize them, and enforce `max_prompt_length`.

        Args:
            num_prompts: How many (default B = `prompts_per_generation`); prompts skipped by the
                length policy are replaced by further draws.
            shares: With several processes, every process's count of an uneven draw (the same
                list on every process, summing to `num_prompts`; dynamic sampling's
                shortfalls); a collective call. None = `num_prompts` split evenly.

        With several processes `num_prompts` is a global count: this process gets its share
        (`train.prompt_drawer`), which the counts below are then.

        Returns:
            `(prompts, prompt_ids, columns)`: `num_prompts * G` prompts (each repeated G times,
            for the reward functions; with environments, each with its environment's `reset`
            text), `num_prompts` token-id lists (with environments one per rollout,
            `num_prompts * G`), and every other column repeated G times.
        """
        wanted = self.args.prompts_per_generation if num_prompts is None else num_prompts
        pipeline = self.rollout
        if shares is None:
            batch = self.prompt_drawer.draw(pipeline, self.state, wanted)
        else:
            batch = self.prompt_drawer.draw_shares(pipeline, self.state, shares)
        self._prompt_rows, self.environments = batch.rows, batch.environments or None
        prompts, columns = pipeline.repeat(batch.rows)
        return batch.prompts or prompts, batch.prompt_ids, columns

    def generate(self, prompt_ids: list[list[int]]) -> GenerationOutput:
        """Sample G completions per prompt with the generation engine (under autocast); with
        environments, one per rollout; with a `rollout_func`, by it."""
        with self.autocast():
            return self.rollout.generate(
                prompt_ids, rows=self._prompt_rows, environments=self.environments
            )

    def decode(
        self, prompts: list[Any], gen: GenerationOutput
    ) -> tuple[list[Any], list[list[int]]]:
        """Decode completions into the prompts' format and per-row token-id lists (up to EOS)."""
        return self.rollout.decode(prompts, gen)

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
        *,
        reward_log: RewardLog | None = None,
    ) -> Tensor:
        """Rewards `[N, K]` (NaN = does not apply) from every reward function; what they log
        with `log_metric` / `log_extra` goes to `reward_log`."""
        return self.rollout.score(
            prompts,
            completions,
            completion_ids,
            columns,
            trainer_state=self.state,
            reward_log=reward_log,
        )

    def build_rollout_batch(self, gen: GenerationOutput, advantages: Tensor) -> RolloutBatch:
        """The training batch; old log-probs only when off-policy, ref log-probs only if beta."""
        cfg = self.args
        loss_mask = gen.model_mask.clone()  # [N, T] 1 = a token the model wrote; tools' are 0
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
        if cfg.is_off_policy and not self._old_logprobs_in_first_pass():
            batch.old_logprobs = self.compute_logprobs(self.model, batch)
        if self.loss_options.beta != 0:
            batch.ref_logprobs = self._ref_logprobs(batch)
        return batch

    @torch.no_grad()
    def compute_logprobs(self, model: Any, batch: RolloutBatch) -> Tensor:
        """Log-probs of the batch's completion tokens under `model`, without gradients.

        The trainer calls it for the old log-probs (when an update is off-policy) and the
        reference log-probs (`beta != 0`); a subclass may override it to observe or replace
        those passes.

        Returns:
            `[N, T]` float32 on the CPU, 0 at padding; computed `per_device_train_batch_size`
            rows at a time, each micro-batch trimmed to its own padding.
        """
        # Filled on the device and copied back once: a copy per micro-batch would wait for it.
        out = torch.zeros(batch.completion_ids.shape, dtype=torch.float32, device=self.device)
        size = self.args.per_device_train_batch_size
        # Without gradients nothing is recomputed: the policy's layers run unchecked, which
        # keeps the key/value cache the shared prompts need (prompt_sharing_supported).
        with self.layer_recompute.off(model is self.model):
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
                        share_prompts=self.share_prompts,
                        agree=self._prompt_agreement,
                    )
                out[rows, :t] = logprobs
        return out.cpu()

    def update_policy(self, batch: RolloutBatch) -> dict[str, list[float]]:
        """`num_iterations` passes of optimizer steps over the batch; returns per-step metrics."""
        cfg = self.args
        rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        metrics: dict[str, list[float]] = defaultdict(list)
        first_step = self.state.global_step
        self.model.train()
        for iteration in range(cfg.num_iterations):
            for start in range(0, batch.size, rows_per_step):
                if self.state.global_step >= self.max_steps:
                    return metrics
                if self.state.global_step > first_step:  # the first began before the rollouts
                    self._event("on_step_begin")
                capture = None
                if iteration == 0 and self._old_logprobs_in_first_pass():
                    capture = batch.completion_ids.new_zeros(
                        batch.completion_ids.shape, dtype=torch.float32, device=self.device
                    )  # filled on the device: no copy back per micro-batch
                # The sampler's copies of the weights this step changes are re-made after it.
                discard = getattr(self.engine, "discard_trainable_copies", None)
                if callable(discard):
                    discard(self.model)
                # Ctrl-C waits for the step in progress, so it is never half-applied (guards.py).
                with guards.interrupts_deferred():
                    step_metrics = self.optimizer_step(
                        batch, range(start, start + rows_per_step), capture
                    )
                    if capture is not None:
                        batch.old_logprobs = capture.cpu()  # [N, T]; rows never trained stay 0

                    # ---- the step is taken: count it; the sampler and reference follow ----
                    self.state.global_step += 1
                    self.state.epoch = self.sampler.epochs_done
                    with (
                        _timer(step_metrics, "time/weight_sync", self.device),
                        # ZeRO-3: what the engine reads is gathered (`_sync_parameters`)
                        self.world.whole_parameters(self.model, self._sync_parameters()),
                    ):
                        self.engine.update_weights(self.model)
                    if (
                        cfg.sync_ref_model
                        and self.state.global_step % cfg.ref_model_sync_steps == 0
                    ):
                        self._sync_ref_model()
                self._event("on_step_end")
                for key, value in step_metrics.items():
                    metrics[key].append(value)
                if self.control.should_training_stop:
                    return metrics
        return metrics

    def optimizer_step(
        self, batch: RolloutBatch, rows: range, capture: Tensor | None = None
    ) -> dict[str, float]:
        """One optimizer step on `rows` of the batch: accumulate the gradient of the step's loss
        over its micro-batches, clip it, step the optimizer and the schedule, zero the gradients.

        Args:
            batch: The rollout batch.
            rows: The step's rows (`per_device_train_batch_size * gradient_accumulation_steps`).
            capture: Optional `[N, T]` tensor the micro-batches' log-probs (detached) are
                written into.

        With entropy regularisation, each micro-batch's loss also gets `- coef *
        entropy_weight * entropy_bonus`, where `coef` is the coefficient the previous step left
        (`core.entropy.EntropyRegularization.applied`), and after the step the adaptive
        coefficient moves by the step's token-weighted mean entropy (kept in `self.state`).

        Returns:
            The step's metrics: `loss`, `grad_norm`, `learning_rate`, the loss metrics reduced
            over its micro-batches, `time/forward_backward` and `time/optimizer`; with entropy
            regularisation also `policy_loss` (the loss without the entropy term) and
            `entropy_coef` (the coefficient for the next step).
        """
        started = time.perf_counter()
        entropy, world = self.entropy_regularization, self.world
        size = self.args.per_device_train_batch_size
        place = {"num_processes": world.num_processes, "process_index": world.process_index}
        # The loss normalisers count the global step: every process's rows (microbatch.py).
        chunk_tokens = world.sum(chunk_loss_tokens(batch.loss_mask, rows, size, **place))
        plan = plan_micro_batches(
            batch.advantages,
            batch.completion_mask,
            batch.loss_mask,
            rows,
            size,
            self.loss_options,
            skip_zero_advantage=self.skip_zero_advantage,
            bucket_by_length=self.bucket_by_length,
            entropy_bonus=entropy.enabled,
            chunk_tokens=chunk_tokens,
            max_tokens=self.max_forward_tokens,
            prompt_mask=batch.prompt_mask,
            prompt_groups=batch.prompt_groups() if self._plans_shared_prompts() else None,
            share_up_to=self.activation_bound.keep_up_to,
            **place,
        )
        if world.is_distributed:  # as many backward passes on every process
            # DeepSpeed's engine steps on the gradients of at least one backward pass: with no
            # row to train, a zero-weight one gives the zero gradient the plain path steps on.
            plan = pad_plan(plan, rows, max(world.max(len(plan)), int(world.deepspeed)))
        # TRL's entropy regularisation (core.entropy): an adaptive coefficient is the one the
        # last step left; a fixed one is the config's.
        coef = entropy.coef
        if entropy.adaptive and self.state.entropy_coef is not None:
            coef = self.state.entropy_coef
        applied_coef = entropy.applied(coef, self.state.last_step_entropy)
        # Each micro-batch's loss values, read back once after the last backward: reading each
        # (`.item()`) would wait for its backward on a GPU.
        parts: list[Tensor] = []
        micro_metrics: dict[str, list[Tensor]] = defaultdict(list)
        for i, micro in enumerate(plan):  # step loss = sum of loss_weight * micro-batch loss
            self.kept_memory.before_phase()  # what the last phase or micro-batch kept
            part = select_rows(batch, micro.rows)
            # Gradients are synchronised across processes by the step's last backward only.
            last = i == len(plan) - 1
            with world.gradient_sync(self.train_model, sync=last):
                part_loss = self.micro_batch_loss(
                    part, micro.num_items_in_batch, padding=micro.padding
                )
                policy = loss = part_loss.loss * micro.loss_weight
                bonus, tokens = part_loss.entropy_bonus, part_loss.entropy_tokens
                if bonus is not None and tokens is not None:
                    loss = loss - applied_coef * micro.entropy_weight * bonus
                world.backward(loss, self.train_model, last=last)  # DDP / FSDP2 / ZeRO average
            if micro.padding:
                continue
            parts.append(_step_values(loss, policy, bonus, tokens))
            if capture is not None:
                logprobs = part_loss.logprobs
                capture[micro.rows, : logprobs.shape[1]] = logprobs.float()
            for key, value in part_loss.metrics.items():
                micro_metrics[key].append(value)
        step_loss, policy_part, entropy_sum, entropy_tokens = _step_sums(parts)
        if world.is_distributed:  # the global step's: sums of the processes' shares
            sums = torch.tensor([step_loss, policy_part, entropy_sum, entropy_tokens])
            step_loss, policy_part, entropy_sum, entropy_tokens = world.sum(sums.double()).tolist()
        if not plan:  # every row had zero advantage: a zero gradient, as the plain path gives
            for param in self.model.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
        backward_done = time.perf_counter()
        self.kept_memory.before_phase()  # the activations' blocks, before the optimizer's state
        grad_norm = self._update(step_loss)
        synchronize(self.device)  # the optimizer's kernels count in its time, not the next phase's
        out = reduce_metrics({k: [v.item() for v in vs] for k, vs in micro_metrics.items()})
        if entropy.enabled:  # the step's token-weighted entropy moves an adaptive coefficient
            measured = entropy_sum / max(entropy_tokens, 1.0)
            self.state.entropy_coef = entropy.updated(coef, measured)
            self.state.last_step_entropy = measured
            out.update({"policy_loss": policy_part, "entropy_coef": self.state.entropy_coef})
        out.update(
            {
                "loss": step_loss,
                "grad_norm": grad_norm,
                "learning_rate": self.scheduler.get_last_lr()[0],
                "time/forward_backward": backward_done - started,
                "time/optimizer": time.perf_counter() - backward_done,
            }
        )
        return out

    def _update(self, step_loss: float) -> float:
        """Clip the step's gradient, step the optimizer and the schedule unless the step is
        non-finite (guards.py), zero the gradients; returns the gradient norm before clipping.

        Under DeepSpeed the engine clips (`gradient_clipping` = `max_grad_norm`), steps and
        zeroes, and itself skips an update whose gradient norm is NaN/inf; the guard then
        counts and reports that skip (and a NaN/inf loss, whose gradient is NaN too) as for
        one process. `on_pre_optimizer_step` comes before the engine's step, skipped or not.
        """
        guard = {"max_consecutive": self.args.max_consecutive_nonfinite_steps, "model": self.model}
        if self.world.deepspeed:
            self._event("on_pre_optimizer_step")
            grad_norm, applied = dist.deepspeed_update(self.train_model)
            guards.skip_nonfinite_update(self.state, loss=step_loss, grad_norm=grad_norm, **guard)
            if applied:
                self._event("on_optimizer_step")
                self.scheduler.step()
            return grad_norm
        grad_norm = clip_grad_norm(self.model, self.args.max_grad_norm)
        skip = guards.skip_nonfinite_update(  # a NaN/inf step applies no update (guards.py)
            self.state, loss=step_loss, grad_norm=grad_norm, **guard
        )
        if not skip:
            self._event("on_pre_optimizer_step")
            self.optimizer.step()
            self._event("on_optimizer_step")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)  # None between steps, as transformers
        return grad_norm

    def micro_batch_loss(
        self, batch: RolloutBatch, num_items_in_batch: Tensor, *, padding: bool = False
    ) -> MicroBatchLoss:
        """`policy_loss` of a micro-batch (all rows of `batch`, padding trimmed to its longest
        row `T'`) with the step's `num_items_in_batch`, and its entropy bonus when entropy
        regularisation is on (`MicroBatchLoss`).

        With several processes and `top_entropy_quantile < 1`, the entropy threshold is the
        quantile over the loss tokens of every process's micro-batch at this place in the plan
        (TRL gathers them); a zero-weight `padding` micro-batch (`pad_plan`) adds none."""
        cfg = self.args
        rows = slice(0, batch.size)
        input_ids, attention_mask, t = batch.trimmed(rows)  # [n, P'+T'], T'
        bound = self.activation_bound
        recompute, kept = bound.recompute, 0  # kept: decoder layers keeping their activations
        if bound.keep_up_to is not None:  # counted only where a forward's size decides
            # agreed: every process takes the largest size (all make this call, or none)
            judged = self.world.max if bound.agreed else int
            # counted shared only where the forward shares them whatever the other processes'
            share = self.share_prompts and self._prompt_agreement is None
            size = judged(forward_tokens(input_ids, attention_mask, t, share_prompts=share))
            recompute = bound.recomputes(size)
            if recompute:  # the last layers keep theirs, as many as keep_up_to tokens' worth
                if share and not self._recomputing_forwards_share():  # every row's prompt
                    size = judged(forward_tokens(input_ids, attention_mask, t, share_prompts=False))
                kept = bound.kept_layers(size)
        with (
            self.layer_recompute.keep(kept if recompute else None),
            self.autocast(recompute=recompute),
        ):
            # asked with the layers' flags as this forward runs
            shares = self._recomputing_forwards_share() if recompute else self._shares_prompts()
            logprobs, entropies = model_completion_logprobs(
                self.train_model,
                input_ids.to(self.device),
                attention_mask.to(self.device),
                t,
                temperature=cfg.temperature,
                compute_entropy=True,
                share_prompts=shares,
                agree=self._prompt_agreement,
            )  # [n, T'] float32 each
        old_logprobs = batch.sliced("old_logprobs", rows, t, self.device)  # [n, T'] or None
        loss_mask = batch.loss_mask[rows, :t].to(self.device)  # [n, T'] 1 = counts in the loss
        sampling_logprobs = batch.sliced("sampling_logprobs", rows, t, self.device)
        is_weights: Tensor | None = None
        is_metrics: dict[str, Tensor] = {}
        if sampling_logprobs is not None and cfg.vllm_importance_sampling_correction:
            # pi_train / pi_rollout at the sampling weights. On-policy, the weights have not moved
            # since sampling, so this forward's log-probs are those of the sampling weights.
            behaviour = old_logprobs if old_logprobs is not None else logprobs.detach()
            is_weights, is_metrics = rollout_importance_weights(
                behaviour,
                sampling_logprobs,
                loss_mask,
                mode=cfg.vllm_importance_sampling_mode,
                clip_min=cfg.vllm_importance_sampling_clip_min,
                clip_max=_or_inf(cfg.vllm_importance_sampling_clip_max),
            )  # [n, T'] detached
        threshold = None
        if self.world.is_distributed and self.loss_options.top_entropy_quantile < 1:
            assert entropies is not None  # computed above
            valid = entropies.new_zeros(0) if padding else entropies.detach()[loss_mask.bool()]
            pooled = self.world.gather_ragged(valid.float())  # [M] every process's loss tokens
            if pooled.numel():
                threshold = top_entropy_threshold(pooled, self.loss_options.top_entropy_quantile)
        loss, metrics = policy_loss(
            logprobs,
            old_logprobs,
            batch.advantages.to(self.device),
            loss_mask,
            self.loss_options,
            ref_logprobs=batch.sliced("ref_logprobs", rows, t, self.device),
            num_items_in_batch=num_items_in_batch,
            entropies=entropies.detach() if entropies is not None else None,
            sampling_logprobs=sampling_logprobs,
            rollout_is_weights=is_weights,
            entropy_threshold=threshold,
        )
        bonus = tokens = None
        if self.entropy_regularization.enabled:
            assert entropies is not None  # computed above
            bonus, tokens = entropy_bonus(entropies, loss_mask, self.loss_options, threshold)
        return MicroBatchLoss(loss, {**metrics, **is_metrics}, logprobs.detach(), bonus, tokens)

    # =============================================================================================
    # Evaluation and saving
    # =============================================================================================
    def evaluate(self) -> dict[str, float]:
        """Generate on `eval_dataset` and score it; returns `eval_`-prefixed reward metrics.

        The training RNG state is saved and restored, so evaluating does not change training.
        With several processes each evaluates its share of the prompts and the rewards are
        gathered, so every process returns the metrics of the whole set. Callbacks get
        `on_evaluate(metrics=...)`.
        """
        if self.eval_dataset is None:
            raise ValueError("evaluate() needs an eval_dataset; pass eval_dataset= to GRPOTrainer.")
        pipeline = self._rollout_pipeline(evaluation=True)
        with self.autocast():
            metrics = evaluate_rewards(
                self.eval_dataset,
                pipeline,
                args=self.args,
                trainer_state=self.state,
                world=self.world,
            )
        self._event("on_evaluate", metrics=metrics)
        return metrics

    def save_model(
        self, output_dir: str | None = None, *, merged: bool | None = None, atomic: bool = False
    ) -> None:
        """Save the model (or LoRA adapter) and tokenizer in Hugging Face format.

        Args:
            output_dir: Target directory (default: `args.output_dir`).
            merged: Under LoRA, save the adapter merged into the base weights (default:
                `args.save_merged`).
            atomic: Write into a temporary folder beside `output_dir`, seal it with a
                manifest (`train.checkpoint.verify_checkpoint` checks it) and rename it into
                place, replacing an existing one: a crash leaves the previous folder or none,
                never a partial one. The folder also holds `trainer_state.json` and
                `grpo_config.json`, as a checkpoint does. For a folder of its own (the
                `grpokit` command's final_model), not the run's output_dir.

        With several processes only the main one writes; every process must call it.

        Raises:
            ConfigError: `atomic` with the run's output_dir, or a folder holding it.
        """
        target = Path(output_dir or self.args.output_dir)
        run_dir = Path(self.args.output_dir).resolve()
        if atomic and (target.resolve() == run_dir or target.resolve() in run_dir.parents):
            raise ConfigError(
                f"save_model(atomic=True) replaces {target} as a whole, which holds the run's "
                f"output_dir ({self.args.output_dir}); save into a folder of its own."
            )
        merged = self.args.save_merged if merged is None else merged
        full = dist.full_state_dict(self.model, self.world)  # gathered shards under FSDP2
        if full is None:
            guards.check_finite_weights(self.model, "the model")
        elif self.world.is_main_process:
            guards.check_finite_state(full, "the model")
        if self.world.is_main_process:
            step = self.state.global_step
            writing = (
                ckpt.atomic_checkpoint(target, step) if atomic else contextlib.nullcontext(target)
            )
            with writing as folder:
                ckpt.save_model(
                    self.model, self.processing_class, folder, merged=merged, state_dict=full
                )
                if atomic:  # sealed like a checkpoint, with the config and state it came from
                    state = json.dumps(self.state.to_dict(), indent=2)
                    (folder / ckpt.TRAINER_STATE).write_text(state)
                    config = json.dumps(self.args.to_dict(), indent=2, default=str)
                    (folder / ckpt.GRPO_CONFIG).write_text(config)
        self.world.barrier()

    def _train_output(self, first_step: int, runtime: float) -> TrainOutput:
        """What `train` returns: transformers' `TrainOutput` for the steps of this call."""
        steps = self.state.global_step - first_step
        losses = [loss for loss in self._step_losses if math.isfinite(loss)]
        loss = sum(losses) / len(losses) if losses else float("nan")
        cfg, runtime = self.args, max(runtime, 1e-9)
        completions = steps * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        metrics = {
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(completions * self.world.num_processes / runtime, 3),
            "train_steps_per_second": round(steps / runtime, 3),
            "train_loss": loss,
            "epoch": self.state.epoch,
        }
        return TrainOutput(self.state.global_step, loss, metrics)

    # ---- what transformers' Trainer offers TRL scripts beyond training ---------------------------
    @property
    def accelerator(self) -> Any:
        """An `accelerate.Accelerator` for the script's own use (`trainer.accelerator.print`,
        `.is_main_process`, `.wait_for_everyone()`, `.unwrap_model`), as TRL's scripts use it:
        under a launcher the one that joined the process group; for a single process one made
        on first use, on the training device. grpokit's loop does not train through it."""
        if self.world.accelerator is not None:
            return self.world.accelerator
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(cpu=self.device.type == "cpu")
        return self._accelerator

    # transformers' own helpers for a script's final metrics: `log_metrics(split, metrics)`
    # prints them, `save_metrics` writes output_dir/{split}_results.json (and all_results.json),
    # `save_state` writes output_dir/trainer_state.json; on the main process only.
    log_metrics = trainer_pt_utils.log_metrics
    save_metrics = trainer_pt_utils.save_metrics
    save_state = trainer_pt_utils.save_state

    def is_world_process_zero(self) -> bool:
        """Whether this is the main process (the one that writes)."""
        return self.world.is_main_process

    def create_model_card(
        self,
        model_name: str | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
    ) -> None:
        """Write output_dir/README.md, a model card naming the base model, the dataset and the
        method (TRL's `create_model_card` arguments); on the main process only."""
        if not self.world.is_main_process:
            return
        base = build.model_name(self.model) or None
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        header = {
            "base_model": base,
            "datasets": [dataset_name] if dataset_name else None,
            "library_name": "transformers",
            "model_name": model_name or Path(self.args.output_dir).name,
            "tags": ["grpokit", "grpo", *tags],
        }
        lines = ["---", *(f"{k}: {json.dumps(v)}" for k, v in header.items() if v), "---", ""]
        lines.append(f"# {header['model_name']}\n")
        lines.append(
            f"A fine-tuned version of {base or 'a causal language model'}"
            + (f" on {dataset_name}" if dataset_name else "")
            + ", trained with GRPO ([DeepSeekMath](https://huggingface.co/papers/2402.03300))"
            f" by grpokit for {self.state.global_step} optimizer steps.\n"
        )
        Path(self.args.output_dir).mkdir(parents=True, exist_ok=True)
        ckpt.write_text_atomic(Path(self.args.output_dir) / "README.md", "\n".join(lines))

    def end(self) -> None:
        """End the run as transformers' `Trainer.end` does; call it last, after saving. The
        trackers already closed at the end of `train`; under a launcher the process group is
        destroyed."""
        if self.world.accelerator is not None:
            self.world.accelerator.end_training()

    def push_to_hub(self, *args: Any, **kwargs: Any) -> None:
        """Not supported (no network here to test it): raises, saying what to do instead.

        Raises:
            ConfigError: always.
        """
        raise ConfigError(
            "GRPOTrainer.push_to_hub: grpokit does not upload to the Hugging Face Hub; save "
            "with trainer.save_model(path) and upload the folder with `hf upload`."
        )

    # =============================================================================================
    # Helpers
    # =============================================================================================
    def autocast(self, *, recompute: bool = False) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this device when enabled and native (`use_bf16`); otherwise a no-op.
        `recompute`: for a training forward whose layers recompute their activations, which keeps
        no cache of weight casts (`DeviceTraits.autocast`)."""
        return self.device_traits.autocast(self.use_bf16, recompute=recompute)

    @property
    def _pad_token_id(self) -> int:
        """The id padding rollouts of different widths are joined with (masked out anyway)."""
        tokenizer = self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
        return int(pad) if isinstance(pad, int) else 0

    @property
    def rollout(self) -> RolloutPipeline:
        """The training generate-and-score path: this trainer's engine, tokenizer, reward
        functions and sampling, G = `num_generations`; `evaluate` uses the same path."""
        return self._rollout_pipeline(evaluation=False)

    def _rollout_pipeline(self, *, evaluation: bool) -> RolloutPipeline:
        return RolloutPipeline.from_config(
            self.args,
            evaluation=evaluation,
            engine=self.engine,
            tokenizer=self.processing_class,
            reward_funcs=self.reward_funcs,
            sampling=self.sampling,
            context_length=self.context_length,
            tool_calling=self.tool_calling,
            environments=self.environment_pool,
            rollout_func=None if self.rollout_func is None else self._call_rollout_func,
        )

    def _call_rollout_func(self, prompts: list[Any]) -> Any:
        """TRL's signature: `rollout_func(prompts, trainer)`."""
        return self.rollout_func(prompts, self)

    def _event(self, event: str, **kwargs: Any) -> None:
        """Call `event` on every callback (they may replace `self.control`)."""
        self.control = self.callback_handler.call(
            event, self.args, self.state, self.control, **kwargs
        )

    def _sync_parameters(self) -> list[Tensor]:
        """The policy's parameters the engine's `update_weights` reads (`TransformersEngine.
        sync_parameters`: the trainable ones and the base weights of the LoRA layers its copy
        holds merged; the trainable ones for another engine). Under ZeRO-3 only these are
        gathered for the weight sync: the engine's copy keeps the frozen weights it was built
        with."""
        reads = getattr(self.engine, "sync_parameters", None)
        if callable(reads):
            return list(reads(self.model))
        return [p for p in self.model.parameters() if p.requires_grad]

    def _ref_logprobs(self, batch: RolloutBatch) -> Tensor:
        if self.is_peft:
            with self.model.disable_adapter():
                return self.compute_logprobs(self.model, batch)
        return self.compute_logprobs(self.ref_model, batch)

    @property
    def _prompt_agreement(self) -> Callable[[bool], bool] | None:
        """Under FSDP2 and DeepSpeed, a forward shares its prompts only where every process's
        does (`World.every`, one all-reduce per forward). FSDP2 and ZeRO-3 gather each layer's
        weights around every call: a shared prompt takes two calls where a plain forward takes
        one, and processes making different calls would wait for each other's gathers forever.
        ZeRO-2 reduces the gradients by their place in a buffer filled in the order the
        backward readies them: processes whose forwards differ in structure would sum
        different parameters' gradients (`build.resolve_activation_bound`'s
        `agree_forwards`). None elsewhere (DDP reduces in buckets of a fixed order)."""
        agrees = self.world.fsdp or self.world.deepspeed
        return self.world.every if agrees and self.share_prompts else None

    def _shares_prompts(self) -> bool:
        """Whether the training forwards pass each prompt once for the rows sharing it: where
        `share_prompts` and the policy supports it (`core.logprobs.prompt_sharing_supported`:
        under transformers' gradient checkpointing too, when non-reentrant); under FSDP2 and
        ZeRO-3 only forwards that keep their activations (`_recomputing_forwards_share`)."""
        return self.share_prompts and prompt_sharing_supported(forward_module(self.train_model))

    def _recomputing_forwards_share(self) -> bool:
        """Whether a training forward whose layers recompute their activations shares its
        prompts: where `_shares_prompts`, on one process, under DDP and DeepSpeed ZeRO-2
        (there where every process's forward does, `_prompt_agreement`, and with the layers
        every process keeps agreed, `ActivationBound.agreed`). Under FSDP2 and ZeRO-3 it
        passes every row's prompt: they gather a layer's weights for its backward when the
        gradient reaches the layer's outputs, and a shared prompt's keys and values leave its
        layers through the cache (under FSDP2 their gradient recomputed a prompt layer whose
        weights were released)."""
        gathers = self.world.fsdp or self.world.zero_stage == 3
        return self._shares_prompts() and not gathers

    def _plans_shared_prompts(self) -> bool:
        """Whether training forwards may share prompts, for planning micro-batches: all of them
        (`_shares_prompts`), or those small enough to keep their activations, which run with
        recomputation off (`ActivationBound.keep_up_to`; the plan's `share_up_to` splits a
        larger micro-batch into such forwards where it can)."""
        kept = self.activation_bound.keep_up_to is not None
        return self._shares_prompts() or (kept and self.share_prompts)

    def _old_logprobs_in_first_pass(self) -> bool:
        """Whether the old log-probs come from the first optimizer step's own forward: off-policy
        only through `num_iterations` (one optimizer step per generation), so that step runs on
        the weights the completions were sampled with, as the separate pass would."""
        cfg = self.args
        return (
            self.old_logprobs_from_first_pass
            and cfg.num_iterations > 1
            and cfg.optimizer_steps_per_generation == 1
        )

    @torch.no_grad()
    def _sync_ref_model(self) -> None:
        """TR-DPO mix-up: ref = alpha * policy + (1 - alpha) * ref."""
        alpha = self.args.ref_model_mixup_alpha
        with self.world.whole_parameters(self.model):  # ZeRO-3 partitions are gathered
            for ref_param, param in zip(
                self.ref_model.parameters(), self.model.parameters(), strict=True
            ):
                whole = whole_tensor(param.detach())  # an FSDP2 shard is gathered
                ref_param.mul_(1 - alpha).add_(whole, alpha=alpha)

    # ---- plumbing: metrics, evaluation, checkpoints --------------------------------------------
    def _rollout_metrics(
        self, gen: GenerationOutput, reward_metrics: dict[str, float]
    ) -> tuple[dict[str, float], float]:
        """Completion-length, token-count, tool and reward metrics of one generation batch (of
        every process), and its completion tokens (tool replies included)."""
        world = self.world
        lengths = world.gather(gen.model_mask.sum(1))  # [P*N]
        truncated = world.gather(gen.is_truncated.long()).bool()  # [P*N]
        tokens = world.sum(
            torch.stack([gen.prompt_mask.sum(), gen.model_mask.sum(), gen.completion_mask.sum()])
        )
        self.state.num_input_tokens_seen += int(tokens[0] + tokens[1])
        metrics = {
            **length_metrics(lengths, truncated),
            **tool_metrics(gen),  # this process's; pooled over the processes when logged
            "num_tokens": float(self.state.num_input_tokens_seen),
            "prompts/over_length": float(self.state.prompts_over_length),
            **name_reward_metrics(reward_metrics, [fn.name for fn in self.reward_funcs]),
        }
        return metrics, float(tokens[2])

    def _log_completions(
        self, run_log: RunLogger | SilentRunLogger, rollout: ScoredRollout, adv: AdvantageOutput
    ) -> list[dict[str, Any]]:
        """`log_completions` at a logging step: every process's `completion_rows` records,
        gathered, written to completions.jsonl and the console table (main process). Returns
        the records ([] when nothing is logged this round)."""
        cfg = self.args
        if not (cfg.log_completions and self.control.should_log):
            return []
        names = [fn.name for fn in self.reward_funcs]
        step = self.state.global_step
        local = completion_rows(
            rollout.prompts,
            rollout.completions,
            rollout.rewards,
            adv.rewards,
            adv.advantages,
            names,
            rollout.extra,
            unique_prompts=cfg.log_unique_prompts,
        )
        rows = [row for part in self.world.gather_objects(local) for row in part]
        run_log.log_completions(
            step,
            rows,
            reward_names=names,
            print_count=cfg.num_completions_to_print,
            seed=cfg.seed + step,
        )
        return rows

    def _log_evaluate_save(self, run_log: RunLogger | SilentRunLogger) -> None:
        """Evaluate, log and checkpoint as the control flags say (`default_flow` and callbacks).

        Evaluation metrics are merged into the round's record; the record goes to metrics.jsonl,
        `state.log_history` and `on_log`.
        """
        self.state.data_epoch, self.state.data_index = self.sampler.epoch, self.sampler.index
        metrics: dict[str, float] = {}
        cfg = self.args
        if self.control.should_log:
            metrics = {
                **self.pending.flush(pool=self.world.gather_lists),
                "epoch": self.state.epoch,
                "train/nonfinite_skipped": float(self.state.nonfinite_skipped),
            }
            if cfg.include_num_input_tokens_seen != "no":
                metrics["num_input_tokens_seen"] = float(self.state.num_input_tokens_seen)
        if self.control.should_evaluate:
            eval_metrics = self.evaluate()
            metrics.update(eval_metrics)
            if update_best_metric(self.state, eval_metrics, cfg) and cfg.save_strategy == "best":
                self.control.should_save = True
        if metrics:
            self._log(run_log, metrics)
        else:
            run_log.advance(self.state.global_step)
        if self.control.should_save:
            if self.state.best_global_step == self.state.global_step:  # this checkpoint is best
                self.state.best_model_checkpoint = str(build.checkpoint_path(cfg, self.state))
            self._save_checkpoint()
            self._event("on_save")

    def _load_best_model(self) -> None:
        """`load_best_model_at_end`: put the best checkpoint's weights into the model (and the
        generation engine), as transformers does before `on_train_end`."""
        path = self.state.best_model_checkpoint
        if path is None:
            logger.warning("load_best_model_at_end: no evaluation was recorded; model unchanged")
            return
        ckpt.verify_checkpoint(path)
        ckpt.load_model_weights(self._checkpoint_views()[0], path)
        with self.world.whole_parameters(self.model):  # ZeRO-3: gathered
            self.engine.update_weights(self.model)
        logger.info(
            "loaded the best model, %s (%s = %s at step %d)",
            path,
            self.args.metric_for_best_model,
            self.state.best_metric,
            self.state.best_global_step,
        )

    def _log(self, run_log: RunLogger | SilentRunLogger, logs: dict[str, float]) -> None:
        """Write `logs` for the current step, add them to `state.log_history`, call `on_log`."""
        run_log.log(self.state.global_step, logs)
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self._event("on_log", logs=logs)

    def _save_checkpoint(self, *, collective: bool = True) -> Path:
        """Write `checkpoint-{global_step}` from the main process; every process's random
        generators go in it. `collective=False` (an interrupted multi-process run, whose other
        processes may be anywhere) writes the main process's part alone."""
        what = f"checkpoint-{self.state.global_step}"
        model, optimizer = self._checkpoint_views()
        if isinstance(model, dist.ShardedModelView):  # FSDP2: gather the whole states first
            model.gather(self.world)
            optimizer.gather(self.world)
            if model.full is not None:
                guards.check_finite_state(model.full, what)
        else:
            guards.check_finite_weights(self.model, what)
        rng_states = self.world.gather_objects(ckpt.rng_state()) if collective else []
        path = build.checkpoint_path(self.args, self.state)
        if self.world.is_main_process:
            path = build.save_trainer_checkpoint(
                self.args,
                self.state,
                model=model,
                tokenizer=self.processing_class,
                ref_model=self.ref_model,
                optimizer=optimizer,
                scheduler=self.scheduler,
                process_rng_states=rng_states[1:],
            )
        if collective:
            self.world.barrier()
        return path

    def _checkpoint_views(self) -> tuple[Any, Any]:
        """The model and optimizer as checkpoints save and load them: themselves, or under
        FSDP2 / DeepSpeed views that gather / scatter the whole states
        (`distributed.ShardedModelView`, `distributed.DeepSpeedModelView`)."""
        if self.world.deepspeed:
            assert self.world.optimizer_groups is not None  # set by `prepare`
            return dist.DeepSpeedModelView(self.model, self.world), dist.DeepSpeedOptimizerView(
                self.train_model, self.optimizer, self.world.optimizer_groups
            )
        if not self.world.fsdp:
            return self.model, self.optimizer
        model = dist.ShardedModelView(self.model)
        return model, dist.ShardedOptimizerView(self.model, self.optimizer)

    def _save_on_interrupt(self, restart: guards.RoundStart) -> guards.TrainingInterrupted:
        """Ctrl-C: checkpoint the last completed optimizer step and say how to resume.

        Before the round's first optimizer step, the round is rewound (its random draws and
        prompts are not used up), so resuming gives the uninterrupted run's weights. After some of
        a multi-step round's steps, the checkpoint is mid-round (resume starts a fresh round).
        With `save_strategy="no"` nothing is written.
        """
        cfg, state = self.args, self.state
        done_in_round = state.global_step - restart.state.global_step
        if done_in_round == 0:
            restart.rewind(state)
        else:  # as _log_evaluate_save would have recorded
            state.epoch = self.sampler.epochs_done
            state.data_epoch, state.data_index = self.sampler.epoch, self.sampler.index
        path = None
        if cfg.save_strategy != "no" and state.global_step > 0:
            # A checkpoint the previous round finished writing at this step is this state.
            latest = ckpt.latest_checkpoint(cfg.output_dir) if done_in_round == 0 else None
            same_step = latest is not None and latest.name == f"checkpoint-{state.global_step}"
            collective = not self.world.is_distributed
            path = latest if same_step else self._save_checkpoint(collective=collective)
        message = guards.interrupt_message(
            state.global_step,
            path,
            output_dir=cfg.output_dir,
            mid_round=0 < done_in_round < cfg.steps_per_round
            and state.global_step < self.max_steps,
        )
        logger.warning(message)
        return guards.TrainingInterrupted(message, path)

    def _maybe_resume(self, resume_from_checkpoint: bool | str | None) -> None:
        path = build.find_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if path is None:
            if self.world.is_main_process:  # may delete an earlier run's checkpoints
                build.prepare_fresh_output_dir(self.args)
            self.world.barrier()
            return
        model, optimizer = self._checkpoint_views()
        state = build.restore_checkpoint(
            path,
            args=self.args,
            model=model,
            ref_model=self.ref_model,
            optimizer=optimizer,
            scheduler=self.scheduler,
            max_steps=self.max_steps,
        )
        dist.restore_process_rng_state(path, state.num_processes, self.world, self.args.seed)
        self.state = self._describe_run(state)
        if not self.args.ignore_data_skip:  # else the prompts start again from the beginning
            self.sampler.restore(self.state.data_epoch, self.state.data_index)

    def _describe_run(self, state: TrainerState) -> TrainerState:
        describe_run(state, self.args, max_steps=self.max_steps, dataset_size=self.sampler.size)
        state.num_processes = self.world.num_processes
        state.is_world_process_zero = self.world.is_main_process
        state.is_local_process_zero = self.world.is_local_main_process
        return state


# =================================================================================================
# Module helpers
# =================================================================================================
class MicroBatchLoss(NamedTuple):
    """What `GRPOTrainer.micro_batch_loss` returns for one micro-batch.

    Attributes:
        loss: The 0-dim `policy_loss` (differentiable).
        metrics: Its detached 0-dim metrics, with the rollout importance-sampling ones.
        logprobs: `[n, T']` detached log-probs of the micro-batch's completion tokens.
        entropy_bonus: The 0-dim differentiable entropy bonus (`core.entropy.entropy_bonus`)
            when entropy regularisation is on, else None.
        entropy_tokens: The number of tokens the bonus averages over (0-dim), or None.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    logprobs: Tensor
    entropy_bonus: Tensor | None = None
    entropy_tokens: Tensor | None = None


def clip_grad_norm(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the gradients of `model`'s trainable parameters to `max_norm` (None or 0 = no
    clipping); returns their total norm before clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    if max_norm:
        return float(whole_tensor(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if any(is_shard(p) for p in params):  # FSDP2 shards: the norm of the whole
        return float(whole_tensor(torch.nn.utils.clip_grad_norm_(params, math.inf)))
    grads = [p.grad.detach().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


def _step_values(
    loss: Tensor, policy: Tensor, bonus: Tensor | None, tokens: Tensor | None
) -> Tensor:
    """A micro-batch's `[loss, policy loss, entropy bonus, entropy tokens]`, `[4]` float64 on its
    device, detached (bonus and tokens 0 without entropy regularisation)."""
    if bonus is None or tokens is None:
        bonus = tokens = loss.new_zeros(())
    return torch.stack([v.detach().double() for v in (loss, policy, bonus, tokens)])


def _step_sums(parts: list[Tensor]) -> tuple[float, float, float, float]:
    """The step's loss, policy loss, entropy sum (bonus x tokens) and entropy tokens from its
    micro-batches' `_step_values`, read back at once and summed in micro-batch order."""
    step_loss = policy_part = entropy_sum = entropy_tokens = 0.0
    for loss, policy, bonus, tokens in torch.stack(parts).tolist() if parts else []:
        step_loss += loss
        policy_part += policy
        entropy_sum += bonus * tokens
        entropy_tokens += tokens
    return step_loss, policy_part, entropy_sum, entropy_tokens


def _dynamic_sampling_report(
    counts: Tensor, extra_draws: int, share: int, world: dist.World
) -> dict[str, float]:
    """The round's `dynamic_sampling/*` metrics from every process's `[drawn, kept, filled]`
    group counts (`counts`, `[P, 3]` in rank order; `share` groups per process), summed; the
    main process warns when groups were filled, naming the processes that filled them."""
    total_drawn, total_kept, total_fill = counts.sum(0).tolist()
    if total_fill and world.is_main_process:
        short = [
            f"process {rank}: {filled} of {share}"
            for rank, (_, _, filled) in enumerate(counts.tolist())
            if filled
        ]
        logger.warning(
            "dynamic sampling: after %d extra draw(s) (max_dynamic_sampling_draws) only %d of "
            "%d prompt groups have varied rewards; the batch is completed with %d group(s) of "
            "equal rewards, which add no policy gradient%s.",
            extra_draws,
            total_kept,
            share * world.num_processes,
            total_fill,
            f" (filled on {', '.join(short)})" if world.is_distributed else "",
        )
    return {
        "dynamic_sampling/extra_draws": float(extra_draws),
        "dynamic_sampling/dropped_groups": float(total_drawn - total_kept - total_fill),
        "dynamic_sampling/filled_groups": float(total_fill),
        "dynamic_sampling/frac_reward_zero_std": (total_drawn - total_kept) / total_drawn,
    }


def _or_inf(bound: float | None) -> float:
    return math.inf if bound is None else bound


@contextlib.contextmanager
def _timer(timings: dict[str, float], key: str, device: torch.device) -> Iterator[None]:
    """Add the block's wall time to `timings[key]`, including the work it queued on `device`."""
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
