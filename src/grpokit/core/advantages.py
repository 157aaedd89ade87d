"""Group-relative advantages (GRPO, DeepSeekMath arXiv 2402.03300 §4.1.2) and their statistics.

Rewards come as `[N]` or `[N, K]` (K reward functions) with `N = B * G`: groups of
`G = num_generations` consecutive rows share one prompt. The advantage of a completion is its
reward minus its group's mean, optionally divided by a standard deviation. Standard deviations are
Bessel-corrected and guarded by `+ 1e-4`, as in TRL, so `[1, 0, 0, 0]` gives
`[1.4997, -0.4999, -0.4999, -0.4999]`.

NaN means "this reward function does not apply to this sample": NaN entries are left out of every
sum, mean and standard deviation; a sample with no valid reward at all gets advantage 0 and does
not count in its group's statistics.

A group whose rewards are all equal (max == min over its valid entries) gets advantages of exactly
0 in every mode. Computed naively it would not: the float32 mean of G copies of a value such as 0.3
need not round back to 0.3, and the difference, divided by a tiny std + 1e-4, would give the
group advantages of order 1e-4 (0.3) to 1 (1e6 + 0.1) and keep it from the zero-advantage skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

STD_EPS = 1e-4  # TRL's guard: advantages = centred / (std + 1e-4)
SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


class AdvantageOutput(NamedTuple):
    """What `group_advantages` returns."""

    advantages: Tensor
    """`[N]` float32 advantages; 0 for samples without any valid reward."""
    rewards: Tensor
    """`[N]` combined (weighted) reward per sample; NaN-free (0 where no reward applies)."""
    metrics: dict[str, float]
    """`reward`, `reward_std`, `frac_reward_zero_std`, `rewards/{k}/mean`, `rewards/{k}/std`."""


def _masked_mean(values: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Mean of `values` over `dim` counting only `valid` entries (0 when none is valid)."""
    total = torch.where(valid, values, 0.0).sum(dim, keepdim=True)
    count = valid.sum(dim, keepdim=True)
    return total / count.clamp(min=1)


