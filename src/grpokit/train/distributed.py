"""Training on several processes: this process's place among them, and the few collective
operations the loop needs.

A run launched with `torchrun` or `accelerate launch` has `WORLD_SIZE > 1` in its environment.
`World.from_env` then creates an `accelerate.Accelerator`, which joins the process group the
launcher describes and wraps the model for training in DDP; an accelerate config that asks for
FSDP (version 2) gets the model sharded by `fully_shard` instead (`shard_model`), on CPUs too;
one that asks for DeepSpeed ZeRO-2/3 gets the DeepSpeed engine, configured from the GRPOConfig
(`configure_deepspeed`), which accumulates, clips and steps (`World.backward`,
`deepspeed_update`). Without a launcher (`WORLD_SIZE` unset or 1) the world is `World()`: every
operation returns its input and accelerate is not even imported, so a single process runs
exactly the code and the speed it always had.

What the loop splits, gathers and reduces (docs/DISTRIBUTED.md):

- prompts: every process draws the same global batch from the shared `PromptSampler` and keeps
  its contiguous share (`own_rows`), whole groups of G completions each;
- rewards: gathered (`gather`), so advantages and every batch statistic are those of the global
  batch; each process keeps its rows' advantages;
- loss normalisers: the loss tokens of the global optimizer step (`sum`); the gradients are
  averaged by DDP / FSDP2, which `gradient_scale` compensates;
- metrics: every process's values are pooled before reducing (`gather_lists`); only the main
  process writes files.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from grpokit.engines.weight_sync import gather_by_broadcasts, whole_tensor
from grpokit.errors import ConfigError

logger = logging.getLogger("grpokit")


def launched_num_processes() -> int:
    """Processes of this run as its launcher set them (`WORLD_SIZE`; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def launched_process_index() -> int:
    """This process's rank as its launcher set it (`RANK`; 0 without a launcher)."""
    return int(os.environ.get("RANK", "0") or 0)


def exit_launched_process(code: int) -> None:
    """End a process that a launcher started (`WORLD_SIZE` > 1) with `code` once its work is
    done and its files are closed, skipping interpreter finalization; without a launcher, return.

    At finalization, threads that DeepSpeed and gloo started may still be alive and try to take
    the interpreter lock, which Python ends with `pthread_exit`; inside C++ code that cannot
    unwind this aborts the process ("terminate called without an active exception", exit -6)
    after a successful run, and the launcher then kills the other processes. Logging handlers,
    stdout and stderr are flushed first; `atexit` handlers do not run, so every tracker and
    file must be closed before (the trainer closes its trackers at the end of `train`).
    """
    if launched_num_processes() <= 1:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _asks_for(backend: str) -> bool:
    return os.environ.get(f"ACCELERATE_USE_{backend}", "false").lower() == "true"


DEEPSPEED_STAGES = (2, 3)  # the ZeRO stages grpokit trains with


def check_deepspeed(where: str, stage: Any = None) -> int:
    """The ZeRO stage `where` asks for, after checking that grpokit can run it.

    Args:
        where: What asked for DeepSpeed (e.g. "the accelerate config").
        stage: The ZeRO stage asked for (accelerate's default, 2, when None or "").

    Raises:
        ConfigError: the `deepspeed` package is not installed (`pip install deepspeed`), or a
            ZeRO stage other than 2 or 3.
    """
    stage = 2 if stage in (None, "") else stage
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{where} asks for DeepSpeed ZeRO-{stage}, but the `deepspeed` package is not "
            "installed: `pip install deepspeed` (or launch with DDP, examples/accelerate/"
            "ddp.yaml, or FSDP2, examples/accelerate/fsdp2.yaml)."
        )
    if str(stage) not in {str(s) for s in DEEPSPEED_STAGES}:
        raise ConfigError(
            f"{where} asks for DeepSpeed ZeRO stage {stage}; grpokit trains with ZeRO stage 2 "
            "or 3 (examples/accelerate/zero2.yaml, zero3.yaml); for no sharding launch with DDP "
            "(examples/accelerate/ddp.yaml)."
        )
    return int(stage)


