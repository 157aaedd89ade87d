"""Time and peak memory of the training side of one optimizer step, by memory setting.

The bar workload's update (SmolLM2-135M-Instruct, 16 rows of a 37-token prompt + 128 completion
tokens, one micro-batch of 16, dapo, bf16 autocast, fused AdamW) on a fixed batch of random
completion tokens with random non-zero advantages, through `GRPOTrainer.optimizer_step`. Each
setting runs in its own process (so its peak RSS is its own): one warm-up step, then `--repeats`
measured steps; printed per setting: the median forward+backward seconds, the median optimizer
seconds (`time/forward_backward`, `time/optimizer` of the step's metrics) and the process's peak
RSS. Generation is not run (no sampler copy is built), so the RSS is the training side's.

Usage:
    python bench/train_memory_speed.py [--repeats 3] [--settings none 990 660 ckpt]
    python bench/train_memory_speed.py --interleave --repeats 5   # timing only, one process

A setting is `none` (one forward per micro-batch), a number (`max_forward_tokens`), `auto` (the
default: the bound the device sets), or `ckpt` (`gradient_checkpointing=True`); `ckpt:N` combines
both. Time it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent


def setting_overrides(setting: str) -> dict[str, Any]:
    """`none`, `N`, `ckpt`, `ckpt:N` or `auto` (the default bound) -> the GRPOConfig fields it
    sets."""
    if setting == "auto":
        return {"gradient_checkpointing": False, "max_forward_tokens": "auto"}
    checkpointing = setting.startswith("ckpt")
    tokens = setting.partition(":")[2] if checkpointing else setting.replace("none", "")
    return {
        "gradient_checkpointing": checkpointing,
        "max_forward_tokens": int(tokens) if tokens else None,
    }


class FixedEngine:
    """A generation engine that returns random full-length completions (no model call)."""

    def __init__(self, completion_len: int, vocab: int, pad: int) -> None:
        self.completion_len, self.vocab, self.pad = completion_len, vocab, pad

    def generate(
        self, prompt_ids: list[list[int]], *, num_generations: int, max_new_tokens: int, **kw: Any
    ) -> Any:
        import torch

        from grpokit.engines.base import GenerationOutput, left_pad

        ids, mask = left_pad(prompt_ids, self.pad)  # [B, P]
        n = ids.shape[0] * num_generations
        generator = torch.Generator().manual_seed(0)
        completion = torch.randint(0, self.vocab, (n, self.completion_len), generator=generator)
        return GenerationOutput(
            ids.repeat_interleave(num_generations, dim=0),
            mask.repeat_interleave(num_generations, dim=0),
            completion,
            torch.ones(n, self.completion_len, dtype=torch.long),
            torch.ones(n, dtype=torch.bool),
        )

    def update_weights(self, model: Any) -> None:
        del model


def build(setting: str, threads: int) -> tuple[Any, Any]:
    """The trainer for `setting` and its fixed rollout batch."""
    sys.path.insert(0, str(BENCH_DIR))
    import bench_grpo
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit import GRPOConfig, GRPOTrainer
    from grpokit.train import optimizers

    torch.set_num_threads(threads)
    path = bench_grpo.resolve_model(bench_grpo.DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = bench_grpo.equal_length_prompts(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    workload = bench_grpo.Workload()
    kwargs = workload.config_kwargs(tempfile.mkdtemp(prefix="train-memory-"), 100)
    kwargs.update(setting_overrides(setting))
    engine = FixedEngine(workload.max_completion_length, model.config.vocab_size, 0)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=bench_grpo.length_reward,
        args=GRPOConfig(**kwargs),
        train_dataset=Dataset.from_list(bench_grpo.prompt_rows(prompts)),
        processing_class=tokenizer,
        generation_engine=engine,
    )
    _, prompt_ids, _ = trainer.sample_prompts()
    gen = trainer.generate(prompt_ids)
    generator = torch.Generator().manual_seed(1)
    advantages = torch.randn(gen.completion_ids.shape[0], generator=generator)  # [N], non-zero
    batch = trainer.build_rollout_batch(gen, advantages)
    trainer.model.train()
    # AdamW's state made before the first step, as `GRPOTrainer.train` makes it: made by that
    # step instead, it lands in the memory the step's activations freed, and the next step's
    # activations page-fault about 1 GB in afresh (bench/RESULTS.md)
    optimizers.allocate_state(trainer.optimizer)
    return trainer, batch


def apply_setting(trainer: Any, setting: str) -> None:
    """Switch a built trainer to `setting` (for interleaved timing): its activation bound as the
    trainer resolves it for that config (`auto` = the device's choice)."""
    import copy

    from grpokit.train import build as train_build

    args = copy.copy(trainer.args)  # the resolved config, without checking it again
    for name, value in setting_overrides(setting).items():
        setattr(args, name, value)
    bound = train_build.resolve_activation_bound(
        args,
        trainer.device_traits,
        bf16=trainer.use_bf16,
        model=trainer.model,
        frozen_gradient_bytes=train_build.frozen_gradient_bytes(trainer.model),
    )
    trainer.activation_bound = bound
    trainer.max_forward_tokens = bound.max_forward_tokens
    if bound.recompute:
        trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
    else:
        trainer.model.gradient_checkpointing_disable()


def worker(setting: str, repeats: int, threads: int) -> dict[str, Any]:
    trainer, batch = build(setting, threads)
    steps = [trainer.optimizer_step(batch, range(batch.size)) for _ in range(repeats + 1)][1:]
    return {
        "setting": setting,
        "forward_backward_s": statistics.median(s["time/forward_backward"] for s in steps),
        "optimizer_s": statistics.median(s["time/optimizer"] for s in steps),
        "runs_s": [round(s["time/forward_backward"], 3) for s in steps],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loadavg": os.getloadavg(),
    }


def interleaved(settings: list[str], repeats: int, threads: int) -> None:
    """One process, the settings taken in turn `repeats` times (slow drifts of a shared machine
    hit every setting alike); prints each setting's forward+backward seconds."""
    trainer, batch = build(settings[0], threads)
    times: dict[str, list[float]] = {s: [] for s in settings}
    for round_ in range(repeats + 1):
        for setting in settings:
            apply_setting(trainer, setting)
            seconds = trainer.optimizer_step(batch, range(batch.size))["time/forward_backward"]
            if round_:  # the first round warms up
                times[setting].append(seconds)
    print(f"interleaved, {repeats} rounds; load average {os.getloadavg()}")
    print("| setting | fwd+bwd s (median) | runs |")
    print("|---|---|---|")
    for setting, runs in times.items():
        rounded = [round(t, 2) for t in runs]
        print(f"| {setting} | {statistics.median(runs):.2f} | {rounded} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["none", "990", "660", "ckpt"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--interleave", action="store_true", help="time only, all settings in one process"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.interleave:
        interleaved(args.settings, args.repeats, args.threads)
        return
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.repeats, args.threads)))
        return
    print(f"load average {os.getloadavg()}")
    print("| setting | fwd+bwd s (median) | runs | optimizer s | peak RSS MiB | load |")
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        cmd = [sys.executable, __file__, "--worker", setting]
        cmd += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {setting} | {r['forward_backward_s']:.2f} | {r['runs_s']} | "
            f"{r['optimizer_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['loadavg'][0]:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
