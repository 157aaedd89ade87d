"""Importance weights of the policy loss: the policy ratio and the rollout-engine correction.

- `log_importance_weights`: `log(pi_theta / pi_old)` at the token, sequence (GSPO) or
  sequence_token (GSPO-token) level, the ratio every loss type starts from (`core.losses`);
- `off_policy_sequence_mask`: DeepSeek-V3.2's drop of sequences the behaviour policy has drifted
  too far from;
- `rollout_importance_weights`: the detached `pi_train / pi_rollout` weights (truncated or masked)
  that correct for a rollout engine whose log-probs differ from the trained model's.

Shapes: `N` sequences, `T` completion positions; log-probs are `[N, T]`; `completion_mask` is
`[N, T]` with 1 = the token counts in the loss (the EOS token counts, padding after it does not).
"""

from __future__ import annotations

import torch
from torch import Tensor

from grpokit.core.loss_metrics import rollout_is_metrics
from grpokit.core.masking import check_same_shape, zero_padding

IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence", "sequence_token")
ROLLOUT_IS_MODES: tuple[str, ...] = (
    "token_truncate",
    "token_mask",
    "sequence_truncate",
    "sequence_mask",
)


# ---------------------------------------------------------------------------------------------
# The policy ratio
# ---------------------------------------------------------------------------------------------


def log_importance_weights(
    logprobs: Tensor, old_logprobs: Tensor, completion_mask: Tensor, level: str = "token"
) -> Tensor:
    """Log importance weights `log(pi_theta / pi_old)`, `[N, T]`, at the chosen level.

    - `"token"` (GRPO, DeepSeekMath Eq. 3): the per-token log-ratio.
    - `"sequence"` (GSPO, arXiv 2507.18071 Eq. 7): the length-normalised sequence log-ratio
      `(1/|o_i|) sum_t log r_it`, broadcast to every token; its gradient reaches every token of
      the sequence equally (TRL's form; identical to GSPO when advantages are per sequence).
    - `"sequence_token"` (GSPO-token, Eq. 13-14): `sg[log s_i] + logprobs - sg[logprobs]`. The
      value equals the sequence level; token t's gradient goes to token t alone.

    Args:
        logprobs: `[N, T]` log-probs under the current policy (with grad).
        old_logprobs: `[N, T]` log-probs under the policy that sampled the completions.
        completion_mask: `[N, T]` bool; True = loss token.
        level: One of `IMPORTANCE_SAMPLING_LEVELS`.

    Returns:
        `[N, T]` log-weights (0 at padding for the token level).
    """
    log_ratio = zero_padding(logprobs - old_logprobs, completion_mask)  # [N, T]
    if level == "token":
        return log_ratio
    lengths = completion_mask.sum(-1, keepdim=True).clamp(min=1)  # [N, 1]
    sequence = (log_ratio.sum(-1, keepdim=True) / lengths).expand_as(log_ratio)  # [N, T]
    if level == "sequence":
        return sequence
    if level == "sequence_token":
        return sequence.detach() + logprobs - logprobs.detach()
    raise ValueError(
        f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}."
    )


# ---------------------------------------------------------------------------------------------
# Behaviour policy and rollout engine
# ---------------------------------------------------------------------------------------------


def off_policy_sequence_mask(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    completion_mask: Tensor,
    threshold: float,
) -> Tensor:
    """DeepSeek-V3.2 off-policy sequence masking (arXiv 2512.02556), `[N, 1]` or `[N, T]` bool.

    Drops a sequence with negative advantage when its mean per-token `log(pi_behaviour / pi_theta)`
    exceeds `threshold`; sequences with A >= 0 are always kept.
    """
    log_gap = zero_padding(behaviour_logprobs - logprobs.detach(), completion_mask)
    mean_gap = log_gap.sum(-1, keepdim=True) / completion_mask.sum(-1, keepdim=True).clamp(min=1)
    return (advantages >= 0) | (mean_gap <= threshold)


def rollout_importance_weights(
    old_logprobs: Tensor,
    sampling_logprobs: Tensor,
    completion_mask: Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float = 3.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Detached weights `pi_train / pi_rollout` (at the sampling weights) for a rollout mismatch.

    Truncated IS (TIS, Yao et al. 2025; after IMPALA arXiv 1606.02647) caps the weight at
    `clip_max` (and floors it at `clip_min` when given); masked IS (MIS / IcePop) sets weights
    outside `[clip_min, clip_max]` to 0. Token modes weight each token by its own ratio, `[N, T]`;
    sequence modes give one weight per sequence, `[N, 1]`: the product of its token ratios (the
    exact sequence likelihood ratio, no length normalisation), as TRL. Multiply the per-token
    loss by the result (`policy_loss(rollout_is_weights=...)` does; VESPO folds it into its
    sequence ratio instead).

    Args:
        old_logprobs: `[N, T]` log-probs of the trained model at the sampling weights.
        sampling_logprobs: `[N, T]` log-probs reported by the rollout engine.
        completion_mask: `[N, T]`; 1 = loss token.
        mode: One of `ROLLOUT_IS_MODES`.
        clip_min: Lower bound (None = no lower bound).
        clip_max: Upper bound (> 0).

    Returns:
        `(weights, metrics)`: `weights` float32, detached, `[N, T]` (0 at padding) for the token
        modes or `[N, 1]` for the sequence modes; metrics
        `rollout_is/mean|min|max`, `rollout_is/frac_modified` (fraction of loss tokens truncated or
        masked) and `rollout_is/logprob_abs_diff/mean|max`, all 0-dim detached tensors.

    Raises:
        ValueError: on an unknown mode, bounds out of order, or mismatched shapes.
    """
    if mode not in ROLLOUT_IS_MODES:
        raise ValueError(f"mode must be one of {ROLLOUT_IS_MODES}, got {mode!r}.")
    if not clip_max > 0 or (clip_min is not None and not 0 <= clip_min < clip_max):
        raise ValueError(
            f"need 0 <= clip_min < clip_max and clip_max > 0; got clip_min={clip_min}, "
            f"clip_max={clip_max}."
        )
    check_same_shape(old_logprobs, old_logprobs=old_logprobs, sampling_logprobs=sampling_logprobs)
    check_same_shape(old_logprobs, completion_mask=completion_mask)
    mask = completion_mask.bool()
    with torch.no_grad():
        log_gap = zero_padding(old_logprobs.float() - sampling_logprobs.float(), mask)  # [N, T]
        if mode.startswith("sequence"):
            log_gap = log_gap.sum(-1, keepdim=True)  # [N, 1]
        raw = torch.exp(log_gap)
        low = 0.0 if clip_min is None else clip_min
        outside = (raw > clip_max) | (raw < low)
        if mode.endswith("truncate"):
            weights = raw.clamp(min=clip_min, max=clip_max)
        else:
            weights = torch.where(outside, torch.zeros_like(raw), raw)
        if not mode.startswith("sequence"):
            weights = zero_padding(weights, mask)
        metrics = rollout_is_metrics(weights, outside, old_logprobs, sampling_logprobs, mask)
    return weights, metrics