def check_backend_installed() -> int:
    """Refuse an accelerate config for a backend grpokit cannot run, before any model loads.

    `accelerate launch --config_file ...` describes the backend in environment variables
    (`ACCELERATE_USE_DEEPSPEED`, `ACCELERATE_DEEPSPEED_ZERO_STAGE`, `ACCELERATE_USE_FSDP`,
    `FSDP_VERSION`). grpokit trains with DDP, FSDP2 (`fully_shard`) or DeepSpeed ZeRO-2/3.

    Returns:
        The DeepSpeed ZeRO stage asked for, 0 without DeepSpeed.

    Raises:
        ConfigError: FSDP version 1, or DeepSpeed missing or at a stage grpokit does not run
            (`check_deepspeed`).
    """
    if _asks_for("FSDP") and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError(
            "the accelerate config asks for FSDP version 1; grpokit runs FSDP2: set "
            "fsdp_version: 2 in fsdp_config (examples/accelerate/fsdp2.yaml)."
        )
    if _asks_for("DEEPSPEED"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        return check_deepspeed("the accelerate config", stage)
    return 0


@dataclass
class World:
    """The processes of a run and this one's place among them.

    Attributes:
        num_processes: P, processes training together (1 = a plain single-process run).
        process_index: This process's rank in `[0, P)`; rank 0 is the main process.
        local_process_index: Its rank on this machine.
        accelerator: The `accelerate.Accelerator` when `P > 1`, else None.
        fsdp: Shard the model with FSDP2 (`fully_shard`) instead of replicating it (DDP).
        zero_stage: The DeepSpeed ZeRO stage (2: gradients and optimizer state sharded; 3:
            parameters too) when the accelerate config asks for DeepSpeed, else 0.
        optimizer_groups: Under DeepSpeed, the parameters of each of the optimizer's groups as
            they were before the engine flattened them (set by `prepare`).
    """

    num_processes: int = 1
    process_index: int = 0
    local_process_index: int = 0
    accelerator: Any = None
    fsdp: bool = False
    zero_stage: int = 0
    optimizer_groups: list[list[Any]] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, args: Any = None, *, cpu: bool = False) -> World:
        """The world the launcher set up: `World()` for one process, else join the process group
        through an `accelerate.Accelerator` (gloo on CPUs, NCCL on GPUs).

        Args:
            args: The run's `GRPOConfig`: `use_cpu` and the `ddp_*` settings (DDP's
                find_unused_parameters, bucket_cap_mb, broadcast_buffers, static_graph; the
                process group's backend and timeout). None = the defaults.
            cpu: Train on the CPU even when CUDA is available (when `args` is None).

        Raises:
            ConfigError: the launcher's accelerate config asks for a backend that is not
                installed (`check_backend_installed`), or for DeepSpeed with `use_cpu` on a
                machine with CUDA, or a DeepSpeed config that contradicts the GRPOConfig
                (`configure_deepspeed`).
        """
        zero_stage = check_backend_installed()
        if launched_num_processes() <= 1:
            return cls()
        from accelerate import Accelerator

        # grpokit applies bf16 autocast itself (`GRPOConfig.bf16`); accelerate adds none.
        # Without `cpu=True` on a machine without CUDA, accelerate would run a single process.
        # FSDP2 is applied by `prepare` (`fully_shard`), on CPUs too, where accelerate would not
        # run it; the accelerator only joins the process group. DeepSpeed needs `cpu=False`
        # (accelerate would otherwise drop it for DDP); without CUDA it runs on its CPU
        # accelerator, over gloo.
        fsdp = _asks_for("FSDP")
        cpu = bool(args.use_cpu) if args is not None else cpu
        if zero_stage and cpu and torch.cuda.is_available():
            raise ConfigError(
                "use_cpu=True with DeepSpeed on a machine with CUDA: DeepSpeed trains on the "
                "device it finds (CUDA here) whatever accelerate is told; unset use_cpu, or "
                "launch with DDP (examples/accelerate/ddp.yaml) to train on the CPU."
            )
        on_cpu = (cpu or not torch.cuda.is_available()) and not zero_stage
        handlers = _ddp_settings(args, gloo=bool(zero_stage) and not torch.cuda.is_available())
        # DeepSpeed's accumulation steps are the GRPOConfig's (`configure_deepspeed`).
        steps = (
            {"gradient_accumulation_steps": args.gradient_accumulation_steps}
            if (zero_stage and args is not None)
            else {}
        )
        accelerator = Accelerator(
            cpu=on_cpu, mixed_precision="no", kwargs_handlers=handlers, **steps
        )
        if accelerator.num_processes != launched_num_processes():  # never P unaware copies
            raise ConfigError(
                f"the launcher started {launched_num_processes()} processes but accelerate joined "
                f"{accelerator.num_processes} ({accelerator.distributed_type}); check the "
                "accelerate config and the launcher's arguments."
            )
        if zero_stage:
            configure_deepspeed(accelerator, args)
            gather_by_broadcasts_over_gloo()
        cpu_processes = on_cpu or not torch.cuda.is_available()  # DeepSpeed: CPU without CUDA
        hint = arena_hint(fsdp=fsdp, zero_stage=zero_stage, cpu=cpu_processes)
        if hint and accelerator.is_main_process:
            _warn_once(hint)  # once a process, however many trainers it builds
        return cls(
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            local_process_index=accelerator.local_process_index,
            accelerator=accelerator,
            fsdp=fsdp,
            zero_stage=zero_stage,
        )

    # ---- who we are -------------------------------------------------------------------------
    @property
    def is_distributed(self) -> bool:
        """Several processes train together."""
        return self.num_processes > 1

    @property
    def is_main_process(self) -> bool:
        """Rank 0: the one process that writes files, logs and shows progress."""
        return self.process_index == 0

    @property
    def is_local_main_process(self) -> bool:
        """Rank 0 on this machine."""
        return self.local_process_index == 0

    def device(self, use_cpu: bool) -> torch.device:
        """The device this process trains on: the accelerator's (`cuda:<local rank>`) when
        distributed, else CUDA when available and not `use_cpu` (`cuda:<local rank>` for one of
        several processes, as `TrainingArguments.device`), else the CPU."""
        if self.accelerator is not None:
            return torch.device(self.accelerator.device)
        if use_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return (
            torch.device("cuda", self.local_process_index)
            if self.is_distributed
            else torch.device("cuda")
        )

    def own_rows(self, per_process: int) -> slice:
        """This process's share of a global batch made of P consecutive shares of `per_process`
        rows: rows `[rank * per_process, (rank + 1) * per_process)`."""
        return slice(self.process_index * per_process, (self.process_index + 1) * per_process)

    def split(self, count: int) -> slice:
        """This process's contiguous share of `count` items split as evenly as possible (the
        first `count % P` processes hold one more); shares in rank order cover `[0, count)`."""
        base, extra = divmod(count, self.num_processes)
        start = self.process_index * base + min(self.process_index, extra)
        return slice(start, start + base + (self.process_index < extra))

    # ---- the model ----------------------------------------------------------------------------
    @property
    def deepspeed(self) -> bool:
        """The DeepSpeed engine trains the model (ZeRO stage `zero_stage`)."""
        return self.zero_stage > 0

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> Any:
        """The module training forwards go through: `model` itself for one process; the
        accelerator's DDP wrapper (which broadcasts rank 0's weights); with `fsdp`, `model`
        sharded in place by FSDP2 (`fully_shard` on each decoder layer, then on the whole), whose
        parameters become `DTensor` shards: build the optimizer after this; with `deepspeed`,
        the DeepSpeed engine built over `model` and its `optimizer` (build it before this; the
        engine configured by `configure_deepspeed`), which under ZeRO-3 partitions `model`'s
        parameters in place."""
        if self.accelerator is None:
            return model
        if self.fsdp:
            return shard_model(model)
        if self.deepspeed:
            if optimizer is None:
                raise ValueError("DeepSpeed's engine is built over the model and its optimizer.")
            # the parameters of each group, before the engine flattens them (checkpoints)
            self.optimizer_groups = [list(group["params"]) for group in optimizer.param_groups]
            engine, _ = self.accelerator.prepare(model, optimizer)
            return engine
        wrapper = self.accelerator.prepare(model)
        if getattr(wrapper, "static_graph", False) and self.is_main_process:
            logger.warning(STATIC_GRAPH_SYNC)
        return wrapper

    @property
    def gradient_scale(self) -> float:
        """Multiply each process's loss by this before `backward`: DDP averages gradients over
        the P processes, and each process's loss is its share of the global step's loss, whose
        gradient is the sum of the shares' gradients."""
        return float(self.num_processes)

    def gradient_sync(self, model: Any, sync: bool) -> contextlib.AbstractContextManager[Any]:
        """Context for one micro-batch's backward: with `sync` False the gradients only
        accumulate locally (DDP's `no_sync`); the step's last backward synchronises them. A DDP
        wrapper with a static graph synchronises every backward (`STATIC_GRAPH_SYNC`)."""
        if self.accelerator is None or sync or self.deepspeed:  # DeepSpeed: see `backward`
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(model)
        if getattr(model, "static_graph", False):  # DDP's `ddp_static_graph` (see `prepare`)
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss: Tensor, train_model: Any, *, last: bool) -> None:
        """Backward of this process's share of the step's loss (times `gradient_scale`), one
        micro-batch of the step; `last` for the step's last one, whose gradients are
        synchronised. Under DeepSpeed the engine accumulates them (`last` is its gradient
        accumulation boundary) and `loss` is not divided by its accumulation steps: grpokit's
        loss weights already make the step's loss a sum over its micro-batches."""
        if self.deepspeed:
            train_model.set_gradient_accumulation_boundary(last)
            train_model.backward(loss * self.gradient_scale, scale_wrt_gas=False)
        else:
            (loss * self.gradient_scale).backward()

    def whole_parameters(
        self, model: torch.nn.Module, params: list[Tensor] | None = None
    ) -> contextlib.AbstractContextManager[Any]:
        """Context in which `model`'s parameters (or only `params`, some of them: the others
        stay partitioned) hold their whole values (read only): under ZeRO-3 they are gathered
        from their partitions (a collective: every process enters it together), otherwise they
        already do."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        chosen = list(model.parameters()) if params is None else params
        return deepspeed.zero.GatheredParameters(chosen, modifier_rank=None)

    # ---- collectives (identity for one process) ------------------------------------------------
    # Each takes and returns tensors on the caller's device; they travel on the device the
    # process group takes (`collective_device`: NCCL reduces CUDA tensors only).
    def collective_device(self, held_on: torch.device | None = None) -> torch.device:
        """The device the process group's collectives take a tensor held on `held_on` on (None =
        the CPU; `collective_device(backend, device, held_on)`); the CPU for one process."""
        if not self.is_distributed or not torch.distributed.is_initialized():
            return torch.device("cpu")
        device = self.accelerator.device if self.accelerator is not None else "cpu"
        backend = str(torch.distributed.get_backend())
        return collective_device(backend, torch.device(device), held_on)

    def _sent(self, tensor: Tensor) -> Tensor:
        """`tensor` on its `collective_device`, contiguous (a copy when it moves)."""
        return tensor.to(self.collective_device(tensor.device)).contiguous()

    def gather(self, tensor: Tensor) -> Tensor:
        """Every process's `tensor` (same shape on each), concatenated along dim 0 in rank
        order."""
        if not self.is_distributed:
            return tensor
        sent = self._sent(tensor)
        parts = [torch.empty_like(sent) for _ in range(self.num_processes)]
        torch.distributed.all_gather(parts, sent)
        return torch.cat(parts).to(tensor.device)

    def gather_ragged(self, values: Tensor) -> Tensor:
        """Every process's 1-D `values` (lengths may differ), concatenated in rank order."""
        if not self.is_distributed:
            return values
        counts = self.gather(torch.tensor([values.numel()], device=values.device)).tolist()
        width = max(counts)
        if width == 0:
            return values.new_zeros(0)
        padded = values.new_zeros(width)
        padded[: values.numel()] = values
        parts = self.gather(padded).view(self.num_processes, width)
        return torch.cat([parts[rank, :count] for rank, count in enumerate(counts)])

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every process's picklable `obj`, in rank order."""
        if not self.is_distributed:
            return [obj]
        out: list[Any] = [None] * self.num_processes
        torch.distributed.all_gather_object(out, obj)
        return out

    def sum(self, values: Tensor) -> Tensor:
        """The element-wise sum of `values` over the processes (a new tensor)."""
        if not self.is_distributed:
            return values
        total = self._sent(values).clone()
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        return total.to(values.device)

    def max(self, value: int) -> int:
        """The largest `value` over the processes."""
        if not self.is_distributed:
            return value
        top = torch.tensor([value], dtype=torch.long, device=self.collective_device())
        torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
        return int(top)

    def every(self, flag: bool) -> bool:
        """Whether `flag` holds on every process."""
        return self.max(int(not flag)) == 0

    def gather_lists(self, values: dict[str, list[float]]) -> dict[str, list[float]]:
        """Metric values queued on every process, pooled per key (the keys of all processes), so
        that reducing them gives means weighted by each process's count, and true min / max."""
        if not self.is_distributed:
            return values
        pooled: dict[str, list[float]] = {}
        for part in self.gather_objects(dict(values)):
            for key, vals in part.items():
                pooled.setdefault(key, []).extend(vals)
        return pooled

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if self.is_distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Run the block on the main process, then on the others (e.g. writing then reading)."""
        if not self.is_main_process:
            self.barrier()
        yield
        if self.is_main_process:
            self.barrier()


def arena_hint(
    *, fsdp: bool, zero_stage: int, cpu: bool, environ: Mapping[str, str] | None = None
) -> str | None:
    """What to tell a run of gathered weights (FSDP2, DeepSpeed ZeRO-3) on CPU processes
    started without `MALLOC_ARENA_MAX` in their environment (by `accelerate launch` or
    `torchrun` directly; `grpokit train --num_processes N` sets it without CUDA), or None.
    `cpu`: the processes compute on CPUs (collectives over gloo); `environ`: os.environ by
    default.

    gloo's work threads then allocate each gathered weight's buffer in a glibc arena of their
    own, which maps a block above 64 MiB afresh at every collective (`app.launch.
    launch_environment`); glibc reads the variable only when the process starts."""
    environ = os.environ if environ is None else environ
    if not cpu or "MALLOC_ARENA_MAX" in environ or not (fsdp or zero_stage == 3):
        return None
    return (
        "MALLOC_ARENA_MAX is not set for these CPU processes: gloo's threads map each large "
        "gathered weight afresh at every collective (under ZeRO-3 and FSDP2 about 10% of "
        "forward+backward on a 2-core CPU). Launch with MALLOC_ARENA_MAX=1 in the environment "
        "(`grpokit train --num_processes N` sets it on a machine without CUDA)."
    )


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


STATIC_GRAPH_SYNC = (
    "ddp_static_graph=True: every backward pass averages the gradients (no no_sync between "
    "the micro-batches of an optimizer step): torch's DDP with a static graph stops at an "
    "internal assertion in a backward under no_sync (pytorch/pytorch#143580). Averaging at "
    "each backward accumulates the same gradient, with one all-reduce per micro-batch instead "
    "of one per optimizer step; leave ddp_static_graph unset to avoid them."
)
"""Warned once, by the main process, when DDP's wrapper has a static graph
(`World.gradient_sync` then synchronises every backward)."""


def collective_device(
    backend: str, device: torch.device, held_on: torch.device | None = None
) -> torch.device:
    """Where a process group of `backend` (`torch.distributed.get_backend()`) takes a tensor
    held on `held_on` (None = the CPU), for a process training on `device`.

    NCCL (and the other accelerator libraries) reduce only the accelerator's tensors, while the
    loop's counts, rewards and masks are often CPU tensors: they travel on `device`. gloo and
    MPI: the CPU. A group that maps device types to backends (e.g. ``"cpu:gloo,cuda:nccl"``,
    which accelerate sets up for some FSDP runs) leaves a tensor where it is when its device
    type is mapped, else sends it to `device`, or to the CPU when that is not mapped either."""
    held_on = held_on if held_on is not None else torch.device("cpu")
    parts = [part.strip().lower() for part in backend.split(",") if part.strip()]
    if any(":" in part for part in parts):
        served = {part.split(":")[0] for part in parts}
        for candidate in (held_on, device):
            if candidate.type in served:
                return candidate
        return torch.device("cpu")
    if any(part in ("gloo", "mpi") for part in parts):
        return torch.device("cpu")
    return device


def _ddp_settings(args: Any, *, gloo: bool = False) -> list[Any]:
    """accelerate's kwargs handlers for the config's `ddp_*` fields (none left at None); `gloo`:
    the process group's backend when `ddp_backend` does not name one (DeepSpeed on CPUs)."""
    if args is None:
        if not gloo:
            return []
        from accelerate.utils import InitProcessGroupKwargs

        return [InitProcessGroupKwargs(backend="gloo")]
    from datetime import timedelta

    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    ddp = {
        "find_unused_parameters": args.ddp_find_unused_parameters,
        "bucket_cap_mb": args.ddp_bucket_cap_mb,
        "broadcast_buffers": args.ddp_broadcast_buffers,
        "static_graph": args.ddp_static_graph,
    }
    group: dict[str, Any] = {"timeout": timedelta(seconds=args.ddp_timeout)}
    if args.ddp_backend is not None:
        group["backend"] = args.ddp_backend
    elif gloo:
        group["backend"] = "gloo"
    return [
        DistributedDataParallelKwargs(**{k: v for k, v in ddp.items() if v is not None}),
        InitProcessGroupKwargs(**group),
    ]


