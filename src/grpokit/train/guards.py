"""Guards of the training loop: non-finite updates, non-finite weights, and Ctrl-C.

- **Non-finite steps.** An optimizer step whose loss or gradient norm is NaN or inf applies no
  update: no optimizer step, no scheduler step (the learning-rate schedule does not advance), the
  gradients are dropped; `global_step` still counts it, since its rollouts are used up. Each skip
  is warned about with the step and the likely causes and counted in `TrainerState`
  (`train/nonfinite_skipped` in the metrics); `max_consecutive_nonfinite_steps` skips in a row
  stop the run with a `NonFiniteError`.
- **Non-finite weights** are never saved: `check_finite_weights` refuses before a checkpoint or
  the final model is written.
- **Ctrl-C** (`KeyboardInterrupt`): the trainer rewinds to the last completed optimizer step
  (`RoundStart` holds the state and random generators at the start of the generation round), saves
  a checkpoint there, logs one line saying where and how to resume, and raises
  `TrainingInterrupted` (a `KeyboardInterrupt`). Each optimizer step (its forward/backward
  passes, the update, and the step count and weight syncs after it) runs with SIGINT deferred
  (`interrupts_deferred`): an interrupt waits for the step in progress, so it never leaves the
  parameters half updated or an update uncounted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grpokit.errors import UserError
from grpokit.train import checkpoint as ckpt
from grpokit.train.checkpoint import TrainerState

logger = logging.getLogger("grpokit")

LIKELY_CAUSES = (
    "a learning_rate too high (the weights diverge: watch grad_norm and loss in metrics.jsonl), "
    "weights that were already non-finite when loaded, an overflow in half precision (an fp16 "
    "model, or bf16 autocast), or non-finite log-probs from the generation engine"
)


class NonFiniteError(UserError, FloatingPointError):
    """Training produced NaN/inf: too many non-finite steps in a row, or non-finite weights. A
    `UserError`: the fix is in the config (usually a lower `learning_rate`)."""


# =================================================================================================
# Non-finite steps and weights
# =================================================================================================
def skip_nonfinite_update(
    state: TrainerState,
    *,
    loss: float,
    grad_norm: float,
    max_consecutive: int | None,
    model: torch.nn.Module | None = None,
) -> bool:
    """Whether the optimizer step about to be taken must be skipped (non-finite loss or norm).

    Updates `state.nonfinite_skipped` (total) and `state.nonfinite_in_a_row`, and warns with the
    step (`state.global_step + 1`) and the likely causes.

    Args:
        state: The trainer state, before `global_step` counts this step.
        loss: The step's loss (sum of its micro-batch losses).
        grad_norm: The global gradient norm before clipping.
        max_consecutive: Non-finite steps in a row that stop the run; None = never stop.
        model: The policy; when the run stops, the error says whether its weights are finite.

    Raises:
        NonFiniteError: this is the `max_consecutive`-th non-finite step in a row.
    """
    if math.isfinite(loss) and math.isfinite(grad_norm):
        state.nonfinite_in_a_row = 0
        return False
    step = state.global_step + 1
    state.nonfinite_skipped += 1
    state.nonfinite_in_a_row += 1
    what = f"loss={loss}, grad_norm={grad_norm}"
    if max_consecutive is not None and state.nonfinite_in_a_row >= max_consecutive:
        bad = nonfinite_parameters(model) if model is not None else []
        weights = (
            f" The weights themselves hold NaN/inf ({len(bad)} tensors, first {bad[0]!r})."
            if bad
            else ""
        )
        raise NonFiniteError(
            f"training stopped at step {step}: the loss or gradient norm was NaN/inf for "
            f"{state.nonfinite_in_a_row} optimizer steps in a row ({what}; "
            f"max_consecutive_nonfinite_steps={max_consecutive}); none of them updated the "
            f"weights.{weights} Likely causes: {LIKELY_CAUSES}. Lower learning_rate or resume "
            "from an earlier checkpoint."
        )
    limit = "" if max_consecutive is None else f"; the run stops after {max_consecutive} in a row"
    logger.warning(
        "step %d: %s is not finite, so this step's update was skipped (%d skipped so far, %d in a "
        "row%s). Likely causes: %s.",
        step,
        what,
        state.nonfinite_skipped,
        state.nonfinite_in_a_row,
        limit,
        LIKELY_CAUSES,
    )
    return True


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of the parameters of `model` that hold a NaN or an inf."""
    with torch.no_grad():
        return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """Refuse to save `what` (e.g. "the final model") when a parameter is NaN/inf.

    Raises:
        NonFiniteError: naming the first non-finite parameter and how many there are.
    """
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteError(
            f"refusing to save {what}: {len(bad)} parameter tensor(s) hold NaN/inf (first: "
            f"{bad[0]!r}). Likely causes: {LIKELY_CAUSES}. Resume from an earlier checkpoint "
            "with a lower learning_rate."
        )


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """`check_finite_weights` for weights given as a state dict (a sharded model's, gathered).

    Raises:
        NonFiniteError: naming the first non-finite tensor and how many there are.
    """
    bad = [name for name, value in state.items() if not bool(torch.isfinite(value).all())]
    if bad:
        raise NonFiniteError(
            f"refusing to save {what}: {len(bad)} parameter tensor(s) hold NaN/inf (first: "
            f"{bad[0]!r}). Likely causes: {LIKELY_CAUSES}. Resume from an earlier checkpoint "
            "with a lower learning_rate."
        )


# =================================================================================================
# Ctrl-C
# =================================================================================================
class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during `GRPOTrainer.train`, after the trainer saved what it could.

    Attributes:
        checkpoint: The checkpoint to resume from, or None when none was written.
        message: The one line the trainer logged (where it saved, how to resume).
    """

    def __init__(self, message: str, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.message = message
        self.checkpoint = checkpoint


@dataclass
class RoundStart:
    """The trainer state and random generators at the start of a generation round: an interrupt
    before the round's first optimizer step rewinds to them, so the checkpoint then saved is the
    one the uninterrupted run would have written at that step."""

    state: TrainerState
    rng: dict[str, Any]

    @classmethod
    def capture(cls, state: TrainerState) -> RoundStart:
        """A copy of `state` and of every random generator's state."""
        return cls(dataclasses.replace(state), ckpt.rng_state())

    def rewind(self, state: TrainerState) -> None:
        """Put `state` (in place) and the random generators back to the captured values."""
        for field in dataclasses.fields(TrainerState):
            setattr(state, field.name, getattr(self.state, field.name))
        ckpt.set_rng_state(self.rng)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold back SIGINT (Ctrl-C) until the block ends, then raise `KeyboardInterrupt`.

    Only in the main thread and when SIGINT has Python's default handler (another handler, e.g.
    one a user installed, is left alone).
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def interrupt_message(
    step: int, checkpoint: Path | None, *, output_dir: str, mid_round: bool
) -> str:
    """The one line logged on Ctrl-C: where the run stopped, what was saved, how to resume."""
    if checkpoint is None:
        reason = (
            "no optimizer step had completed"
            if step == 0
            else "save_strategy='no' (set save_strategy='steps' to be able to resume)"
        )
        return f"interrupted at step {step}; no checkpoint was written: {reason}."
    config = Path(output_dir) / "config.yaml"
    cli = f"`grpokit train {config} --resume` or " if config.exists() else ""
    note = (
        " (saved mid generation round: the resumed run starts a fresh round)" if mid_round else ""
    )
    return (
        f"interrupted at step {step}; checkpoint at {checkpoint}{note}. Resume with {cli}"
        "`trainer.train(resume_from_checkpoint=True)`."
    )
