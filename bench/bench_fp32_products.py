"""float32 products of one decode step's size: MKL's `F.linear` against oneDNN's packed product.

The weights of SmolLM2-135M's projection shapes, 30 of each (one per layer) so that every call
reads its weight from memory as a decode step does, multiplied by 16 rows; a plain `sum` over
the same weights gives the bandwidth the memory delivers to these sizes. Printed per shape: the
median microseconds per call of each. Meant for CPUs without native bf16 (or their emulation by
ISA caps), where the sampler is the float32 policy with `DecodePacks`.

Usage:
    python bench/bench_fp32_products.py [--threads 2]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 \\
        python bench/bench_fp32_products.py
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from grpokit.engines.packed_linear import packed_product

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # [out, in]: q/o, k/v, gate/up, down
LAYERS, ROWS = 30, 16


def per_call_us(fn: Callable[[int], object], rounds: int = 10) -> float:
    """Median microseconds per call of `fn(layer)` over `rounds` passes through the layers."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for layer in range(LAYERS):
            fn(layer)
        times.append((time.perf_counter() - start) / LAYERS * 1e6)
    return statistics.median(times)


def time_shape(out_features: int, in_features: int) -> tuple[float, float, float]:
    """Microseconds per call for one weight shape: (MKL F.linear, oneDNN packed, sum)."""
    weights = [torch.randn(out_features, in_features) for _ in range(LAYERS)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    x = torch.randn(ROWS, in_features)
    mkl = per_call_us(lambda i: torch.nn.functional.linear(x, weights[i]))
    onednn = per_call_us(lambda i: packed_product(packed[i], None, x))
    return mkl, onednn, per_call_us(lambda i: weights[i].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| weight [out, in] | MB | MKL F.linear us | oneDNN packed us | sum us |")
    print("|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        mkl, onednn, total = time_shape(out_features, in_features)
        megabytes = out_features * in_features * 4 / 1e6
        print(
            f"| [{out_features}, {in_features}] | {megabytes:.2f} | {mkl:.1f} | {onednn:.1f} "
            f"| {total:.1f} |"
        )


if __name__ == "__main__":
    main()