def seed_process(seed: int, world: World) -> None:
    """Give each process its own sampling stream, reproducible from `seed`: `seed + rank` (as
    TRL's `set_seed(seed, device_specific=True)`). A single process keeps the stream `seed`
    started, so its results do not change."""
    if world.is_distributed:
        from transformers import set_seed

        set_seed(seed + world.process_index)


def check_config_world(args: Any, world: World) -> None:
    """Refuse a `GRPOConfig` whose global sizes were derived for another number of processes
    (it reads `WORLD_SIZE` when built: build it in the launched processes).

    Raises:
        ConfigError: naming both numbers.
    """
    expected = args.per_device_train_batch_size * args.steps_per_generation * world.num_processes
    if args.generation_batch_size != expected:
        built_for = args.generation_batch_size // (
            args.per_device_train_batch_size * args.steps_per_generation
        )
        raise ConfigError(
            f"the GRPOConfig was built for {built_for} process(es) (generation_batch_size="
            f"{args.generation_batch_size}) but this run has {world.num_processes}; build the "
            "config inside the launched processes (torchrun / accelerate launch set WORLD_SIZE)."
        )


def rng_state_file(process_index: int) -> str:
    """The checkpoint file holding process `process_index`'s random generators (rank 0 keeps
    the single-process name, `checkpoint.RNG_STATE`)."""
    from grpokit.train.checkpoint import RNG_STATE

    if process_index == 0:
        return RNG_STATE
    stem, _, suffix = RNG_STATE.rpartition(".")
    return f"{stem}_{process_index}.{suffix}"


