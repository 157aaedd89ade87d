"""Saving and resuming training state: atomic, verified checkpoints that load without unpickling.

A checkpoint is a directory `output_dir/checkpoint-{step}` holding:

- the model (or, under LoRA, the adapter) and the tokenizer in Hugging Face format, loadable with
  `from_pretrained` (weights as safetensors);
- `optimizer.pt`, `scheduler.pt`: their `state_dict()`s, loaded with `torch.load(weights_only=True)`
  (tensors and plain containers only; anything else is refused, never unpickled), written without
  torch's zip CRC-32 (the manifest's hash verifies them);
- `rng_state.json`: Python, NumPy and torch (CPU and CUDA) generator states as plain JSON;
  (these three are left out with `save_only_model`: such a checkpoint holds the model, verifies,
  and cannot be resumed from);
- `trainer_state.json`: the optimizer step, the data position and anything else the loop needs;
- `grpo_config.json`: the run's `GRPOConfig`;
- whatever else the trainer adds before sealing (the synced reference model, merged weights);
- `manifest.json`, written last: every other file with its size and SHA-256, the step and the format
  version.

Writing is atomic: everything goes into a hidden sibling `.checkpoint-{step}.tmp-{pid}`, every file
is fsynced, the manifest is written and fsynced, the folder is fsynced and renamed into place, and
the parent folder is fsynced. A crash at any point leaves either the complete checkpoint or no
`checkpoint-{step}` at all (plus a hidden temporary folder, ignored and later removed). Loading
checks the manifest (sizes, then hashes) before reading anything.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from grpokit.errors import UserError

logger = logging.getLogger("grpokit")

CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
GRPO_CONFIG = "grpo_config.json"
MANIFEST = "manifest.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG_STATE = "rng_state.json"
FORMAT_VERSION = 1
"""Version of the checkpoint layout; a checkpoint of another version is refused, not guessed at."""
REQUIRED_FILES = (TRAINER_STATE, GRPO_CONFIG)
# What resuming needs besides the model: all three, or none in a `save_only_model` checkpoint.
RESUME_FILES = (OPTIMIZER, SCHEDULER, RNG_STATE)

_CHECKPOINT_NAME = re.compile(rf"{CHECKPOINT_PREFIX}(\d+)")
# Hidden siblings of a checkpoint or file being written (`tmp`) or of a checkpoint being replaced
# (`old`), named after the writing process.
_TEMPORARY_NAME = re.compile(r"\.(.+)\.(tmp|old)-(\d+)")
_HASH_CHUNK = 1 << 22


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be used: incomplete, corrupted, of another format or unsafe; or
    an output folder or config that does not fit the checkpoints it holds.

    Attributes:
        path: the checkpoint directory. reason: what is wrong with it, in a few words.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"checkpoint {self.path}: {reason}")


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
        model_name_or_path: the policy's `name_or_path` when the run started ("" for a model built
            in memory); a resumed run compares it with its own.
        entropy_coef: the entropy-bonus coefficient for the next step under
            `use_adaptive_entropy` (which moves it); None = `entropy_coef` of the config.
        last_step_entropy: the mean entropy the last optimizer step measured (adaptive entropy
            control); None = none measured yet.
        num_processes: processes the run trains on (a resumed run should have as many).
    """

    data_epoch: int = 0
    data_index: int = 0
    prompts_over_length: int = 0
    nonfinite_skipped: int = 0
    nonfinite_in_a_row: int = 0
    model_name_or_path: str = ""
    entropy_coef: float | None = None
    last_step_entropy: float | None = None
    num_processes: int = 1

    def to_dict(self) -> dict[str, Any]:
        """The state as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


# ---- model weights -------------------------------------------------------------------------------
def is_peft_model(model: Any) -> bool:
    """Whether `model` is a PEFT wrapper (then only the adapter is saved)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def save_model(
    model: Any,
    tokenizer: Any,
    path: str | Path,
    *,
    merged: bool = False,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Save `model` and `tokenizer` to `path` in Hugging Face format.

    Args:
        model: a `PreTrainedModel` or a PEFT model (its adapter is saved).
        tokenizer: saved next to the weights when not None.
        path: target directory (created).
        merged: under LoRA, save the adapter merged into a copy of the base weights instead.
        state_dict: the weights to save in place of the model's own (the whole weights of a
            sharded model, `train.distributed.full_state_dict`).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if merged and is_peft_model(model):
        whole = model.state_dict() if state_dict is None else state_dict
        merged_copy(model, whole).save_pretrained(path)
    else:
        model.save_pretrained(path, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def merged_copy(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A copy of the PEFT model `model` holding the weights `state` (its `state_dict()`, or the
    whole weights gathered from shards or partitions), with its adapters merged into the base
    weights by PEFT (`merge_and_unload`): the plain model the adapter trained. `model` and the
    tensors of `state` are left as they are.

    The copy is laid out on the meta device from the base model's class and config, wrapped with
    the same adapter configs, and given copies of `state`'s tensors (their dtypes kept; tensors
    shared by several names stay shared), so `model`'s own parameters are never read: under
    ZeRO-3 or FSDP2 they hold only this process's part.
    """
    from peft import get_peft_model

    base = model.get_base_model()
    configs = dict(model.peft_config)
    first = model.active_adapter if isinstance(model.active_adapter, str) else next(iter(configs))
    with torch.device("meta"):
        clone = get_peft_model(type(base)(base.config), configs.pop(first), adapter_name=first)
        for name, config in configs.items():
            clone.add_adapter(name, config)
    owned: dict[int, torch.Tensor] = {}  # each tensor copied once
    for value in state.values():
        if id(value) not in owned:
            owned[id(value)] = value.detach().to("cpu", copy=True)
    cloned = {key: owned[id(value)] for key, value in state.items()}
    missing, unexpected = clone.load_state_dict(cloned, strict=False, assign=True)
    # tied weights (the output layer sharing the embeddings) are one tensor under one name
    tied = set(getattr(base, "all_tied_weights_keys", None) or {})
    missing = [k for k in missing if not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise ValueError(
            f"the weights do not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; pass the whole state_dict() of this PEFT model."
        )
    merged_base: Any = clone.get_base_model()
    merged_base.tie_weights()
    return clone.merge_and_unload()


def load_model_weights(model: Any, checkpoint_dir: str | Path) -> None:
    """Load the weights saved by `save_model` back into `model` in place (full model or adapter).

    Only `model*.safetensors` (or `adapter_model.safetensors` under LoRA) is read, so other
    safetensors files of a checkpoint (the reference model) are never mistaken for the policy.
    """
    from safetensors.torch import load_file

    path = Path(checkpoint_dir)
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        adapter = path / "adapter_model.safetensors"
        if not adapter.exists():
            raise FileNotFoundError(f"{adapter} not found: the checkpoint holds no LoRA adapter.")
        set_peft_model_state_dict(model, load_file(str(adapter)))
        return
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No model*.safetensors in {path}; is it a grpokit checkpoint?")
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


# ---- random generators ---------------------------------------------------------------------------
def _bytes_to_text(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def _text_to_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop draws from, as a JSON-serialisable dict."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": _bytes_to_text(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_bytes_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore generators saved by `rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    keys = np.asarray(n["keys"], dtype=np.uint32)
    np.random.set_state((n["bit_generator"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(_text_to_bytes(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_bytes(s) for s in state["cuda"]])


# ---- atomic writing ------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_and_hash(file: Path) -> tuple[int, str]:
    """fsync `file` and return its size and SHA-256 (hex)."""
    digest, size = hashlib.sha256(), 0
    with file.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` via a synced temporary file and a rename (never a torn file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _seal(folder: Path, step: int) -> None:
    """fsync every file of `folder`, write the manifest last, fsync the folders."""
    files: dict[str, dict[str, Any]] = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        size, sha256 = _sync_and_hash(file)
        files[file.relative_to(folder).as_posix()] = {"size": size, "sha256": sha256}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files}
    with (folder / MANIFEST).open("w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), reverse=True):
        _fsync_dir(sub)
    _fsync_dir(folder)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # ours: a leftover of an earlier attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_temporary_folders(output_dir: str | Path) -> None:
    """Clean what interrupted writes left in `output_dir`, by processes that are gone.

    A `.NAME.tmp-PID` folder or file is deleted (it never became `NAME`). A
    `.checkpoint-N.old-PID` folder (a checkpoint being replaced when its writer died) is renamed
    back to `checkpoint-N` if that is missing, else deleted.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        match = _TEMPORARY_NAME.fullmatch(child.name)
        if not match or _pid_alive(int(match.group(3))):
            continue
        target = root / match.group(1)
        if match.group(2) == "old" and child.is_dir() and not target.exists():
            logger.warning("restoring %s from the interrupted replacement %s", target, child.name)
            os.rename(child, target)
        elif child.is_dir():
            logger.info("removing %s left by an interrupted checkpoint write", child)
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_checkpoint(checkpoint_dir: str | Path, step: int) -> Iterator[Path]:
    """Yield a temporary folder to write a checkpoint into; seal it and rename it into place.

    On leaving the block without an exception the folder's files are fsynced, `manifest.json` is
    written (last), the folder is fsynced and renamed to `checkpoint_dir` (an existing one is
    replaced), and the parent is fsynced. On an exception the temporary folder is deleted and
    nothing else changes.

    Args:
        checkpoint_dir: the final directory, e.g. `output_dir/checkpoint-12`.
        step: the optimizer step recorded in the manifest.
    """
    target = Path(checkpoint_dir)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_temporary_folders(parent)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
        _seal(tmp, step)
        if target.exists():
            logger.warning("replacing the existing %s", target)
            aside = parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, aside)
            os.rename(tmp, target)
            _fsync_dir(parent)
            shutil.rmtree(aside)
        else:
            os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(
    checkpoint_dir: str | Path,
    *,
    model: Any,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
    model_only: bool = False,
) -> Path:
    """Write everything needed to continue training exactly into `checkpoint_dir`, atomically.

    Args:
        checkpoint_dir: the checkpoint directory (`output_dir/checkpoint-{step}`).
        model, tokenizer, optimizer, scheduler: saved as described in the module docstring.
        trainer_state: the loop's state (`TrainerState.to_dict()`); its `global_step` goes into the
            manifest.
        config: the run's config as a JSON-serialisable dict.
        extra: called with the temporary folder to add files that the checkpoint must include
            (they are sealed with the rest).
        model_only: `save_only_model`: no optimizer, scheduler or RNG state; such a checkpoint
            verifies, but `load_checkpoint` refuses to resume from it.

    Returns:
        `checkpoint_dir` as a `Path`.
    """
    path = Path(checkpoint_dir)
    with atomic_checkpoint(path, int(trainer_state.get("global_step", 0))) as tmp:
        save_model(model, tokenizer, tmp)
        if not model_only:
            with _without_zip_crc():
                torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
                torch.save(scheduler.state_dict(), tmp / SCHEDULER)
            (tmp / RNG_STATE).write_text(json.dumps(rng_state()))
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        (tmp / GRPO_CONFIG).write_text(json.dumps(config, indent=2, default=str))
        if extra is not None:
            extra(tmp)
    return path


