"""Measured matrix-multiply peak of this machine, per dtype: the denominator of the benchmark's MFU.

The peak is the best sustained GFLOP/s of `torch.matmul` over a few square and model-shaped
products (e.g. `[2048, 576] @ [576, 1536]`, SmolLM2-135M's MLP at 16 x 128 tokens), each timed as
the median of several repeats after a warm-up. bf16 is timed on bf16 tensors (what autocast runs),
fp32 on fp32 tensors. The result depends on the thread count (`torch.get_num_threads()`) and on
the load from other processes: run it when the machine is quiet.

Usage:
    python bench/matmul_peak.py [--json] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

# (M, K, N): a few squares plus the shapes of a 135M Llama's projections at 2048 tokens.
SHAPES: tuple[tuple[int, int, int], ...] = (
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (2048, 576, 1536),
    (2048, 1536, 576),
    (2048, 576, 576),
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def time_matmul(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Median GFLOP/s of `[m, k] @ [k, n]` in `dtype` over repeats lasting about `seconds` each."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    flops = 2.0 * m * k * n
    for _ in range(3):  # warm-up: thread pool, packing buffers, caches
        torch.matmul(a, b, out=out)
    # Calibrate an inner loop that lasts about `seconds`.
    start = time.perf_counter()
    torch.matmul(a, b, out=out)
    one = max(time.perf_counter() - start, 1e-6)
    inner = max(1, int(seconds / one))
    rates = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b, out=out)
        elapsed = time.perf_counter() - start
        rates.append(flops * inner / elapsed / 1e9)
    return statistics.median(rates)


def measure_peaks(seconds: float = 0.3, quick: tuple[str, ...] = ()) -> dict[str, dict[str, float]]:
    """`{"bf16": {"peak": GFLOP/s, "MxKxN": GFLOP/s, ...}, "fp32": {...}}`.

    The dtypes named in `quick` are timed on the first shape only: an emulated bf16 (no native
    bf16 on this CPU) runs tens of times slower than fp32, so its full sweep would take minutes
    to show only that.
    """
    results: dict[str, dict[str, float]] = {}
    for name, dtype in DTYPES.items():
        shapes = SHAPES[:1] if name in quick else SHAPES
        per_shape = {f"{m}x{k}x{n}": time_matmul(m, k, n, dtype, seconds) for (m, k, n) in shapes}
        results[name] = {"peak": max(per_shape.values()), **per_shape}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed repeat")
    args = parser.parse_args()
    peaks = measure_peaks(args.seconds)
    if args.json:
        print(json.dumps({"threads": torch.get_num_threads(), **peaks}))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, per_shape in peaks.items():
        print(f"{name}: peak {per_shape['peak']:.0f} GFLOP/s")
        for shape, rate in per_shape.items():
            if shape != "peak":
                print(f"  {shape:>16}: {rate:8.1f} GFLOP/s")


if __name__ == "__main__":
    main()