def save_process_rng_states(folder: Path, states: Sequence[dict[str, Any]]) -> None:
    """Write the random generators of processes 1, 2, ... (`states`, in rank order, as
    `checkpoint.rng_state` returns them) into the checkpoint being written in `folder`; the
    checkpoint's own `checkpoint.RNG_STATE` is the main process's."""
    for rank, state in enumerate(states, start=1):
        (folder / rng_state_file(rank)).write_text(json.dumps(state))


def restore_process_rng_state(path: Path, saved_processes: int, world: World, seed: int) -> None:
    """After a checkpoint load (which restores `rng_state.pt`, the main process's generators),
    give every other process its own saved generators, and warn when the number of processes
    changed.

    A resumed run continues exactly when it has as many processes as the run that saved. With
    another number the weights, optimizer and prompt position still load, but the global batch
    (`per_device_train_batch_size` x processes) and each process's share of it change, and the
    processes without saved generators start fresh streams from `seed + rank`: the run goes on
    from the same prompt position but does not reproduce the uninterrupted run.
    """
    from grpokit.train.checkpoint import set_rng_state

    if saved_processes != world.num_processes and world.is_main_process:
        warnings.warn(
            f"Checkpoint {path} was written by {saved_processes} process(es) and this run has "
            f"{world.num_processes}: weights, optimizer state and the prompt position are "
            "restored, but the global batch and each process's share of it change and the "
            "sampling streams differ, so the run will not reproduce an uninterrupted one. "
            f"Resume with {saved_processes} process(es) to continue exactly.",
            stacklevel=3,
        )
    if world.process_index == 0:
        return
    file = path / rng_state_file(world.process_index)
    if file.exists():
        set_rng_state(json.loads(file.read_text()))
    else:  # a process the saving run did not have: its own fresh stream
        from transformers import set_seed

        set_seed(seed + world.process_index)