def _without_zip_crc() -> contextlib.AbstractContextManager[Any]:
    """`torch.save` without the CRC-32 of each record in its zip file (torch then writes 0 and
    `torch.load` does not check it). The manifest's SHA-256 of every file is what verifies a
    checkpoint before anything is read (`verify_checkpoint`); the CRC would only add another
    pass over the bytes: 0.7 s a GiB on the 2-core Xeon of bench/RESULTS.md. A torch without
    the setting saves as before."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    patch = getattr(config, "patch", None)  # torch's config modules: set within a block
    if patch is None or not hasattr(getattr(config, "save", None), "compute_crc32"):
        return contextlib.nullcontext()
    return patch({"save.compute_crc32": False})


# ---- verifying and loading -----------------------------------------------------------------------
def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise CheckpointError(path, "not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(
            path, f"missing {MANIFEST} (not completely written, or not a grpokit checkpoint)"
        ) from None
    except (ValueError, OSError) as error:
        raise CheckpointError(path, f"unreadable {MANIFEST} ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(
            path, f"format version {version!r}; this grpokit reads version {FORMAT_VERSION}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(path, f"{MANIFEST} lists no files")
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    if match and int(match.group(1)) != manifest.get("step"):
        raise CheckpointError(path, f"{MANIFEST} is of step {manifest.get('step')}")
    return manifest


def _check_listing(path: Path, files: dict[str, Any]) -> None:
    """Every listed file exists with its size and nothing unlisted is present (cheap: no reads)."""
    resumable = any(name in files for name in RESUME_FILES)  # else written with save_only_model
    for name in REQUIRED_FILES + (RESUME_FILES if resumable else ()):
        if name not in files:
            raise CheckpointError(path, f"{MANIFEST} lists no {name}")
    present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    for name, entry in files.items():
        if name not in present:
            raise CheckpointError(path, f"missing file {name}")
        size = (path / name).stat().st_size
        if size != entry.get("size"):
            raise CheckpointError(
                path, f"torn file {name} ({size} bytes, the manifest says {entry.get('size')})"
            )
    unexpected = sorted(present - set(files) - {MANIFEST})
    if unexpected:
        raise CheckpointError(path, f"unexpected file {unexpected[0]} (not in the manifest)")


def verify_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Check a checkpoint against its manifest: files, sizes, then SHA-256 hashes.

    Returns:
        The manifest.

    Raises:
        CheckpointError: the first problem found (its `reason`: missing manifest, torn file, hash
            mismatch, missing or unexpected file, other format version).
    """
    path = Path(checkpoint_dir)
    manifest = _read_manifest(path)
    files: dict[str, Any] = manifest["files"]
    _check_listing(path, files)
    key, signature = str(path.resolve()), _signature(path, files)
    if _verified.get(key) == signature:
        return manifest
    for name, entry in files.items():
        digest = hashlib.sha256()
        with (path / name).open("rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != entry.get("sha256"):
            raise CheckpointError(path, f"hash mismatch in {name} (modified or corrupted)")
    _verified[key] = signature
    return manifest


# Checkpoints this process has hashed, with the stat signature of their files then: a second
# verification (the CLI's check, then the trainer's load) re-hashes only if a file changed.
_verified: dict[str, tuple[Any, ...]] = {}


def _signature(path: Path, files: dict[str, Any]) -> tuple[Any, ...]:
    stats = [(name, (path / name).stat()) for name in sorted([*files, MANIFEST])]
    return tuple((name, s.st_size, s.st_mtime_ns, s.st_ino) for name, s in stats)


def read_json(checkpoint_dir: str | Path, name: str) -> Any:
    """A JSON file of a checkpoint, with a `CheckpointError` when it cannot be read."""
    path = Path(checkpoint_dir)
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(path, f"unreadable {name} ({error})") from None


def load_torch_file(checkpoint_dir: str | Path, name: str) -> Any:
    """`torch.load(weights_only=True)` of a checkpoint file: tensors and plain containers only.

    Raises:
        CheckpointError: the file holds anything else (it is refused, not unpickled), or is
            unreadable.
    """
    path = Path(checkpoint_dir)
    try:
        return torch.load(path / name, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            path,
            f"{name} holds objects other than tensors and plain containers; grpokit refuses to "
            f"unpickle them (weights_only=True: {first})",
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(path, f"unreadable {name} ({error})") from None


def load_checkpoint(
    checkpoint_dir: str | Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Verify a checkpoint, then restore model weights, optimizer, scheduler and RNG states.

    Args:
        checkpoint_dir: a `checkpoint-N` directory written by `save_checkpoint`.
        model, optimizer: restored in place.
        scheduler: restored in place; None leaves it alone (the caller rebuilds it).

    Returns:
        The saved trainer state (`trainer_state.json`).

    Raises:
        CheckpointError: the checkpoint does not verify or holds something unsafe to load, or it
            holds the model only (`save_only_model=True`): nothing to resume the optimizer from.
    """
    path = Path(checkpoint_dir)
    if OPTIMIZER not in verify_checkpoint(path)["files"]:
        raise CheckpointError(
            path,
            "holds the model only (saved with save_only_model=True), without the optimizer, "
            "scheduler and RNG states that resuming needs; start a new run from its weights "
            "(model=that folder) instead",
        )
    load_model_weights(model, path)
    optimizer.load_state_dict(load_torch_file(path, OPTIMIZER))
    if scheduler is not None:
        scheduler.load_state_dict(load_torch_file(path, SCHEDULER))
    try:
        set_rng_state(read_json(path, RNG_STATE))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise CheckpointError(path, f"malformed {RNG_STATE} ({error!r})") from None
    state: dict[str, Any] = read_json(path, TRAINER_STATE)
    return state


# ---- finding and rotating ------------------------------------------------------------------------
def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` directories of `output_dir`, oldest (smallest N) first, valid or not."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return [p for _, p in sorted(found)]


def newest_valid_checkpoint(output_dir: str | Path) -> tuple[Path | None, list[CheckpointError]]:
    """The newest checkpoint of `output_dir` that verifies, and why each newer one did not.

    Returns:
        `(path or None, errors)`: the errors of the checkpoints skipped, newest first.
    """
    skipped: list[CheckpointError] = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            skipped.append(error)
            continue
        return path, skipped
    return None, skipped


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint of `output_dir` that verifies, or None."""
    return newest_valid_checkpoint(output_dir)[0]


def rotate_checkpoints(
    output_dir: str | Path,
    keep: int | None,
    *,
    protect: str | Path | Sequence[str | Path | None] | None = None,
) -> list[Path]:
    """Delete the oldest checkpoints so that at most `keep` remain (None = keep all).

    Args:
        output_dir: the folder holding `checkpoint-N` directories.
        keep: how many to keep.
        protect: checkpoints never deleted and counted first, e.g. the one just written (the
            newest valid one), even when directories with higher steps exist, and the best one
            (`load_best_model_at_end`); None entries are ignored. When they alone exceed `keep`,
            they are all kept.

    Returns:
        The deleted directories.
    """
    if keep is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    given = [protect] if isinstance(protect, str | Path) else list(protect or [])
    protected = {Path(p).name for p in given if p is not None}
    others = [p for p in checkpoints if p.name not in protected]
    room = keep - (len(checkpoints) - len(others))
    doomed = others[: max(0, len(others) - room)]
    for old in doomed:
        logger.info("save_total_limit=%d: deleting %s", keep, old)
        shutil.rmtree(old)
    return doomed
