"""Sandbox overhead: reasoning-gym scoring of one batch in the sandbox vs in the trainer.

Workload: B prompts x G completions of one reasoning-gym task (half right answers, half wrong),
scored by `reasoning_gym_score` (verifier in a `SandboxPool`) and by calling the verifier
directly in this process (what grpokit did before the sandbox; unsafe). Printed: pool start-up
(once per training run), median wall seconds per batch for each way and each `chunk_size`, the
per-batch overhead, and the latency of one `run_python` call on a warm worker (a Python tool).

Usage:
    python bench/bench_sandbox.py --task countdown --prompts 8 --generations 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from typing import Any

from grpokit.data.tasks import load_task
from grpokit.rewards.builtin import ReasoningGymScore
from grpokit.sandbox import SandboxPool, capabilities


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="countdown")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()

    import reasoning_gym

    spec = {"kind": "reasoning_gym", "name": args.task, "size": args.prompts, "eval_size": 0}
    rows = load_task(spec).train_dataset
    entries, completions = [], []
    for i in range(args.prompts):
        for g in range(args.generations):
            entries.append(rows[i]["reasoning_gym_entry"])
            answer = rows[i]["answer"] if g % 2 == 0 else "1 + 2"
            completions.append(f"<answer>{answer}</answer>")
    n = len(completions)

    verify = reasoning_gym.get_score_answer_fn(args.task)

    def direct() -> list[float]:
        return [
            float(verify(c[len("<answer>") : -len("</answer>")], json.loads(e)))
            for c, e in zip(completions, entries, strict=True)
        ]

    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(capabilities().summary())
    start = time.perf_counter()
    first = ReasoningGymScore(workers=args.workers, chunk_size=8)
    first(completions=completions[:1], reasoning_gym_entry=entries[:1])
    startup = time.perf_counter() - start
    print(f"pool start-up (reasoning_gym imported in each worker): {startup:.2f} s")

    expected = direct()
    t_direct = _median_seconds(direct, args.repeats)
    print(f"{n} completions ({args.prompts} x {args.generations}) of {args.task!r}")
    print(f"  in the trainer (unsafe):        {t_direct * 1000:8.1f} ms per batch")
    for chunk in (1, 8, 64):
        score = ReasoningGymScore(workers=args.workers, chunk_size=chunk)
        got = score(completions=completions, reasoning_gym_entry=entries)
        assert got == expected, "sandboxed scores differ from the verifier's"
        t = _median_seconds(
            lambda s=score: s(completions=completions, reasoning_gym_entry=entries), args.repeats
        )
        print(
            f"  sandbox, chunk_size {chunk:2d}:        {t * 1000:8.1f} ms per batch "
            f"(+{(t - t_direct) * 1000:.1f} ms, {t / n * 1000:.2f} ms per completion)"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")

    with SandboxPool(1) as pool:
        pool.run_python("pass")
        t = _median_seconds(lambda: pool.run_python("print(sum(range(100)))"), 20)
        print(f"run_python on a warm stdlib-only worker: {t * 1000:.1f} ms per call")


if __name__ == "__main__":
    main()
