"""The metrics of the policy loss, with TRL's names and meanings (docs/LOSSES.md, docs/METRICS.md).

Every metric is a detached 0-dim tensor. A mean is taken as TRL takes it (`trl_mean`): over the N
sequences when the value is one per sequence (`[N, 1]`: a sequence-level ratio with per-sequence
advantages), else over the loss tokens. Keys whose last part starts or ends with `min` / `max`
are min- or max-reduced across micro-batches by the trainer, the rest averaged.

- `clip_ratio_metrics` (the PPO-clip loss types) and `cispo_clip_metrics`: a loss type's own
  metrics (`LossSpec.metrics` in `core.losses`);
- `policy_loss_metrics`: what `policy_loss` returns, the loss type's metrics then `ratio/*`,
  `kl` and `entropy`;
- `rollout_is_metrics`: the `rollout_is/*` metrics of `core.importance.rollout_importance_weights`.

Shapes: `N` sequences, `T` completion positions; `mask` is `[N, T]` bool, True = loss token.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from grpokit.core.masking import masked_extreme, masked_mean, zero_padding

if TYPE_CHECKING:
    from grpokit.core.losses import LossInputs


def trl_mean(values: Tensor, mask: Tensor) -> Tensor:
    """TRL's metric mean: over the N rows (padding-only rows included) when `values` is `[N, 1]`,
    one value per sequence; over the loss tokens when it is `[N, T]`."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))  # bool -> float32
    if values.shape[-1] == 1:
        return values.mean()
    return masked_mean(values, mask)


def per_sequence_extreme(
    values: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor]
) -> Tensor:
    """TRL's `clip_ratio/low_min`, `high_max`: min or max over sequences of each sequence's mean
    (an `[N, 1]` value is its own mean); rows without loss tokens are left out; NaN if none."""
    values = values.to(torch.promote_types(values.dtype, torch.float32))  # bool -> float32
    if values.shape[-1] == 1:
        per_row = values[:, 0]
    else:
        counts = mask.sum(-1)
        per_row = (zero_padding(values, mask).sum(-1) / counts.clamp(min=1))[counts > 0]
    if per_row.numel() == 0:
        return torch.full((), math.nan, device=values.device)
    return reduce(per_row)


def clip_ratio_metrics(x: LossInputs) -> dict[str, Tensor]:
    """TRL's `clip_ratio/*`: low = ratio < 1 - epsilon_low with A < 0, high = ratio > 1 +
    epsilon_high with A > 0; `*_mean` by `trl_mean`, `low_min` / `high_max` per sequence."""
    o, ratio, adv = x.options, x.natural_ratio, x.advantages
    if o.delta is not None:
        ratio = ratio.clamp(max=o.delta)
    low = (ratio < 1 - o.epsilon_low) & (adv < 0)
    high = (ratio > 1 + o.epsilon_high) & (adv > 0)
    return {
        "clip_ratio/low_mean": trl_mean(low, x.mask),
        "clip_ratio/high_mean": trl_mean(high, x.mask),
        "clip_ratio/region_mean": trl_mean(low | high, x.mask),
        "clip_ratio/low_min": per_sequence_extreme(low, x.mask, torch.amin),
        "clip_ratio/high_max": per_sequence_extreme(high, x.mask, torch.amax),
    }


def cispo_clip_metrics(x: LossInputs) -> dict[str, Tensor]:
    """TRL's `cispo_clip_ratio`: the share with the weight capped (ratio > cap) and A > 0."""
    capped = (x.natural_ratio > x.options.cispo_cap) & (x.advantages > 0)
    return {"cispo_clip_ratio": trl_mean(capped, x.mask)}


def policy_loss_metrics(
    x: LossInputs, kl: Tensor | None, entropies: Tensor | None
) -> dict[str, Tensor]:
    """The loss type's own metrics (`LossSpec.metrics`), then `ratio/*`, `kl` and `entropy`.

    Args:
        x: The inputs the loss was computed from.
        kl: `[N, T]` per-token KL (after the bias correction), or None when `beta == 0`.
        entropies: `[N, T]` per-token entropies, or None when not given.
    """
    with torch.no_grad():
        metrics = x.options.spec.metrics(x) if x.options.spec.metrics is not None else {}
        ratio, mask = x.ratio.detach(), x.mask  # [N, T]: grpokit's, over loss tokens
        metrics.update(
            {
                "ratio/mean": masked_mean(ratio - 1, mask) + 1,  # 1 (neutral) without loss tokens
                "ratio/min": masked_extreme(ratio, mask, torch.amin),
                "ratio/max": masked_extreme(ratio, mask, torch.amax),
            }
        )
        if kl is not None:
            metrics["kl"] = masked_mean(kl.detach(), mask)
        if entropies is not None:
            metrics["entropy"] = masked_mean(entropies.detach().float(), mask)
    return metrics


def rollout_is_metrics(
    weights: Tensor, outside: Tensor, old_logprobs: Tensor, sampling_logprobs: Tensor, mask: Tensor
) -> dict[str, Tensor]:
    """`rollout_is/mean|min|max` of the weights, `rollout_is/frac_modified` (the share of loss
    tokens truncated or masked) and `rollout_is/logprob_abs_diff/mean|max`, over loss tokens.

    Args:
        weights: The rollout importance weights, `[N, T]` (0 at padding) or `[N, 1]`.
        outside: bool, same shape: the raw weight was outside `[clip_min, clip_max]`.
        old_logprobs: `[N, T]` log-probs of the trained model at the sampling weights.
        sampling_logprobs: `[N, T]` log-probs reported by the rollout engine.
        mask: `[N, T]` bool, True = loss token.
    """
    abs_diff = (old_logprobs.float() - sampling_logprobs.float()).abs()
    return {
        "rollout_is/mean": masked_mean(weights, mask),
        "rollout_is/min": masked_extreme(weights, mask, torch.amin),
        "rollout_is/max": masked_extreme(weights, mask, torch.amax),
        "rollout_is/frac_modified": masked_mean(outside.float(), mask),
        "rollout_is/logprob_abs_diff/mean": masked_mean(abs_diff, mask),
        "rollout_is/logprob_abs_diff/max": masked_extreme(abs_diff, mask, torch.amax),
    }
