"""`grpokit train --num_processes N`: hand the command to accelerate's launcher.

The run config and the accelerate config are checked here first, with the sizes the N processes
will see, so that a batch that does not split, groups that cannot stay whole or a missing
backend are one-line errors before any process starts or any model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from grpokit.app.run_config import load_config, parse_overrides
from grpokit.errors import ConfigError
from grpokit.train.distributed import check_deepspeed


def read_accelerate_config(path: str) -> dict[str, Any]:
    """The accelerate config file at `path`, checked for a backend grpokit can run.

    Raises:
        ConfigError: the file is missing or not a YAML mapping, or asks for DeepSpeed that is
            not installed or at a ZeRO stage grpokit does not run
            (`train.distributed.check_deepspeed`).
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--accelerate_config {path!r} does not exist.")
    config = yaml.safe_load(file.read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"--accelerate_config {path!r} is not a YAML mapping of settings.")
    if str(config.get("distributed_type", "")).upper() == "DEEPSPEED":
        stage = (config.get("deepspeed_config") or {}).get("zero_stage")
        check_deepspeed(f"--accelerate_config {path!r}", stage)
    return config


@contextlib.contextmanager
def _world_size(num_processes: int) -> Iterator[None]:
    """Set `WORLD_SIZE` while the block runs, as the launched processes will see it."""
    before = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(num_processes)
    try:
        yield
    finally:
        if before is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = before


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_command(args: argparse.Namespace, rest: list[str]) -> list[str]:
    """The `accelerate launch ... -m grpokit.app.cli train ...` command for `args`.

    Raises:
        ConfigError: a bad `--num_processes`, accelerate config or run config (the latter
            checked with the launched processes' `WORLD_SIZE`).
    """
    accelerate_config: dict[str, Any] = {}
    if args.accelerate_config:
        accelerate_config = read_accelerate_config(args.accelerate_config)
    num_processes = args.num_processes
    if num_processes is None:
        num_processes = accelerate_config.get("num_processes")
    if not isinstance(num_processes, int) or num_processes < 1:
        raise ConfigError(
            f"--num_processes must be a positive integer (or set num_processes in the accelerate "
            f"config), got {num_processes!r}."
        )
    with _world_size(num_processes):
        load_config(args.config, parse_overrides(rest))
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    command += ["--num_processes", str(num_processes)]
    if args.accelerate_config:
        command += ["--config_file", args.accelerate_config]
    elif num_processes > 1:
        # DDP: one process per GPU, or gloo processes on a machine without one.
        command += ["--multi_gpu", "--main_process_port", str(_free_port())]
    command += ["-m", "grpokit.app.cli", "train", args.config, *rest]
    if args.resume:
        command.append("--resume")
    if args.overwrite:
        command.append("--overwrite")
    if args.debug:
        command.append("--debug")
    return command


def launch_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The launched processes' environment: `environ` (this process's by default), with
    `MALLOC_ARENA_MAX=1` on a machine without CUDA unless it is set already.

    glibc gives each allocating thread an arena of its own, and an arena other than the main
    one serves a block above its 64 MiB heaps by a mapping of its own, unmapped when freed: the
    work threads of gloo's process group then page-fault a gathered weight's buffer in afresh at
    every collective (SmolLM2-135M's tied embedding weight, 113 MB). With every thread in the
    main arena, where the trainer keeps freed blocks (`retain_freed_memory`), 2 processes on a
    2-core AMD EPYC Zen 4 (avx512_bf16) took 8.18-8.28 s for forward+backward against
    9.23-9.37 s under ZeRO-3, 8.67 against 9.58 s under FSDP2, DDP's unchanged
    (bench/RESULTS.md). glibc reads the variable when a process starts, before any thread, so
    it is set here for the processes to launch.
    """
    env = dict(os.environ if environ is None else environ)
    if not torch.cuda.is_available():
        env.setdefault("MALLOC_ARENA_MAX", "1")
    return env


def launch_processes(args: argparse.Namespace, rest: list[str]) -> int:
    """Run the training command on `--num_processes` processes through accelerate's launcher
    (in `launch_environment`) and return its exit code."""
    command = launch_command(args, rest)
    print(f"[grpokit] launching: {' '.join(command)}", flush=True)
    return subprocess.call(command, env=launch_environment())
