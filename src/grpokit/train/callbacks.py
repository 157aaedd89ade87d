"""Callbacks with transformers' `TrainerCallback` contract, the trainer's public hook.

`GRPOTrainer(callbacks=[...])` takes `transformers.TrainerCallback` instances or classes, as
transformers' and TRL's trainers do. Each event is called as
`callback.on_<event>(args, state, control, **kwargs)` with `args` the `GRPOConfig`, `state` the
`TrainerState`, `control` a `transformers.TrainerControl`, and the keyword arguments `model`,
`processing_class`, `optimizer`, `lr_scheduler`, `train_dataloader=None`,
`eval_dataloader=None`, plus `logs=` for `on_log` and `metrics=` for `on_evaluate`. A callback
may return a `TrainerControl` (it replaces the trainer's) or None.

Events of one generation round (with the defaults, one round = one optimizer step):

    on_step_begin            the round's first optimizer step begins with its rollouts (as in TRL,
                             where generation happens inside the step)
    on_pre_optimizer_step    after the backward passes and gradient clipping (as transformers)
    on_optimizer_step        after `optimizer.step()`, before the schedule step and `zero_grad`
    on_step_end              after `global_step += 1`, the sampler and reference-model syncs
    (on_step_begin ... on_step_end for each further optimizer step of the round)
    on_evaluate              when the round evaluates (`metrics=` the eval metrics)
    on_log                   when the round logs (`logs=` the record written to metrics.jsonl)
    on_save                  after a checkpoint is written

around `on_init_end` (end of `GRPOTrainer.__init__`), `on_train_begin` and `on_train_end`. The
`control` flags are honoured at the end of each round: `should_log`, `should_evaluate` and
`should_save` force that action (they are reset when a round begins, and after the action);
`should_training_stop` stops after the current optimizer step, still logging, evaluating and
saving as at the last step.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState

from grpokit.train.config import GRPOConfig
from grpokit.train.run_settings import crossed_multiple, resolve_steps

logger = logging.getLogger("grpokit")

# Flags transformers' CallbackHandler resets when the event that consumes them is called.
_RESET_BY_EVENT = {
    "on_train_begin": "should_training_stop",
    "on_evaluate": "should_evaluate",
    "on_log": "should_log",
    "on_save": "should_save",
}


class CallbackError(RuntimeError):
    """A callback raised; the message names the callback class and the event."""

    def __init__(self, message: str, *, callback: str, event: str) -> None:
        super().__init__(message)
        self.callback = callback
        self.event = event


class CallbackHandler:
    """Calls the trainer's callbacks in order, passing the objects they read.

    Args:
        callbacks: `TrainerCallback` instances or classes (a class is instantiated without
            arguments); None = none.
        **objects: The keyword arguments every event receives (`model`, `processing_class`,
            `optimizer`, `lr_scheduler`, ...).
    """

    def __init__(self, callbacks: list[Any] | None, **objects: Any) -> None:
        self.callbacks: list[TrainerCallback] = []
        for callback in callbacks or []:
            self.add(callback)
        self.objects = {"train_dataloader": None, "eval_dataloader": None, **objects}

    def add(self, callback: Any) -> None:
        """Append a callback (an instance, or a class to instantiate)."""
        instance = callback() if isinstance(callback, type) else callback
        if any(type(cb) is type(instance) for cb in self.callbacks):
            logger.warning("adding a second %s callback", type(instance).__name__)
        self.callbacks.append(instance)

    def pop(self, callback: Any) -> TrainerCallback | None:
        """Remove and return the first callback of that class, or that instance (None if absent)."""
        for cb in self.callbacks:
            if (isinstance(callback, type) and isinstance(cb, callback)) or cb is callback:
                self.callbacks.remove(cb)
                return cb
        return None

    def remove(self, callback: Any) -> None:
        """Remove the first callback of that class, or that instance (nothing if absent)."""
        self.pop(callback)

    def call(
        self, event: str, args: Any, state: Any, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        """Call `event` on every callback; returns the (possibly replaced) control.

        Raises:
            CallbackError: a callback raised (chained to its exception).
        """
        if event in _RESET_BY_EVENT:
            setattr(control, _RESET_BY_EVENT[event], False)
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            try:
                result = method(args, state, control, **self.objects, **kwargs)
            except Exception as err:
                name = type(callback).__name__
                raise CallbackError(
                    f"Callback {name}.{event} raised {type(err).__name__}: {err}",
                    callback=name,
                    event=event,
                ) from err
            if result is not None:
                control = result
        return control


def describe_run(
    state: TrainerState,
    args: GRPOConfig,
    *,
    max_steps: int,
    dataset_size: int | None,
) -> None:
    """Fill the fields of `state` that describe the run, which callbacks read (as transformers'
    Trainer does): `max_steps`, `logging_steps`, `eval_steps`, `save_steps` (fractions of
    `max_steps` resolved to steps), `train_batch_size` and `num_train_epochs`."""
    state.max_steps = max_steps
    state.logging_steps = resolve_steps(args.logging_steps, max_steps)
    eval_steps = args.eval_steps if args.eval_steps is not None else args.logging_steps
    state.eval_steps = resolve_steps(eval_steps, max_steps)
    state.save_steps = resolve_steps(args.save_steps, max_steps)
    state.train_batch_size = args.per_device_train_batch_size
    state.num_train_epochs = math.ceil(args.num_train_epochs)
    if dataset_size:  # the epochs the run's prompts span
        prompts = math.ceil(max_steps / args.steps_per_round) * args.prompts_per_generation
        state.num_train_epochs = -(-prompts // dataset_size)


def default_flow(
    args: GRPOConfig,
    state: TrainerState,
    control: TrainerControl,
    first_step: int,
    first_epoch: float = 0.0,
) -> None:
    """Set `control.should_log|evaluate|save` for a generation round that went from optimizer
    step `first_step` and epoch `first_epoch` to `state.global_step` and `state.epoch`, as
    transformers' `DefaultFlowCallback` does after each step and epoch.

    A "steps" strategy acts when the round crossed a multiple of `logging_steps` / `eval_steps`
    / `save_steps`; an "epoch" strategy when a pass over the training prompts ended in the round
    (`state.epoch`, as `PromptSampler` counts epochs, crossed a whole number). Logging and the
    "steps"/"epoch" evaluations and saves also act at the last step (`max_steps`, or
    `should_training_stop` from a callback); no evaluation happens before `eval_delay` steps
    (epochs with eval_strategy="epoch"). save_strategy="best" saves after an evaluation that
    improves `metric_for_best_model` (`update_best_metric`). Flags a callback already set stay set.
    """
    step, max_steps = state.global_step, state.max_steps
    epoch = state.epoch or 0.0
    done = step >= max_steps or control.should_training_stop
    epoch_ended = math.floor(epoch) > math.floor(first_epoch)

    def due(strategy: str, every: int) -> bool:
        if strategy == "steps":
            return crossed_multiple(every, first_step, step, max_steps)
        return strategy == "epoch" and epoch_ended

    logging_on = args.logging_strategy != "no"
    if (logging_on and due(args.logging_strategy, state.logging_steps)) or done:
        control.should_log = True
    if args.logging_first_step and first_step == 0:
        control.should_log = True
    delay_passed = args.eval_delay <= (epoch if args.eval_strategy == "epoch" else step)
    evaluates = args.eval_strategy != "no" and delay_passed
    if evaluates and (due(args.eval_strategy, state.eval_steps) or done):
        control.should_evaluate = True
    saves = args.save_strategy in ("steps", "epoch")
    if saves and (due(args.save_strategy, state.save_steps) or done):
        control.should_save = True


def update_best_metric(state: TrainerState, metrics: dict[str, float], args: GRPOConfig) -> bool:
    """Record an evaluation in `state.best_metric` / `state.best_global_step` when it improves on
    the best so far (as transformers' Trainer does); returns whether it did.

    Args:
        state: the run's state; `best_model_checkpoint` is set when the checkpoint is saved.
        metrics: the evaluation's `eval_`-prefixed metrics.
        args: `metric_for_best_model` (read as `eval_<name>` when not so prefixed) and
            `greater_is_better`; with no metric, nothing is tracked.

    Raises:
        ValueError: the metric is not among the evaluation's metrics (which are listed).
    """
    name = args.metric_for_best_model
    if name is None:
        return False
    key = name if name.startswith("eval_") else f"eval_{name}"
    if key not in metrics:
        raise ValueError(
            f"metric_for_best_model={name!r}: the evaluation logs no {key!r}; it logs "
            f"{', '.join(sorted(metrics))} (name one with or without the eval_ prefix)."
        )
    value, best = metrics[key], state.best_metric
    if not math.isfinite(value):
        return False
    better = best is None or (value > best if args.greater_is_better else value < best)
    if better:
        state.best_metric, state.best_global_step = value, state.global_step
    return better