# ---- FSDP2 ---------------------------------------------------------------------------------------
def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard `model` over the process group with FSDP2: each module whose class is one of the
    model's `_no_split_modules` (its decoder layers) is one unit, the rest the root unit (under
    PEFT the base model is one more unit, the wrapper around it the root). Every process must
    hold the same initial weights (they come from the same checkpoint or seed)."""
    from torch.distributed.fsdp import fully_shard

    names = set(getattr(model, "_no_split_modules", None) or [])
    base = getattr(model, "get_base_model", None)
    if not names and callable(base):
        names = set(getattr(base(), "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in names:
            fully_shard(module)
    if callable(base) and base() is not model:
        # A PEFT model's forward calls its base model, and so does a forward that passes the
        # shared prompts once (`core.logprobs`): as a unit of its own the base model gathers
        # its weights (embeddings, final norm, output layer) on either path.
        fully_shard(base())
    fully_shard(model)
    return model


@contextlib.contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


PROMPT_LEARNING = "a prompt-learning PEFT adapter (prompt tuning, prefix tuning, p-tuning)"
VLLM_COLOCATE = (
    "use_vllm with vllm_mode='colocate' (vllm_mode='server' samples from a `grpokit vllm-serve` "
    "server, which every process's pushes keep in step)"
)


def check_fsdp_run(world: World, args: Any, engine: Any, *, prompt_learning: bool) -> None:
    """Refuse what an FSDP2 run cannot do yet, before any step: a prompt-learning PEFT adapter
    (LoRA-style adapters train), vLLM in each process (a vLLM server works), torch_compile, and
    an engine that would sample from the sharded model itself.

    Raises:
        ConfigError: naming the setting and the fix.
    """
    if not world.fsdp:
        return
    refused = [PROMPT_LEARNING] if prompt_learning else []
    if args.use_vllm and args.vllm_mode != "server":
        refused.append(VLLM_COLOCATE)
    if args.torch_compile:
        refused.append("torch_compile")
    sampler = getattr(engine, "sampler_model", None)
    if sampler is not None and sampler is getattr(engine, "model", None):
        refused.append("a TransformersEngine without its own sampler copy (bf16_sampler)")
    if refused:
        raise ConfigError(
            "FSDP2 (the accelerate config's FSDP) does not support yet: "
            + "; ".join(refused)
            + ". Launch with DDP (examples/accelerate/ddp.yaml) for these."
        )


def full_state_dict(model: torch.nn.Module, world: World) -> dict[str, Tensor] | None:
    """The model's whole weights on the CPU: gathered from FSDP2 shards or ZeRO-3 partitions (a
    collective) and kept on the main process (None elsewhere); else None (use the model
    itself)."""
    if world.zero_stage == 3:
        with world.whole_parameters(model):
            if not world.is_main_process:
                return None
            return {
                name: value.detach().cpu().clone() for name, value in model.state_dict().items()
            }
    if not world.fsdp:
        return None
    state = {name: whole_tensor(value.detach()).cpu() for name, value in model.state_dict().items()}
    return state if world.is_main_process else None


class ShardedModelView:
    """An FSDP2 model as the checkpoint code sees a plain one: `save_pretrained` writes the
    whole weights gathered beforehand (`gather`, every process), `load_state_dict` takes whole
    weights and gives each process its shards. Anything else is the model's."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self.full: dict[str, Tensor] | None = None

    def gather(self, world: World) -> None:
        """Gather the whole weights onto the main process (a collective)."""
        self.full = full_state_dict(self._model, world)

    def save_pretrained(self, path: Any, state_dict: Any = None, **kwargs: Any) -> None:
        whole = self.full if state_dict is None else state_dict
        self._model.save_pretrained(path, state_dict=whole, **kwargs)  # type: ignore[operator]

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=strict)
        return set_model_state_dict(self._model, state, options=options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class ShardedOptimizerView:
    """An optimizer over FSDP2 shards as the checkpoint code sees a plain one: `state_dict` is
    the whole state gathered beforehand (`gather`, every process; parameters keyed by name),
    `load_state_dict` takes it and gives each process its shards."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self._model, self._optimizer = model, optimizer
        self.full: dict[str, Any] | None = None

    def gather(self, world: World) -> None:
        """Gather the whole optimizer state onto the main process (a collective)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self._model, self._optimizer, options=options)
        self.full = state if world.is_main_process else None

    def state_dict(self) -> dict[str, Any]:
        assert self.full is not None, "gather() the optimizer state first"
        return self.full

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self._model, self._optimizer, state, options=options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)


