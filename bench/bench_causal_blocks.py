"""Causal attention in query blocks (`core.attention.CAUSAL_QUERY_BLOCK`): time and difference.

A training forward's causal attention (over the whole sequence, or over the completion after
the cached prompt) is split into blocks of `CAUSAL_QUERY_BLOCK` queries, each against the keys up
to its last query, so the scores above the diagonal are never computed. Two measurements, the
block sizes alternated in one process (slow drifts of a shared machine hit each alike), "one
call" = no split:

- default: one layer's `grouped_attention` forward and backward (SmolLM2-135M's 9 query and 3
  key/value heads of 64, float32, a causal mask) for each `--shapes ROWSxLENGTH`: median
  milliseconds, and the largest difference of the output and of the query gradient from one call;
- `--update`: the trainer's forward+backward of one optimizer step on a fixed batch
  (`train_memory_speed.build`: SmolLM2-135M-Instruct, 2 prompts x G completions of T random tokens,
  dapo, float32 as on a CPU without native bf16, `max_forward_tokens` as `--forwards` sets it):
  median seconds.

No assertion on timings.

Usage:
    python bench/bench_causal_blocks.py --shapes 4x165 1x549 2x549 1x1100 --blocks 0 256 128 64
    python bench/bench_causal_blocks.py --update --num-generations 8 --max-completion-length 512 \
        --micro-batch 8 --blocks 0 128 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from grpokit.core import attention

BENCH_DIR = Path(__file__).resolve().parent
NO_SPLIT = 1 << 30  # a block size no sequence reaches: one call


def layer_call(rows: int, length: int) -> Any:
    """A function running one layer's attention forward and backward on fixed random inputs;
    returns `(output, query gradient)`."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(rows, 9, length, 64, generator=gen, requires_grad=True)
    k = torch.randn(rows, 3, length, 64, generator=gen, requires_grad=True)
    v = torch.randn(rows, 3, length, 64, generator=gen, requires_grad=True)
    causal = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)
    mask = causal.expand(rows, 1, length, length)
    weights = torch.randn(rows, length, 9, 64, generator=gen)
    module = torch.nn.Module()
    module.training = False

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        q.grad = k.grad = v.grad = None
        out, _ = attention.grouped_attention(module, q, k, v, mask)
        (out * weights).sum().backward()
        assert q.grad is not None
        return out.detach(), q.grad

    return run


def time_layers(shapes: list[str], blocks: list[int], repeats: int) -> None:
    print(f"| rows x length | {' | '.join(label(b) for b in blocks)} |")
    print("|---|" + "---|" * len(blocks))
    for shape in shapes:
        rows, length = (int(x) for x in shape.split("x"))
        run = layer_call(rows, length)
        attention.CAUSAL_QUERY_BLOCK = NO_SPLIT
        ref_out, ref_grad = (t.clone() for t in run())
        times: dict[int, list[float]] = {b: [] for b in blocks}
        errors = {}
        for r in range(repeats + 1):
            for b in blocks:
                attention.CAUSAL_QUERY_BLOCK = b or NO_SPLIT
                start = time.perf_counter()
                out, grad = run()
                if r:
                    times[b].append(time.perf_counter() - start)
                errors[b] = max(
                    float((out - ref_out).abs().max()), float((grad - ref_grad).abs().max())
                )
        cells = [
            f"{statistics.median(times[b]) * 1e3:.1f} ms (diff {errors[b]:.1e})" for b in blocks
        ]
        print(f"| {shape} | {' | '.join(cells)} |", flush=True)


def time_update(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    import bench_grpo
    import train_memory_speed

    workload = bench_grpo.Workload(
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        micro_batch=args.micro_batch,
        bf16=False,
    )
    bench_grpo.Workload = lambda: workload  # type: ignore[assignment,misc]
    trainer, batch = train_memory_speed.build(args.forwards, args.threads)
    times: dict[int, list[float]] = {b: [] for b in args.blocks}
    for r in range(args.repeats + 1):  # the first round warms up
        for b in args.blocks:
            attention.CAUSAL_QUERY_BLOCK = b or NO_SPLIT
            seconds = trainer.optimizer_step(batch, range(batch.size))["time/forward_backward"]
            if r:
                times[b].append(seconds)
            print(f"round {r} {label(b)}: {seconds:.2f} s", flush=True)
    print(f"load average {os.getloadavg()}")
    for b, values in times.items():
        runs = " ".join(f"{v:.2f}" for v in values)
        print(f"{label(b)}: forward+backward s {runs}; median {statistics.median(values):.2f}")


def label(block: int) -> str:
    return "one call" if not block else f"blocks of {block}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["4x165", "1x549", "2x549", "1x1100"])
    parser.add_argument("--blocks", nargs="+", type=int, default=[0, 128], help="0 = one call")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--update", action="store_true", help="time a whole training step")
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument(
        "--forwards",
        default="auto",
        help="--update: the training forwards' bound, a `train_memory_speed.py` setting (auto = "
        "the default max_forward_tokens; none = one forward per micro-batch)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.update:
        time_update(args)
    else:
        time_layers(args.shapes, args.blocks, args.repeats)


if __name__ == "__main__":
    main()