def _masked_std(values: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Bessel-corrected std over `dim` of the `valid` entries (0 with fewer than two)."""
    mean = _masked_mean(values, valid, dim)
    squared = torch.where(valid, (values - mean) ** 2, 0.0).sum(dim, keepdim=True)
    count = valid.sum(dim, keepdim=True)
    variance = squared / (count - 1).clamp(min=1)
    return torch.where(count > 1, variance.sqrt(), torch.zeros_like(variance))


def _is_constant(values: Tensor, valid: Tensor, dim: int) -> Tensor:
    """Whether no two `valid` entries along `dim` differ (max == min; True with fewer than two
    valid entries). Keeps `dim` with size 1."""
    highest = torch.where(valid, values, -torch.inf).amax(dim, keepdim=True)
    lowest = torch.where(valid, values, torch.inf).amin(dim, keepdim=True)
    return highest <= lowest


def _center_and_scale(
    rewards: Tensor, valid: Tensor, num_generations: int, scale_rewards: str
) -> tuple[Tensor, Tensor]:
    """Group-centred advantages `[N]` scaled per `scale_rewards`, and the group stds `[N]`."""
    grouped = rewards.view(-1, num_generations)  # [B, G]
    grouped_valid = valid.view(-1, num_generations)  # [B, G]
    group_mean = _masked_mean(grouped, grouped_valid, dim=1)  # [B, 1]
    # Exactly 0 for a group of equal rewards, whose float32 mean may be 1 ulp off.
    constant = _is_constant(grouped, grouped_valid, dim=1)  # [B, 1]
    group_std = torch.where(constant, 0.0, _masked_std(grouped, grouped_valid, dim=1))  # [B, 1]
    centred = torch.where(constant, 0.0, grouped - group_mean)  # [B, G]
    if scale_rewards == "group":  # GRPO (DeepSeekMath Eq. 3)
        centred = centred / (group_std + STD_EPS)
    elif scale_rewards == "batch":  # group mean, batch std (Lite PPO, arXiv 2508.08221)
        batch_std = _masked_std(rewards, valid, dim=0)  # [1]
        centred = centred / (batch_std + STD_EPS)
    # "none": Dr. GRPO (arXiv 2503.20783 §3.2) keeps the centred reward.
    advantages = torch.where(grouped_valid, centred, 0.0).reshape(-1)  # [N]
    return advantages, group_std.expand_as(grouped).reshape(-1)


def _sum_then_normalize(
    per_func: Tensor, valid: Tensor, weights: Tensor, num_generations: int, scale_rewards: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted sum of the K rewards, then group normalisation (TRL's default aggregation)."""
    combined = torch.where(valid, per_func * weights, 0.0).sum(-1)  # [N]
    sample_valid = valid.any(-1)  # [N]
    advantages, group_std = _center_and_scale(
        combined, sample_valid, num_generations, scale_rewards
    )
    return advantages, combined, group_std


def _normalize_then_sum(
    per_func: Tensor, valid: Tensor, weights: Tensor, num_generations: int, scale_rewards: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Normalise each reward per group, weighted sum, then normalise over the batch.

    GDPO-style multi-reward normalisation (as TRL's `multi_objective_aggregation=
    "normalize_then_sum"`): each reward function is centred and divided by its own group std
    before the weighted sum, so a reward with a large scale cannot drown the others. The batch
    normalisation at the end always divides by the batch std; `scale_rewards` is not used.
    """
    n, k = per_func.shape
    grouped = per_func.view(-1, num_generations, k)  # [B, G, K]
    grouped_valid = valid.view(-1, num_generations, k)
    mean_k = _masked_mean(grouped, grouped_valid, dim=1)  # [B, 1, K]
    std_k = _masked_std(grouped, grouped_valid, dim=1)  # [B, 1, K]
    constant_k = _is_constant(grouped, grouped_valid, dim=1)  # [B, 1, K]
    centred = torch.where(constant_k, 0.0, grouped - mean_k)  # [B, G, K]
    normalized = (centred / (std_k + STD_EPS)).view(n, k)  # [N, K]
    summed = torch.where(valid, normalized * weights, 0.0).sum(-1)  # [N]
    sample_valid = valid.any(-1)  # [N]
    batch_mean = _masked_mean(summed, sample_valid, dim=0)
    batch_std = _masked_std(summed, sample_valid, dim=0)
    advantages = torch.where(sample_valid, (summed - batch_mean) / (batch_std + STD_EPS), 0.0)
    # Each function's normalised rewards sum to 0 over a group, so batch_mean is 0 up to rounding:
    # a group where every function's rewards are equal keeps exactly 0.
    group_constant = constant_k.all(-1).expand(-1, num_generations).reshape(-1)  # [N]
    advantages = torch.where(group_constant, 0.0, advantages)
    combined = torch.where(valid, per_func * weights, 0.0).sum(-1)  # [N] raw weighted reward
    group_std = _center_and_scale(combined, sample_valid, num_generations, "none")[1]
    return advantages, combined, group_std


_AGGREGATIONS: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "sum_then_normalize": _sum_then_normalize,
    "normalize_then_sum": _normalize_then_sum,
}


def check_reward_weights(
    reward_weights: Sequence[float] | Tensor | None, num_rewards: int, names: Sequence[str] = ()
) -> None:
    """Raise unless `reward_weights` is None (all 1.0) or holds one weight per reward function.

    The one check of the `reward_weights` option: `group_advantages` applies it to its K reward
    columns, and the trainer, the run-config validation and evaluation call it with their reward
    functions before any generation.

    Args:
        reward_weights: The weights: a sequence of K numbers, a `[K]` tensor, or None.
        num_rewards: K, the number of reward functions.
        names: The reward functions' names, shown in the error.

    Raises:
        ValueError: naming both counts (and the rewards) and the fix.
    """
    if reward_weights is None:
        return
    if isinstance(reward_weights, Tensor) and reward_weights.dim() != 1:
        raise ValueError(
            f"reward_weights must be a flat list of {num_rewards} numbers (one per reward "
            f"function), got a tensor of shape {tuple(reward_weights.shape)}."
        )
    count = len(reward_weights)
    if count != num_rewards:
        listed = f" ({', '.join(names)})" if names else ""
        raise ValueError(
            f"reward_weights has {count} entries but there are {num_rewards} reward "
            f"functions{listed}; give one weight per reward function, or none for all 1.0."
        )


def _validate(
    rewards: Tensor,
    num_generations: int,
    weights: Tensor,
    scale_rewards: str,
    aggregation: str,
) -> None:
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}.")
    if aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
            f"got {aggregation!r}."
        )
    if num_generations < 1 or rewards.shape[0] % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.shape[0]} rows, which is not a multiple of num_generations="
            f"{num_generations}; pass whole groups of consecutive completions."
        )
    check_reward_weights(weights, rewards.shape[1])
    if torch.isinf(rewards).any():
        raise ValueError("rewards contain +-inf; use NaN for 'does not apply' or finite values.")


def group_advantages(
    rewards: Tensor,
    num_generations: int,
    *,
    reward_weights: Sequence[float] | Tensor | None = None,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
) -> AdvantageOutput:
    """Group-relative advantages of `N = B * G` completions.

    Args:
        rewards: `[N]` or `[N, K]` rewards (K reward functions); rows `g*G .. g*G+G-1` are the G
            completions of prompt g. NaN = the function does not apply to that sample.
        num_generations: `G`, completions per prompt.
        reward_weights: `K` weights of the reward functions (default: all 1).
        scale_rewards: `"group"` divides by the group's std (GRPO), `"batch"` by the whole batch's
            std with the group mean kept, `"none"` only centres (Dr. GRPO).
        multi_objective_aggregation: `"sum_then_normalize"` (weighted sum of the K rewards, then
            the scaling above) or `"normalize_then_sum"` (normalise each reward per group, weighted
            sum, then normalise over the batch).

    Returns:
        `AdvantageOutput(advantages [N] float32, rewards [N] combined reward, metrics)`. Metrics:
        `reward` and `reward_std` (mean and Bessel std of the combined reward over samples with a
        valid reward), `frac_reward_zero_std` (fraction of groups whose combined-reward std is 0),
        and `rewards/{k}/mean`, `rewards/{k}/std` per function index k over its non-NaN entries
        (NaN when a function applied to no sample).

    Raises:
        ValueError: on unknown option names, a row count not divisible by `num_generations`, a
            weight count different from K, or infinite rewards.
    """
    per_func = rewards.detach().float()
    if per_func.dim() == 1:
        per_func = per_func.unsqueeze(-1)  # [N, 1]
    if per_func.dim() != 2:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}.")
    weights = (
        torch.ones(per_func.shape[1])
        if reward_weights is None
        else torch.as_tensor(reward_weights, dtype=torch.float32)
    ).to(per_func.device)
    _validate(per_func, num_generations, weights, scale_rewards, multi_objective_aggregation)

    valid = ~torch.isnan(per_func)  # [N, K]; True = this function scored this sample
    aggregate = _AGGREGATIONS[multi_objective_aggregation]
    advantages, combined, group_std = aggregate(
        per_func, valid, weights, num_generations, scale_rewards
    )

    sample_valid = valid.any(-1)
    metrics = {
        "reward": _masked_mean(combined, sample_valid, 0).item(),
        "reward_std": _masked_std(combined, sample_valid, 0).item(),
        "frac_reward_zero_std": (group_std.view(-1, num_generations)[:, 0] < 1e-6)
        .float()
        .mean()
        .item(),
    }
    for k in range(per_func.shape[1]):
        column, column_valid = per_func[:, k], valid[:, k]
        applies = bool(column_valid.any())
        nan = float("nan")
        metrics[f"rewards/{k}/mean"] = (
            _masked_mean(column, column_valid, 0).item() if applies else nan
        )
        metrics[f"rewards/{k}/std"] = (
            _masked_std(column, column_valid, 0).item() if applies else nan
        )
    return AdvantageOutput(advantages.float(), combined, metrics)
