"""Decode-step attention: SDPA on the grouped query rows against the eager matrix-product math.

`core.attention.grouped_attention` sends a decode step (one query per row, no gradient) to
`scaled_dot_product_attention` with the query heads of each key/value group stacked as rows. The
variant it replaced computes the same step with two matrix products and a float32 softmax
(`attention.grouped_matmul_attention`, transformers' eager math without repeated key/value
heads); on the cache's strided key view the first product copies the transposed keys every step.

Two measurements, the variants alternated in one process:

- `--lengths`: one attention call on a decode step of 16 rows (SmolLM2-135M's 9 query and 3
  key/value heads of 64), keys and values read through views of a cache buffer 70 positions
  longer, bf16 and float32: median microseconds (`torch.utils.benchmark`), and the largest
  difference from a float64 reference.
- `--generate`: whole `TransformersEngine.generate` calls of the bar workload
  (SmolLM2-135M-Instruct, 2 prompts x G completions forced to T tokens, bf16 autocast as the
  trainer calls it), each variant registered as the attention function in turn: s per call.

Usage:
    python bench/bench_decode_attention.py --lengths 100 200 600
    python bench/bench_decode_attention.py --generate --max-new-tokens 128 --num-generations 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import machine_floor
import torch
import torch.utils.benchmark as benchmark
from bench_generation import call, chat_prompt_ids
from transformers import AttentionInterface

from grpokit.core import attention
from grpokit.engines.models import load_causal_lm
from grpokit.engines.transformers_engine import TransformersEngine


def eager_decode(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The variant replaced in decode: `attention.grouped_matmul_attention` for every call (the
    prefill's and the decode steps' score tensors here are far below the SDPA hand-over)."""
    k = key.shape[2]
    mask = None if attention_mask is None else attention_mask[..., :k]
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attention.grouped_matmul_attention(module, query, key, value, mask, scale, dropout)
    return out, None


VARIANTS = {"eager math": eager_decode, "sdpa grouped rows": attention.grouped_attention}


class _Module(torch.nn.Module):
    pass


def time_lengths(lengths: list[int], threads: int) -> None:
    """One decode-step attention call per variant, length and dtype."""
    torch.manual_seed(0)
    rows, heads, kv_heads, dim = 16, 9, 3, 64
    module = _Module().eval()
    print("| dtype | cached positions | variant | median us | max abs diff from float64 |")
    print("|---|---|---|---|---|")
    for dtype in (torch.bfloat16, torch.float32):
        for length in lengths:
            buffers = [torch.randn(rows, kv_heads, length + 70, dim) for _ in range(2)]
            query = torch.randn(rows, heads, 1, dim)
            mask = torch.zeros(rows, 1, 1, length)
            mask[: rows // 4, ..., : length // 10] = torch.finfo(torch.float32).min  # padding
            key64, value64 = (t[:, :, :length].double() for t in buffers)
            exact, _ = eager_decode(module, query.double(), key64, value64, mask.double())
            key, value = (t.to(dtype)[:, :, :length] for t in buffers)
            args = (module, query.to(dtype), key, value, mask.to(dtype))
            for name, fn in VARIANTS.items():
                with torch.no_grad():
                    out, _ = fn(*args)
                    timer = benchmark.Timer(
                        "fn(*args)", globals={"fn": fn, "args": args}, num_threads=threads
                    )
                    median = timer.blocked_autorange(min_run_time=1.0).median
                error = (out.double() - exact).abs().max().item()
                print(f"| {dtype} | {length} | {name} | {median * 1e6:.1f} | {error:.2e} |")


def time_generate(args: argparse.Namespace) -> None:
    """Whole generate calls, the variants alternated; one warm-up round first."""
    model, tokenizer = load_causal_lm(args.model)
    engine = TransformersEngine(model, tokenizer)
    prompt_ids = chat_prompt_ids(tokenizer)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(args.repeats + 1):
        for name, fn in VARIANTS.items():
            AttentionInterface.register(attention.NAME, fn)
            torch.manual_seed(round_index)
            start = time.perf_counter()
            call(engine, prompt_ids, args, "fixed")  # as bench_generation times it
            if round_index > 0:
                seconds[name].append(time.perf_counter() - start)
    attention.register()
    for name, values in seconds.items():
        calls = " ".join(f"{v:.2f}" for v in values)
        print(f"{name}: s per call {calls}; median {statistics.median(values):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", nargs="*", type=int, default=[])
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_floor.describe(machine_floor.measure_floor()))
    if args.lengths:
        time_lengths(args.lengths, args.threads)
    if args.generate:
        time_generate(args)


if __name__ == "__main__":
    main()
