"""Check grpokit's GPU path on a machine with a CUDA GPU: a few GRPO steps in bf16, then the
device decisions, the loss, the weights and the sampler copy.

    python bench/gpu_check.py                                  # a tiny model built in-process
    python bench/gpu_check.py --model smollm2-135m-instruct    # or an HF id / local folder
    python bench/gpu_check.py --device cpu                     # the same checks on the CPU
    torchrun --nproc_per_node 2 bench/gpu_check.py             # 2 GPUs (NCCL), or 2 CPU
                                                               # processes with --device cpu

Without a CUDA device it says so and exits 0 without running anything (skipped). Otherwise it
trains `--steps` optimizer steps (default 2) with `bf16=True` and checks:

- the trainer runs on the device asked for, and computes under bf16 autocast exactly when the
  device computes bf16 natively (`grpokit.engines.device.DeviceTraits.native_bf16`);
- every step's loss is finite, and the policy's float32 weights changed;
- the generation engine's sampler equals the policy after the last weight sync: its bf16 copy
  holds the policy's weights rounded to bf16 (or, without native bf16, it is the policy itself);
- the CPU-only speed-ups follow the device rules: packed oneDNN weights in the sampler copy and
  grouped attention only where `DeviceTraits` allows them (never on a GPU), and training never
  changes torch's intra-op thread count;
- launched on several processes, the loop's collectives (`World.sum`, `max`, `gather`) take the
  CPU tensors the loop holds and give the sums, maxima and gathers of every process, on the
  caller's device, under NCCL as under gloo (checked before training, while the process group
  is up).

It prints each step's time and the peak memory (CUDA: allocated and reserved by torch's caching
allocator; CPU: the process's peak RSS). Exit status: 0 = passed or skipped, 1 = a check failed.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO_DIR = Path(__file__).resolve().parent.parent

PROMPTS = ["Count to five:", "Name a colour:", "Say hello:", "The sky is"]


def char_sum(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that differs between completions, so that advantages are not all zero."""
    return [float(sum(map(ord, text)) % 7) for text in completions]


def tiny_model() -> tuple[Any, Any]:
    """The test suite's 2-layer Llama and character-level tokenizer (no download)."""
    sys.path.insert(0, str(REPO_DIR))
    from tests.tiny import make_causal_lm, make_tokenizer

    tokenizer = make_tokenizer()
    return make_causal_lm(tokenizer), tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF id, local folder or built-in name")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps")
    parser.add_argument("--max-completion-length", type=int, default=None)
    return parser.parse_args(argv)


class Checks:
    """Collects failed checks instead of stopping at the first."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failed.append(what)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: skipped: no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}). Run it on a machine with a GPU, or with "
            "--device cpu for the same checks on the CPU."
        )
        return 0
    return run(args)


def collective_checks(world: Any) -> list[tuple[bool, str]]:
    """`(passed, what)` for the loop's collectives on CPU tensors (none for one process)."""
    if not world.is_distributed:
        return []
    p, rank = world.num_processes, world.process_index
    backend = torch.distributed.get_backend()
    total = world.sum(torch.ones(2))
    top = world.max(rank)
    ranks = world.gather(torch.tensor([rank]))
    return [
        (
            total.tolist() == [p, p] and total.device.type == "cpu",
            f"World.sum of CPU ones over {p} processes ({backend}): {total.tolist()} on "
            f"{total.device}",
        ),
        (top == p - 1, f"World.max of the ranks: {top}"),
        (ranks.tolist() == list(range(p)), f"World.gather of the ranks: {ranks.tolist()}"),
    ]


