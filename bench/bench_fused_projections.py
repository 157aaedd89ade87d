"""Fused vs separately packed sibling projections (`FusedGroup`): the q/k/v and gate/up products
of SmolLM2-135M's 30 layers on one decode step's input (16 rows x 576, bf16), through
`PackedLinear`, the two variants alternated in one process.

Prints the median, min and max milliseconds per pass of each variant. No assertion on timings;
the outputs are checked equal.

Usage:
    python bench/bench_fused_projections.py --threads 2 --passes 300
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from grpokit.engines.packed_linear import pack_linear_layers

LAYERS, HIDDEN, ROWS = 30, 576, 16
OUT = {"q_proj": 576, "k_proj": 192, "v_proj": 192, "gate_proj": 1536, "up_proj": 1536}


def projections(fuse: bool) -> torch.nn.ModuleList:
    """`LAYERS` modules holding SmolLM2-135M-shaped projections, packed (and fused if `fuse`)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList()
    for _ in range(LAYERS):
        layer = torch.nn.Module()
        for name, out in OUT.items():
            setattr(layer, name, torch.nn.Linear(HIDDEN, out, bias=False))
        layers.append(layer)
    layers.to(torch.bfloat16)
    pack_linear_layers(layers, release=True, fuse=fuse)
    return layers


def one_pass(layers: torch.nn.ModuleList, x: torch.Tensor) -> list[torch.Tensor]:
    """Every projection of every layer on `x`, in the order a Llama layer calls them."""
    return [getattr(layer, name)(x) for layer in layers for name in OUT]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = {"fused": projections(True), "separate": projections(False)}
    x = torch.randn(ROWS, HIDDEN, dtype=torch.bfloat16)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        expected = [out.clone() for out in one_pass(variants["separate"], x)]
        got = one_pass(variants["fused"], x)
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
        for i in range(args.passes + 10):
            order = list(variants) if i % 2 else list(variants)[::-1]
            for name in order:
                start = time.perf_counter()
                one_pass(variants[name], x)
                if i >= 10:  # the first passes warm up
                    seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        print(
            f"{name:9s} {LAYERS} layers x (q, k, v, gate, up) on [{ROWS}, {HIDDEN}]: median "
            f"{statistics.median(values) * 1e3:.2f} ms, min {min(values) * 1e3:.2f}, "
            f"max {max(values) * 1e3:.2f}"
        )


if __name__ == "__main__":
    main()