# ---- DeepSpeed ZeRO ------------------------------------------------------------------------------
def configure_deepspeed(accelerator: Any, args: Any) -> None:
    """Fill the DeepSpeed config of the accelerate config from the run's `GRPOConfig` (as
    transformers' Trainer fills its "auto" values), before the engine is built.

    - `train_micro_batch_size_per_gpu` = `per_device_train_batch_size`, `gradient_accumulation_
      steps` and `train_batch_size` (their product with the processes): DeepSpeed's bookkeeping.
      grpokit still decides each step's micro-batches and sets the accumulation boundary itself
      (`World.backward`).
    - `gradient_clipping` = `max_grad_norm` (0 = none): the engine clips the global norm of the
      sharded gradients.
    - The model is loaded whole on every process and partitioned when the engine is built:
      transformers is not told about ZeRO-3, so `from_pretrained` does not partition while
      loading (`zero3_init_flag`), and the reference model and the generation engine's copy
      are whole models.

    Raises:
        ConfigError: the DeepSpeed config sets `train_micro_batch_size_per_gpu` or
            `gradient_clipping` to another value than the GRPOConfig's, or enables fp16 / bf16
            (grpokit trains fp32 weights, with bf16 autocast when `bf16`).
    """
    if args is None:
        raise ValueError("configure_deepspeed needs the run's GRPOConfig.")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    micro, steps = args.per_device_train_batch_size, args.gradient_accumulation_steps
    clip = float(args.max_grad_norm or 0.0)
    for key, value, name in (
        ("train_micro_batch_size_per_gpu", micro, "per_device_train_batch_size"),
        ("gradient_clipping", clip, "max_grad_norm"),
    ):
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(
                f"the DeepSpeed config sets {key}={given!r} but the GRPOConfig's {name} is "
                f'{value!r}; set it to "auto" (or leave it out) so grpokit fills it in.'
            )
    for precision in ("fp16", "bf16"):
        if str((config.get(precision) or {}).get("enabled", False)).lower() == "true":
            raise ConfigError(
                f"the DeepSpeed config enables {precision}: grpokit keeps float32 weights and "
                'applies bf16 autocast itself (GRPOConfig.bf16); set mixed_precision: "no" in '
                "the accelerate config and leave fp16 / bf16 out of the DeepSpeed config."
            )
    config["train_micro_batch_size_per_gpu"] = micro
    config["gradient_accumulation_steps"] = steps
    config["train_batch_size"] = micro * steps * accelerator.num_processes
    config["gradient_clipping"] = clip
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def gather_by_broadcasts_over_gloo() -> bool:
    """Have DeepSpeed's blocking all-gathers over gloo run as one broadcast per process
    (`engines.weight_sync.gather_by_broadcasts`). ZeRO-2 gathers the updated weights after
    every optimizer step (`all_gather_into_tensor` of each process's partition into the flat
    weights): on 2 CPU processes 1.9 s a step for SmolLM2-135M's 257 MiB partitions with
    gloo's all-gather, 0.12-0.30 s as broadcasts (bench/RESULTS.md). Asynchronous calls
    (ZeRO-3's layer gathers) and tensors that are not contiguous CPU tensors of one dtype keep
    gloo's all-gather.

    Returns:
        Whether installed: DeepSpeed's communication backend is up and its process group is
        gloo's.
    """
    try:
        from deepspeed.comm import comm as ds_comm
    except ImportError:
        return False
    backend = getattr(ds_comm, "cdb", None)
    original = getattr(backend, "all_gather_function", None)
    if original is None or getattr(original, "by_broadcasts", False):
        return False
    if not torch.distributed.is_initialized() or torch.distributed.get_backend() != "gloo":
        return False
    assert backend is not None  # it has an all-gather function

    def all_gather_into_tensor(
        output_tensor: Tensor, input_tensor: Tensor, group: Any = None, async_op: bool = False
    ) -> Any:
        size = torch.distributed.get_world_size(group)
        n = input_tensor.numel()
        plain = (
            not async_op
            and output_tensor.device.type == input_tensor.device.type == "cpu"
            and output_tensor.is_contiguous()
            and input_tensor.is_contiguous()
            and output_tensor.dtype == input_tensor.dtype
            and output_tensor.numel() == size * n
        )
        if not plain:
            return original(
                output_tensor=output_tensor,
                input_tensor=input_tensor,
                group=group,
                async_op=async_op,
            )
        gather_by_broadcasts(output_tensor.view(-1), input_tensor.view(-1), [n] * size, group)
        all_gather_into_tensor.calls += 1  # type: ignore[attr-defined]
        return None

    all_gather_into_tensor.by_broadcasts = True  # type: ignore[attr-defined]
    all_gather_into_tensor.calls = 0  # type: ignore[attr-defined]
    backend.all_gather_function = all_gather_into_tensor
    return True