def run(args: argparse.Namespace) -> int:
    from datasets import Dataset

    from grpokit import GRPOConfig, GRPOTrainer
    from grpokit.core.attention import NAME as GROUPED_ATTENTION
    from grpokit.engines.device import device_traits
    from grpokit.engines.packed_linear import PackedLinear
    from grpokit.engines.transformers_engine import TransformersEngine

    if args.model is None:
        model, tokenizer = tiny_model()
        length = args.max_completion_length or 16
    else:
        model, tokenizer = args.model, None
        length = args.max_completion_length or 64
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="grpokit-gpu-check-") as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            use_cpu=args.device == "cpu",
            bf16=True,
            num_generations=4,
            per_device_train_batch_size=8,
            max_completion_length=length,
            max_steps=args.steps,
            learning_rate=1e-5,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=0,
        )
        trainer = GRPOTrainer(
            model,
            char_sum,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
            processing_class=tokenizer,
        )
        policy = trainer.model
        collectives = collective_checks(trainer.world)
        traits = device_traits(trainer.device)
        name = torch.cuda.get_device_name(trainer.device) if traits.type == "cuda" else "CPU"
        print(f"gpu_check: {name}, torch {torch.__version__}; device rules: {traits}")
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        if traits.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]

    print("steps:")
    for entry in logs:
        print(
            f"  step {entry['step']}: loss {entry['loss']:.6f}, step time "
            f"{entry.get('step_time', math.nan):.3f} s, generation "
            f"{entry.get('time/generation', math.nan):.3f} s, training "
            f"{entry.get('time/training', math.nan):.3f} s"
        )
    if traits.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(trainer.device) / 2**20
        reserved = torch.cuda.max_memory_reserved(trainer.device) / 2**20
        print(f"peak CUDA memory: {allocated:.0f} MiB allocated, {reserved:.0f} MiB reserved")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"peak RSS: {rss:.0f} MiB")

    check = Checks()
    print("checks:")
    for ok, what in collectives:
        check(ok, what)
    check(trainer.device.type == args.device, f"trains on {args.device} ({trainer.device})")
    check(
        trainer.use_bf16 is traits.native_bf16,
        f"bf16 autocast {'on' if trainer.use_bf16 else 'off'}: native bf16 is {traits.native_bf16}",
    )
    check(len(logs) == args.steps, f"{len(logs)} logged steps of {args.steps}")
    check(all(math.isfinite(entry["loss"]) for entry in logs), "every loss is finite")
    after = dict(policy.named_parameters())
    changed = sum(not torch.equal(before[n], after[n].detach()) for n in before)
    check(changed > 0, f"{changed} of {len(before)} parameter tensors changed")

    engine = trainer.engine
    check(isinstance(engine, TransformersEngine), "generation by TransformersEngine")
    sampler = engine.sampler_model
    if sampler is policy:
        check(traits.sampler_dtype is None, "the sampler is the policy itself (no native bf16)")
    else:
        check(traits.sampler_dtype is not None, "a sampler copy only where bf16 is native")
        copies = engine.sampler_weights()  # linear weights held only packed come unpacked
        dtypes = {p.dtype for p in copies.values()}
        check(dtypes == {traits.sampler_dtype}, f"sampler copy dtype {dtypes}")
        stale = [n for n, p in copies.items() if not torch.equal(p, after[n].detach().to(p.dtype))]
        check(not stale, f"sampler copy equals the policy after the sync (stale: {stale[:3]})")
    packed = sum(isinstance(m, PackedLinear) for m in sampler.modules())
    check(
        (packed > 0) <= traits.pack_sampler_weights,
        f"{packed} packed oneDNN layers (allowed here: {traits.pack_sampler_weights})",
    )
    impls = {m.config._attn_implementation for m in (policy, sampler)}
    check(
        (GROUPED_ATTENTION in impls) <= traits.grouped_attention,
        f"attention {sorted(impls)} (grouped allowed here: {traits.grouped_attention})",
    )
    check(torch.get_num_threads() == threads, f"torch threads unchanged ({threads})")
    if check.failed:
        print(f"gpu_check: FAILED {len(check.failed)} check(s)")
        return 1
    print("gpu_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
