"""vLLM (in-process, `engines.vllm_engine.VLLMEngine`; or a `grpokit vllm-serve` server,
`engines.vllm_client.VLLMServerEngine`) vs grpokit's `TransformersEngine`: seconds per `generate`
call and per `update_weights`, on the generation benchmark's workload.

Workload (as bench/bench_generation.py): SmolLM2-135M-Instruct, 2 chat prompts x 8 completions,
at most 128 new tokens, temperature 1. Mode "fixed" forces every completion to 128 tokens
(`min_new_tokens`); "natural" stops at EOS. The TransformersEngine (default configuration: bf16
sampler copy) is called under bf16 autocast as the trainer calls it; vLLM runs bf16 weights.

Printed per engine, mode and thread count: median wall and CPU (process) seconds of `--repeats`
calls after one warm-up, completion tokens per second (wall) and the 1-minute load average before
and after. Then the median seconds of `update_weights` after a change of every parameter, and the
gap between vLLM's `sampling_logprobs` and the trainer's log-probs on the same completions. The
machine has 2 cores: before each measurement the script waits (up to `--wait` s) for the load
average to fall below `--max-load`, and prints it either way. No assertion on timings.

The TransformersEngine rows run first: building vLLM in this process changes process-wide state
(a one-process torch.distributed group; vLLM's CPU worker replaces `torch.set_num_threads`, which
VLLMEngine restores). In-process, vLLM's kernels use torch's intra-op (OpenMP) threads, so
`--threads` applies to both engines.

Engine "vllm-server" starts one `grpokit vllm-serve` process per thread count (`--threads N` of
the server; the benchmark process only waits during generation), connects a `VLLMServerEngine`
(the first push of all weights is not timed) and times the same calls; its "cpu s" column is the
CPU time of both processes (the server's from /proc). Its `update_weights` is
the whole push: reading and casting the changed weights, the gloo broadcast, the server's reload
of vLLM's weights, and the HTTP round trips. The server's log goes to `--server-log`.

Environment: bench/.venv-vllm (commands in bench/requirements-vllm.txt). Usage:
    bench/.venv-vllm/bin/python bench/bench_vllm.py --mode fixed natural --threads 1 2
    bench/.venv-vllm/bin/python bench/bench_vllm.py --engines vllm --vllm-compile  # ~100 s start
    bench/.venv-vllm/bin/python bench/bench_vllm.py --engines vllm vllm-server --threads 2
    bench/.venv-vllm/bin/python bench/bench_vllm.py --engines vllm vllm-server --lora 16

`--lora R` puts a LoRA adapter of rank R on every linear layer (B drawn small, as
bench_generation.py's): each engine samples from the merged weights, and `update_weights` is
timed after the adapters changed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # vLLM's engine core in-process

import torch

from grpokit.engines.base import SamplingParams
from grpokit.engines.models import load_causal_lm
from grpokit.engines.transformers_engine import TransformersEngine

sys.path.insert(0, str(Path(__file__).parent))
from bench_generation import (
    chat_prompt_ids,
    logprob_gap_summary,
    time_calls,
    update_seconds,
    with_lora,
)


def wait_for_quiet(args: argparse.Namespace) -> float:
    """Wait up to `args.wait` s for the 1-minute load average to drop below `args.max_load`."""
    deadline = time.monotonic() + args.wait
    while os.getloadavg()[0] > args.max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def sampling(args: argparse.Namespace, mode: str) -> SamplingParams:
    kwargs = {"min_new_tokens": args.max_new_tokens} if mode == "fixed" else {}
    return SamplingParams(temperature=1.0, generation_kwargs=kwargs)


def call(engine: Any, prompt_ids: list[list[int]], args: argparse.Namespace, mode: str) -> Any:
    """One `generate` call; the TransformersEngine under bf16 autocast, as the trainer makes it."""
    autocast = isinstance(engine, TransformersEngine)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return engine.generate(
            prompt_ids,
            num_generations=args.num_generations,
            max_new_tokens=args.max_new_tokens,
            sampling=sampling(args, mode),
        )


def time_engine(
    name: str,
    engine: Any,
    prompt_ids: list[list[int]],
    args: argparse.Namespace,
    threads_list: list[int] | None = None,
    cpu_clock: Any = time.process_time,
) -> None:
    """Print one row per mode and thread count: one warm-up call, then `args.repeats` calls.
    `threads_list` (default `args.threads`) sets this process's torch threads for each row;
    `cpu_clock` gives the CPU seconds of the "cpu s" column (default: this process's)."""
    for mode in args.mode:
        for threads in threads_list or args.threads:
            torch.set_num_threads(threads)
            load_before = wait_for_quiet(args)
            walls, cpus, counts = time_calls(engine, prompt_ids, args, mode, call, cpu_clock)
            tokens = sum(counts)
            wall = statistics.median(walls)
            print(
                f"{name:14} {mode:8} {threads:>3} {wall:7.2f} {statistics.median(cpus):7.2f} "
                f"{tokens / sum(walls):6.0f} {tokens / args.repeats:7.0f}  "
                f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}",
                flush=True,
            )


