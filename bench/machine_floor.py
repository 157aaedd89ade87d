"""The machine's floor for the roofline: CPU model and flags, matmul peak, memory bandwidth.

Flags come from `/proc/cpuinfo` (never assumed). The compute peak of the roofline is the bf16
matmul peak only where the CPU computes bf16 natively (`avx512_bf16` or `amx_bf16`, and no
`ONEDNN_MAX_CPU_ISA` / `ATEN_CPU_CAPABILITY` cap below it: grpokit's own verdict,
`grpokit.engines.models.cpu_bf16`); elsewhere torch emulates bf16 and the fp32 peak is the one that
counts. The ISA caps in the environment (also `MKL_ENABLE_INSTRUCTIONS`, which caps MKL's fp32
matmuls) are part of the machine line. Bandwidth is the best of a few
copies of a buffer much larger than the last-level cache (bytes read + bytes written).

Usage:
    python bench/machine_floor.py [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

ISA_VARIABLES = (
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
)
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """`{"model": str, "flags": set[str]}` from the text of `/proc/cpuinfo` (first CPU)."""
    model, flags = "?", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "?":
            model = value.strip()
        elif key == "flags" and not flags:
            flags = set(value.split())
    return {"model": model, "flags": flags}


def cpu_info(path: str = "/proc/cpuinfo", environ: dict[str, str] | None = None) -> dict[str, Any]:
    """This CPU's model, flags, ISA caps set in `environ` (None = `os.environ`), native-bf16
    verdict (`grpokit.engines.models.cpu_bf16`) and core count (flags empty off Linux)."""
    from grpokit.engines.models import cpu_bf16

    env = dict(os.environ if environ is None else environ)
    try:
        text = Path(path).read_text()
    except OSError:
        text = ""
    info = parse_cpuinfo(text) if text else {"model": "?", "flags": set()}
    flags = info["flags"]
    bf16 = cpu_bf16(text, env)
    return {
        "model": info["model"],
        "cores": os.cpu_count(),
        "flags": [f for f in REPORTED_FLAGS if f in flags],
        "isa_caps": {k: env[k] for k in ISA_VARIABLES if env.get(k)},
        "native_bf16": bf16.native,
        "bf16_reason": bf16.reason,
    }


def measure_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Best GB/s of `dst.copy_(src)` over `repeats` copies of `megabytes` (read + write)."""
    import torch

    n = megabytes * 2**20 // 4
    src = torch.ones(n)
    dst = torch.empty(n)
    dst.copy_(src)  # touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def measure_floor(peak_seconds: float = 0.3) -> dict[str, Any]:
    """CPU info, matmul peaks (GFLOP/s), bandwidth (GB/s) and the compute peak the roofline uses."""
    import matmul_peak  # this folder is on sys.path when run as a script
    import torch

    cpu = cpu_info()
    compute = "bf16" if cpu["native_bf16"] else "fp32"
    peaks = matmul_peak.measure_peaks(peak_seconds, quick=() if cpu["native_bf16"] else ("bf16",))
    bandwidth = measure_bandwidth()
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "matmul_peak_gflops": {k: v["peak"] for k, v in peaks.items()},
        "compute_dtype": compute,
        "peak_gflops": peaks[compute]["peak"],
        "bandwidth_gbs": bandwidth,
        "loadavg": os.getloadavg(),
    }


def describe(floor: dict[str, Any]) -> str:
    """One line: CPU, flags, peaks, bandwidth, load."""
    cpu = floor["cpu"]
    peaks = ", ".join(f"{k} {v:.0f}" for k, v in floor["matmul_peak_gflops"].items())
    load = ", ".join(f"{x:.2f}" for x in floor["loadavg"])
    caps = " ".join(f"{k}={v}" for k, v in cpu.get("isa_caps", {}).items())
    verdict = "yes" if cpu["native_bf16"] else "no"
    return (
        f"{cpu['model']}, {cpu['cores']} cores, flags {' '.join(cpu['flags']) or '-'}, "
        f"ISA caps {caps or '-'} (native bf16: {verdict}, {cpu.get('bf16_reason', '?')}); "
        f"{floor['threads']} threads; "
        f"matmul peak GFLOP/s {peaks} (roofline uses {floor['compute_dtype']}); "
        f"copy bandwidth {floor['bandwidth_gbs']:.1f} GB/s; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed repeat")
    args = parser.parse_args()
    floor = measure_floor(args.seconds)
    print(json.dumps(floor) if args.json else describe(floor))


if __name__ == "__main__":
    main()
