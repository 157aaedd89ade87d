"""Time one GRPO optimizer step (forward + backward + AdamW) of SmolLM2-135M-Instruct on a fixed
rollout batch, with each trainer-side speed-up switched on in turn. Prints seconds; no asserts.

    .venv/bin/python bench/trainer_speed.py [--max-completion-length 128] [--repeats 3]

Workload (issue 5): 2 prompts x 8 completions, natural length (stop at EOS), loss dapo, beta 0,
per_device_train_batch_size 8 x gradient_accumulation_steps 2. The rollout batch is generated
once; one of the two groups gets all-zero advantages (frac_reward_zero_std = 0.5, common with
0/1 rewards), the other the advantages of a length reward.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from datasets import Dataset

from grpokit import GRPOConfig, GRPOTrainer
from grpokit.train.rollout import RolloutBatch


def full_width(self: RolloutBatch, rows: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The untrimmed micro-batch: every prompt-padding and completion-padding column."""
    ids = torch.cat([self.prompt_ids[rows], self.completion_ids[rows]], dim=1)
    mask = torch.cat([self.prompt_mask[rows], self.completion_mask[rows]], dim=1)
    return ids, mask, int(self.completion_ids.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-completion-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args()
    prompts = ["Write a haiku about the sea.", "What is the capital of France? Answer briefly."]
    args = GRPOConfig(
        output_dir="/tmp/grpokit-trainer-speed",
        num_generations=8,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_completion_length=opts.max_completion_length,
        max_steps=1000,
        learning_rate=1e-6,
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = GRPOTrainer(
        "smollm2-135m-instruct",
        lambda completions, **kw: [float(len(c)) for c in completions],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
    )
    trainer.optimizer.step = lambda *a, **k: None  # type: ignore[method-assign]  # same weights
    start = time.perf_counter()
    _, prompt_ids, _ = trainer.sample_prompts()
    gen = trainer.generate(prompt_ids)
    print(f"generation: {time.perf_counter() - start:.1f} s (not part of the comparison)")
    lengths = gen.completion_mask.sum(1)
    print(f"completion lengths: {lengths.tolist()}  (T = {gen.completion_ids.shape[1]})")
    adv = (lengths.float() - lengths.float().mean()) / (lengths.float().std() + 1e-4)
    adv[8:] = 0.0  # the second group: all rewards equal
    batch = trainer.build_rollout_batch(gen, adv)

    def timed(label: str, *, trim: bool, bucket: bool, skip: bool) -> None:
        trainer.bucket_by_length, trainer.skip_zero_advantage = bucket, skip
        original = RolloutBatch.trimmed
        if not trim:
            RolloutBatch.trimmed = full_width  # type: ignore[method-assign]
        try:
            times = []
            for _ in range(opts.repeats):
                t0 = time.perf_counter()
                trainer.optimizer_step(batch, range(0, batch.size))
                times.append(time.perf_counter() - t0)
        finally:
            RolloutBatch.trimmed = original  # type: ignore[method-assign]
        print(f"{label:<44} median {sorted(times)[len(times) // 2]:.2f} s  (all {times})")

    print(f"torch threads: {torch.get_num_threads()}, bf16 autocast: {trainer.use_bf16}")
    timed("plain: full width, no skip, no buckets", trim=False, bucket=False, skip=False)
    timed("trim micro-batches", trim=True, bucket=False, skip=False)
    timed("trim + length buckets", trim=True, bucket=True, skip=False)
    timed("trim + length buckets + skip zero advantages", trim=True, bucket=True, skip=True)


if __name__ == "__main__":
    main()
