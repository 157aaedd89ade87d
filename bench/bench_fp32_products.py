"""float32 products of one decode step's size: MKL's `F.linear` against oneDNN's packed product
and fbgemm's float16 panels (`half_product`, what `DecodePacks` uses for frozen weights).

The weights of SmolLM2-135M's projection shapes, 30 of each (one per layer; the output layer
once) so that every call reads its weight from memory as a decode step does, multiplied by 16
rows; a plain `sum` over the same weights gives the bandwidth the memory delivers to these
sizes. Printed per shape: the
median microseconds per call of each, and the float16 product's relative error against the
float32 one (the weights' rounding). Meant for CPUs without native bf16 (or their emulation by
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

from grpokit.engines.packed_linear import half_product, packed_product

# [out, in]: q/o, k/v, gate/up, down, and the output layer
VOCAB = 49152
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536), (VOCAB, 576))
LAYERS, ROWS = 30, 16


def per_call_us(fn: Callable[[int], object], layers: int, rounds: int = 10) -> float:
    """Median microseconds per call of `fn(layer)` over `rounds` passes through the layers."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for layer in range(layers):
            fn(layer)
        times.append((time.perf_counter() - start) / layers * 1e6)
    return statistics.median(times)


def time_shape(out_features: int, in_features: int) -> tuple[float, float, float, float, float]:
    """For one weight shape: microseconds per call of (MKL F.linear, oneDNN packed, fbgemm
    float16, sum), and the float16 product's relative error."""
    layers = 1 if out_features == VOCAB else LAYERS  # the model has one output layer
    weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(layers)]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
    halves = [torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights]
    x = torch.randn(ROWS, in_features)
    mkl = per_call_us(lambda i: torch.nn.functional.linear(x, weights[i]), layers)
    onednn = per_call_us(lambda i: packed_product(packed[i], None, x), layers)
    half = per_call_us(lambda i: half_product(halves[i], None, (), x), layers)
    exact = torch.nn.functional.linear(x, weights[0])
    error = float((half_product(halves[0], None, (), x) - exact).norm() / exact.norm())
    return mkl, onednn, half, per_call_us(lambda i: weights[i].sum(), layers), error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| weight [out, in] | MB | MKL F.linear us | oneDNN packed us | fbgemm float16 us "
        "| sum us | float16 relative error |"
    )
    print("|---|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        mkl, onednn, half, total, error = time_shape(out_features, in_features)
        megabytes = out_features * in_features * 4 / 1e6
        print(
            f"| [{out_features}, {in_features}] | {megabytes:.2f} | {mkl:.1f} | {onednn:.1f} "
            f"| {half:.1f} | {total:.1f} | {error:.1e} |"
        )


if __name__ == "__main__":
    main()
