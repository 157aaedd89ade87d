"""Which rows of an optimizer step go into which micro-batch: two exact speed-ups.

The plain path splits an optimizer step's rows into consecutive micro-batches of
`per_device_train_batch_size`. Two changes leave the update identical (up to float summation
order) and save forward/backward work:

1. **Skip rows whose advantage is exactly 0.** Every per-token objective is proportional to the
   advantage (PPO clip, CISPO, SAPO, VESPO), so such a row adds exactly 0 to the loss and its
   gradient, provided nothing else couples it to the loss: no KL term (`beta == 0`) and no
   top-entropy filter (its quantile is taken over the micro-batch's tokens, skipped rows
   included). The denominators stay those of the plain path: `dapo`/`cispo`/`vespo` divide by the
   step's `num_items_in_batch` (unchanged); the per-sequence means (`grpo`, `sapo`, `luspo`) and
   `dr_grpo` divide by the rows passed, so a micro-batch of k rows is scaled by
   k / per_device_train_batch_size; `bnpo` divides by the micro-batch's loss tokens, so its kept
   rows are scaled by kept tokens / micro-batch tokens. A group whose G rewards are all equal has
   all-zero advantages (`frac_reward_zero_std`), so this skips whole groups.
2. **Bucket rows by completion length.** The micro-batch is trimmed to its longest row, so
   grouping rows of similar length removes padding columns. Allowed when the update does not
   depend on which rows share a micro-batch: every aggregation but `bnpo` (which divides by the
   micro-batch's own token count), and no top-entropy filter.

Logged per-micro-batch metrics (entropy, clip ratios) are then averaged over different groupings
and exclude skipped rows; the update is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpokit.train.rollout import RolloutBatch

# Aggregations that divide by the number of rows passed to `policy_loss` (see grpokit.core.losses).
ROW_NORMALISED_LOSS_TYPES = ("grpo", "sapo", "luspo", "dr_grpo")


@dataclass
class MicroBatch:
    """Rows of the rollout batch trained together, and the factor that keeps the plain path's
    denominator. rows: `[n]` long indices into the batch."""

    rows: Tensor
    scale: float


def plan_micro_batches(
    advantages: Tensor,
    completion_mask: Tensor,
    loss_mask: Tensor,
    rows: range,
    size: int,
    *,
    loss_type: str,
    beta: float,
    top_entropy_quantile: float,
    skip_zero_advantage: bool = True,
    bucket_by_length: bool = True,
) -> list[MicroBatch]:
    """Split an optimizer step's `rows` into micro-batches, skipping and bucketing when exact.

    Args:
        advantages: `[N]` (or `[N, T]`) advantages of the whole rollout batch.
        completion_mask: `[N, T]` 1 up to and including EOS (the length a row is trimmed to).
        loss_mask: `[N, T]` 1 = the token counts in the loss.
        rows: The optimizer step's rows (a multiple of `size` long).
        size: `per_device_train_batch_size`.
        loss_type: The aggregation decides which denominators must be kept.
        beta: KL coefficient; rows with zero advantage are skipped only when it is 0.
        top_entropy_quantile: Any filter (< 1) couples rows; then nothing is skipped or moved.
        skip_zero_advantage: Allow speed-up 1 (module docstring).
        bucket_by_length: Allow speed-up 2.

    Returns:
        Micro-batches in training order; empty when every row of the step has zero advantage
        and may be skipped. Multiply each micro-batch's loss by its `scale`.
    """
    index = torch.arange(rows.start, rows.stop)  # [R]
    coupled = top_entropy_quantile < 1.0
    skip = skip_zero_advantage and beta == 0 and not coupled
    regroup = loss_type != "bnpo" and not coupled
    adv = advantages[index]
    nonzero = (adv != 0).reshape(len(index), -1).any(-1)  # [R]
    if not regroup:
        plan = []
        for start in range(0, len(index), size):
            chunk = index[start : start + size]
            kept = chunk[nonzero[start : start + size]] if skip else chunk
            if len(kept) == 0:
                continue
            tokens = loss_mask[chunk].sum().clamp(min=1)
            scale = float(loss_mask[kept].sum().clamp(min=1) / tokens) if skip else 1.0
            plan.append(MicroBatch(kept, scale))
        return plan
    kept = index[nonzero] if skip else index
    if bucket_by_length:
        lengths = completion_mask[kept].sum(-1)  # [R']
        kept = kept[torch.argsort(lengths, stable=True)]
    plan = []
    for start in range(0, len(kept), size):
        chunk = kept[start : start + size]
        scale = len(chunk) / size if loss_type in ROW_NORMALISED_LOSS_TYPES else 1.0
        plan.append(MicroBatch(chunk, scale))
    return plan


def select_rows(batch: RolloutBatch, rows: Tensor) -> RolloutBatch:
    """The rollout batch restricted to `rows` (`[n]` long indices), in that order."""

    def take(value: Tensor | None) -> Tensor | None:
        return None if value is None else value[rows]

    return RolloutBatch(
        prompt_ids=batch.prompt_ids[rows],
        prompt_mask=batch.prompt_mask[rows],
        completion_ids=batch.completion_ids[rows],
        completion_mask=batch.completion_mask[rows],
        loss_mask=batch.loss_mask[rows],
        advantages=batch.advantages[rows],
        old_logprobs=take(batch.old_logprobs),
        ref_logprobs=take(batch.ref_logprobs),
        sampling_logprobs=take(batch.sampling_logprobs),
    )