def deepspeed_update(engine: Any) -> tuple[float, bool]:
    """The optimizer step of a DeepSpeed engine whose gradients the step's backward passes left
    (`World.backward`): clipping to `gradient_clipping`, the step, zeroing the gradients.

    DeepSpeed checks the global gradient norm first: when it is NaN or inf the engine applies
    no update and drops the gradients (its `skipped_steps`), which is what grpokit's
    non-finite guard asks for.

    Returns:
        The global gradient norm before clipping (inf for a skipped step), and whether the
        update was applied.
    """
    engine.step()
    norm = engine.get_global_grad_norm()
    applied = bool(engine.was_step_applied())
    norm = float(norm.item() if hasattr(norm, "item") else norm) if norm is not None else math.nan
    return (norm if applied else math.inf), applied


def check_deepspeed_run(world: World, args: Any, engine: Any, *, prompt_learning: bool) -> None:
    """Refuse what a DeepSpeed run cannot do yet, before any step: a prompt-learning PEFT adapter
    (LoRA-style adapters train), torch_compile; under ZeRO-3, vLLM in each process (a vLLM
    server works) and an engine that would sample from the partitioned model itself; at any
    stage, a scheduler or optimizer named in the DeepSpeed config (grpokit builds them from the
    GRPOConfig).

    Raises:
        ConfigError: naming the setting and the fix.
    """
    if not world.deepspeed:
        return
    config = world.accelerator.state.deepspeed_plugin.deepspeed_config
    refused = [
        f"the DeepSpeed config's {key!r}" for key in ("optimizer", "scheduler") if key in config
    ]
    if prompt_learning:
        refused.append(PROMPT_LEARNING)
    if args.torch_compile:
        refused.append("torch_compile")
    if world.zero_stage == 3:
        if args.use_vllm and args.vllm_mode != "server":
            refused.append(f"{VLLM_COLOCATE} under ZeRO-3")
        sampler = getattr(engine, "sampler_model", None)
        if sampler is not None and sampler is getattr(engine, "model", None):
            refused.append(
                "a TransformersEngine without its own sampler copy (bf16_sampler) under ZeRO-3"
            )
    if refused:
        raise ConfigError(
            "DeepSpeed does not support yet: "
            + "; ".join(refused)
            + ". The optimizer and schedule come from the GRPOConfig (optim, lr_scheduler_type); "
            "for the others launch with DDP (examples/accelerate/ddp.yaml), or ZeRO-2 "
            "(examples/accelerate/zero2.yaml) for colocated vLLM and a sampler without its own "
            "copy."
        )


