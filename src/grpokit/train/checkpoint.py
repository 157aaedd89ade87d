"""Saving and resuming training state.

A checkpoint is a directory `output_dir/checkpoint-{step}` holding:

- the model (or, under LoRA, the adapter) and the tokenizer in Hugging Face format, loadable with
  `from_pretrained`;
- `optimizer.pt`, `scheduler.pt`: their `state_dict()`s;
- `rng_state.pt`: Python, NumPy and torch (CPU and CUDA) generator states;
- `trainer_state.json`: the optimizer step, the data position and anything else the loop needs;
- `config.json` of the run is the model's; the run's `GRPOConfig` goes to `grpo_config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
GRPO_CONFIG = "grpo_config.json"


@dataclass
class TrainerState(transformers.TrainerState):
    """transformers' `TrainerState` (what callbacks read: `global_step`, `max_steps`, `epoch`,
    `log_history`, `logging_steps`, ...) plus what the loop needs to continue exactly; saved as
    `trainer_state.json`. Reward functions receive it as `trainer_state`.

    Attributes:
        global_step: optimizer steps taken. max_steps: optimizer steps of the whole run.
        epoch: passes over the training prompts so far (fractional; 0 for unsized datasets).
        log_history: every logged record, with its `step`.
        data_epoch, data_index: the prompt sampler's position (epoch, next row in that epoch).
        num_input_tokens_seen: prompt + completion tokens generated so far.
        prompts_over_length: prompts truncated or skipped by `max_prompt_length` so far.
        nonfinite_skipped: optimizer steps skipped for a NaN/inf loss or gradient norm so far.
        nonfinite_in_a_row: how many of the latest optimizer steps in a row were skipped.
    """

    data_epoch: int = 0
    data_index: int = 0
    prompts_over_length: int = 0
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The state as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


def is_peft_model(model: Any) -> bool:
    """Whether `model` is a PEFT wrapper (then only the adapter is saved)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_model(model: Any, tokenizer: Any, path: str | Path, *, merged: bool = False) -> None:
    """Save `model` and `tokenizer` to `path` in Hugging Face format.

    Args:
        model: a `PreTrainedModel` or a PEFT model (its adapter is saved).
        tokenizer: saved next to the weights when not None.
        path: target directory (created).
        merged: under LoRA, save the adapter merged into a copy of the base weights instead.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if merged and is_peft_model(model):
        import copy

        copy.deepcopy(model).merge_and_unload().save_pretrained(path)
    else:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    checkpoint_dir: str | Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
) -> Path:
    """Write everything needed to continue training exactly into `checkpoint_dir`."""
    path = Path(checkpoint_dir)
    save_model(model, tokenizer, path)
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save(scheduler.state_dict(), path / "scheduler.pt")
    torch.save(rng_state(), path / "rng_state.pt")
    (path / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
    (path / GRPO_CONFIG).write_text(json.dumps(config, indent=2, default=str))
    return path


def load_model_weights(model: Any, checkpoint_dir: str | Path) -> None:
    """Load the weights saved by `save_model` back into `model` in place (full model or adapter)."""
    from safetensors.torch import load_file

    path = Path(checkpoint_dir)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter = path / "adapter_model.safetensors"
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter} not found: the checkpoint holds no LoRA adapter.")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No *.safetensors weights in {path}; is it a grpokit checkpoint?")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint {path} does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}. Resume with the same model as the original run."
        )


def load_checkpoint(
    checkpoint_dir: str | Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore model weights, optimizer, scheduler and RNG states; return the trainer state."""
    path = Path(checkpoint_dir)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(
            f"{path} is not a grpokit checkpoint (no {TRAINER_STATE}); "
            "pass a checkpoint-N directory."
        )
    load_model_weights(model, path)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng_state.pt", weights_only=False))
    state: dict[str, Any] = json.loads((path / TRAINER_STATE).read_text())
    return state


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, oldest (smallest N) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", child.name)
        if match and child.is_dir() and (child / TRAINER_STATE).exists():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step in `output_dir`, or None."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def rotate_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Delete the oldest checkpoints so that at most `keep` remain (None = keep all)."""
    if keep is None:
        return
    checkpoints = list_checkpoints(output_dir)
    for old in checkpoints[: max(0, len(checkpoints) - keep)]:
        shutil.rmtree(old)