@contextlib.contextmanager
def vllm_server(
    args: argparse.Namespace, max_model_len: int, threads: int
) -> Iterator[tuple[str, int]]:
    """A `grpokit vllm-serve` process for `args.model` on 127.0.0.1 (a free port); yields its
    URL and process id, and stops it afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        "-c",
        "import sys; from grpokit.app.cli import main; sys.exit(main())",
        "vllm-serve",
        *("--model", args.model, "--host", "127.0.0.1", "--port", str(port)),
        *("--max-model-len", str(max_model_len), "--threads", str(threads)),
    ]
    if args.vllm_compile:
        command.append("--no-enforce-eager")
    with open(args.server_log, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(60)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_server(
    model: Any, tokenizer: Any, prompt_ids: list[list[int]], args: argparse.Namespace
) -> dict[str, float]:
    """Rows of the "vllm-server" engine, one server per thread count; returns the update
    seconds by name."""
    from grpokit.engines.vllm_client import VLLMServerEngine

    updates = {}
    longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
    for threads in args.threads:
        with vllm_server(args, longest, threads) as (url, pid):
            start = time.perf_counter()
            engine = VLLMServerEngine(model, tokenizer, base_url=url, timeout=900, group_port=0)
            name = "server-compiled" if args.vllm_compile else "server-eager"
            print(f"({name} up and synced in {time.perf_counter() - start:.1f} s)", flush=True)

            def both_processes(pid: int = pid) -> float:
                return time.process_time() + process_cpu_seconds(pid)

            time_engine(
                name, engine, prompt_ids, args, threads_list=[threads], cpu_clock=both_processes
            )
            updates[f"{name} (server {threads} thr)"] = update_seconds(engine, model)
            print(
                f"{name} sampling_logprobs vs trainer (autocast): "
                + logprob_gap(engine, model, prompt_ids, args)
            )
    return updates


def logprob_gap(engine: Any, model: Any, prompt_ids: list[list[int]], args: Any) -> str:
    """|vLLM sampling_logprobs - trainer log-probs (fp32 weights, bf16 autocast)| statistics."""
    torch.manual_seed(0)
    return logprob_gap_summary(model, call(engine, prompt_ids, args, "natural"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--engines", nargs="+", default=["transformers", "vllm"])
    parser.add_argument("--mode", nargs="+", default=["fixed", "natural"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--vllm-compile", action="store_true", help="enforce_eager=False")
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=120, help="max seconds to wait for quiet")
    parser.add_argument("--server-log", default="/tmp/grpokit-bench-vllm-server.log")
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on every linear layer")
    args = parser.parse_args()

    model, tokenizer = load_causal_lm(args.model)
    if args.lora:
        model = with_lora(model, args.lora)
    model.eval()
    prompt_ids = chat_prompt_ids(tokenizer)
    print(
        f"{args.model}: {len(prompt_ids)} prompts x {args.num_generations} completions, "
        f"max {args.max_new_tokens} new tokens, prompt lengths {[len(p) for p in prompt_ids]}, "
        f"torch {torch.__version__}, {os.cpu_count()} CPUs"
        + (f", LoRA rank {args.lora} on every linear layer" if args.lora else "")
    )
    header = f"{'engine':14} {'mode':8} {'thr':>3} {'wall s':>7} {'cpu s':>7} {'tok/s':>6}"
    print(f"{header} {'tokens':>7}  load before -> after", flush=True)
    updates = {}
    if "transformers" in args.engines:
        engine = TransformersEngine(model, tokenizer)
        time_engine("transformers", engine, prompt_ids, args)
        torch.set_num_threads(min(args.threads))
        updates["transformers"] = update_seconds(engine, model)
    if "vllm" in args.engines:
        from grpokit.engines.vllm_engine import VLLMEngine

        start = time.perf_counter()
        longest = max(len(p) for p in prompt_ids) + args.max_new_tokens
        engine = VLLMEngine(
            model, tokenizer, max_model_len=longest, enforce_eager=not args.vllm_compile
        )
        name = "vllm-compiled" if args.vllm_compile else "vllm-eager"
        print(f"({name} built in {time.perf_counter() - start:.1f} s)", flush=True)
        time_engine(name, engine, prompt_ids, args)
        torch.set_num_threads(min(args.threads))
        updates[name] = update_seconds(engine, model)
        print(
            f"{name} sampling_logprobs vs trainer (autocast): "
            + logprob_gap(engine, model, prompt_ids, args)
        )
    if "vllm-server" in args.engines:
        updates.update(time_server(model, tokenizer, prompt_ids, args))
    for name, seconds in updates.items():
        print(
            f"update_weights {name} ({min(args.threads)} thread): {seconds:.3f} s "
            f"(load {os.getloadavg()[0]:.2f})"
        )


if __name__ == "__main__":
    main()
