"""Working memory of the per-token log-prob computation as the vocabulary grows.

For each vocabulary size V, one forward + backward of the completion log-probs (and entropies)
from bf16 logits `[N, T, V]` (requires grad), in a fresh subprocess, two ways:

    naive      torch.log_softmax(logits.float() / temperature).gather(...), entropy from the
               full float32 log-softmax (what a straightforward implementation does)
    grpokit    grpokit.core.logprobs.selective_logprobs_and_entropy (one reused float32 chunk)

Printed per row: the bf16 logits size (their gradient has the same size; both are inherent to
any implementation), the peak resident memory above the process's level just before the call
(ru_maxrss, MiB; it includes the logits' gradient), that peak minus the gradient's size ("working"
memory: what the method adds),
and the seconds of forward + backward. No assertion: the point is the trend in V.

Usage:
    python bench/bench_logprob_memory.py --vocab 16384 32768 65536 131072 262144
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def worker(method: str, n: int, t: int, v: int, threads: int) -> dict[str, float]:
    """One measurement (runs in its own process so ru_maxrss starts fresh)."""
    import torch

    from grpokit.core.logprobs import selective_logprobs_and_entropy

    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(n, t, v, generator=generator).to(torch.bfloat16).requires_grad_(True)
    ids = torch.randint(0, v, (n, t), generator=generator)
    weights = torch.randn(n, t, generator=generator)
    before = current_rss_mb()
    started = time.perf_counter()
    if method == "naive":
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
    else:
        token, entropy = selective_logprobs_and_entropy(logits, ids, compute_entropy=True)
    assert entropy is not None
    ((token * weights).sum() + 0.0 * entropy.sum()).backward()
    seconds = time.perf_counter() - started
    logits_mb = logits.numel() * logits.element_size() / 2**20
    peak = peak_rss_mb() - before  # includes the logits' gradient (logits_mb)
    return {"logits_mb": logits_mb, "peak_mb": peak, "working_mb": peak - logits_mb, "s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    parser.add_argument("--rows", type=int, default=8, help="N sequences")
    parser.add_argument("--length", type=int, default=128, help="T completion positions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "V"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, v = args.worker[0], int(args.worker[1])
        print(json.dumps(worker(method, args.rows, args.length, v, args.threads)))
        return
    print(f"N={args.rows} T={args.length}, bf16 logits with grad, forward + backward")
    print("| V | method | logits MiB | peak above start MiB | working MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for v in args.vocab:
        for method in ("naive", "grpokit"):
            command = [sys.executable, __file__, "--worker", method, str(v)]
            command += ["--rows", str(args.rows), "--length", str(args.length)]
            command += ["--threads", str(args.threads)]
            out = subprocess.run(
                command,
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"| {v} | {method} | {r['logits_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{r['working_mb']:.0f} | {r['s']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