class DeepSpeedModelView(ShardedModelView):
    """A model trained by the DeepSpeed engine as the checkpoint code sees a plain one:
    `save_pretrained` writes the whole weights (gathered from ZeRO-3 partitions by `gather`,
    every process), `load_state_dict` takes whole weights and puts them both in the model and in
    the optimizer's float32 master partitions, from which the engine's next step starts."""

    def __init__(self, model: torch.nn.Module, world: World) -> None:
        super().__init__(model)
        self._world = world

    def gather(self, world: World) -> None:
        """The whole weights on the main process (a collective under ZeRO-3)."""
        self.full = full_state_dict(self._model, world)
        if self.full is None and world.is_main_process:  # ZeRO-2: every process holds them
            self.full = {k: v.detach() for k, v in self._model.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> Any:
        from deepspeed.utils import safe_set_full_fp32_param

        params = dict(self._model.named_parameters())
        for name, param in params.items():
            if name in state:
                safe_set_full_fp32_param(param, state[name])  # the master copy (a partition)
        if self._world.zero_stage == 3:  # every process loads the same weights
            import deepspeed

            rank0 = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0)
        else:
            rank0 = contextlib.nullcontext()
        with rank0:
            return self._model.load_state_dict(state, strict=strict)


class DeepSpeedOptimizerView:
    """The optimizer under the DeepSpeed engine as the checkpoint code sees a plain one: its
    state, partitioned by ZeRO, gathered whole (`gather`, every process) in the format of the
    optimizer's own `state_dict()` on one process (parameters by index, in the order of
    `param_groups` before the engine flattened them), and `load_state_dict` giving each process
    its partitions back. A DeepSpeed checkpoint thus holds what a single-process one holds."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, groups: list[list[Any]]):
        self._engine, self._optimizer, self._groups = engine, optimizer, groups
        self.full: dict[str, Any] | None = None

    def _link_states(self) -> None:
        """ZeRO-1/2 link each parameter to its optimizer state once, after the first step of
        the first parameter group, before the later groups have any state: link again."""
        zero = self._engine.optimizer
        if hasattr(zero, "_hp_optimizer_states_linked"):
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()

    def _flat_partitions(self) -> list[Tensor]:
        """This process's flat float32 partitions, the tensors the wrapped optimizer steps and
        keys its state by (ZeRO-1/2: one per parameter group; ZeRO-3: one per sub-group)."""
        zero = self._engine.optimizer
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            flats = getattr(zero, name, None)
            if flats is not None:
                return list(flats)
        raise TypeError(f"unknown DeepSpeed optimizer {type(zero).__name__}")

    def _partition_state(self) -> tuple[list[str], dict[str, Any]]:
        """The names of the per-element state tensors (e.g. exp_avg) and the scalar state
        (e.g. step) the flat partitions share: one step count for all."""
        self._link_states()
        flat = self._optimizer.state[self._flat_partitions()[0]]
        keys = [k for k, v in flat.items() if torch.is_tensor(v) and v.dim() > 0]
        return keys, {k: v for k, v in flat.items() if k not in keys}

    def gather(self, world: World) -> None:
        """Gather the whole optimizer state onto the main process (a collective)."""
        from deepspeed.utils import safe_get_full_optimizer_state

        keys, scalars = self._partition_state()
        state: dict[int, dict[str, Any]] = {}
        index = 0
        for params in self._groups:
            for param in params:
                entry = {k: safe_get_full_optimizer_state(param, k) for k in keys}
                state[index] = {**scalars, **{k: v.detach().cpu() for k, v in entry.items()}}
                index += 1
        groups, start = [], 0
        for params, group in zip(self._groups, self._optimizer.param_groups, strict=True):
            settings = {k: v for k, v in group.items() if k != "params"}
            groups.append({**settings, "params": list(range(start, start + len(params)))})
            start += len(params)
        self.full = {"state": state, "param_groups": groups} if world.is_main_process else None

    def state_dict(self) -> dict[str, Any]:
        assert self.full is not None, "gather() the optimizer state first"
        return self.full

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        params = [param for group in self._groups for param in group]
        saved = state["state"].get(0, {})
        keys = [k for k, v in saved.items() if torch.is_tensor(v) and v.dim() > 0]
        # The flat partitions' state, made here when the optimizer has not stepped yet (torch
        # optimizers make it at their first step); the scalar state (Adam's step) as saved.
        for flat in self._flat_partitions():
            entry = self._optimizer.state[flat]
            for key, value in saved.items():
                if key in keys:
                    entry.setdefault(key, torch.zeros_like(flat))
                else:
                    entry[key] = value.clone() if torch.is_tensor(value) else value
        self._link_states()
        for index, param in enumerate(params):
            for key in keys:
                safe_set_full_optimizer_state(param, state["state"][index][key], key)
        for group, saved_group in zip(
            self._optimizer.param_groups, state["param_groups"], strict=True
        ):
            group.update({k: v for k, v in saved_group.items() if k != "params"})

    def __getattr__(self, name: str) -> Any:
        return getattr(self._optimizer, name)
