"""Entropy regularisation as TRL 1.16 defines it: a bonus term and its (adaptive) coefficient.

The loss of a micro-batch becomes `policy_loss - entropy_coef * H`, where `H` (`entropy_bonus`) is
the mean per-token entropy over the tokens the policy loss acts on: the loss tokens, or only the
high-entropy ones under `top_entropy_quantile < 1`. `H` is a plain mean whatever the loss type's
aggregation, so `entropy_coef` means the same for every loss type; with gradient accumulation each
micro-batch's term is divided by the number of micro-batches, as TRL does (the trainer's
`MicroBatch.entropy_weight`). The gradient flows through the entropies into the logits: maximising
entropy spreads probability over the vocabulary.

Adaptive control (Skywork-OR1, arXiv 2505.22312; `use_adaptive_entropy`): after every optimizer
step, the token-weighted mean entropy `H_step` of the step's micro-batches moves the coefficient,

    coef <- min(coef + delta, coef_max)   if H_step <= target
    coef <- max(coef - delta, coef_min)   otherwise

and the next step applies `coef` only if that `H_step <= target` (0 otherwise; 0 on the very first
step, before any measurement). `EntropyRegularization` holds the rule; the trainer keeps the state
(`coef`, the last `H_step`) in its `TrainerState`, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from grpokit.core.losses import LossOptions, loss_token_mask
from grpokit.core.masking import masked_mean


def entropy_bonus(
    entropies: Tensor,
    completion_mask: Tensor,
    options: LossOptions | None = None,
    entropy_threshold: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """TRL's entropy bonus `H` of one micro-batch, and the number of tokens it averages over.

    Args:
        entropies: `[N, T]` per-token entropies of the current policy, differentiable (the bonus
            pushes them up).
        completion_mask: `[N, T]`; 1 = loss token (EOS counts, padding does not).
        options: The loss options; with `top_entropy_quantile < 1` only the high-entropy tokens
            count (`core.losses.loss_token_mask`), as the policy loss. None = every loss token.
        entropy_threshold: The top-entropy filter's threshold, as `policy_loss`'s (None = the
            micro-batch's own quantile).

    Returns:
        `(bonus, tokens)`: the 0-dim mean entropy over those tokens (0 when there are none;
        float32, or float64 for float64 entropies), and their count (0-dim, detached). Subtract
        `entropy_coef * bonus` from the micro-batch's policy loss.
    """
    mask = completion_mask.bool()
    if options is not None:
        mask = loss_token_mask(mask, options, entropies, entropy_threshold)
    dtype = torch.promote_types(entropies.dtype, torch.float32)
    return masked_mean(entropies.to(dtype), mask), mask.sum().detach()


@dataclass(frozen=True)
class EntropyRegularization:
    """TRL's entropy regularisation settings and its coefficient rule (module docstring).

    Attributes:
        coef: `entropy_coef`: the (initial, when adaptive) coefficient of the bonus; 0 = off
            unless adaptive.
        adaptive: `use_adaptive_entropy`: move the coefficient toward keeping the entropy at
            `target` after every optimizer step.
        coef_min, coef_max: `entropy_coef_min`, `entropy_coef_max`: bounds of the adaptive
            coefficient.
        coef_delta: `entropy_coef_delta`: its step per optimizer step.
        target: `entropy_target`: the entropy (nats per token) below which the bonus applies.
    """

    coef: float = 0.0
    adaptive: bool = False
    coef_min: float = 0.0
    coef_max: float = 1.0
    coef_delta: float = 0.005
    target: float = 0.2

    def __post_init__(self) -> None:
        if not self.coef_min <= self.coef_max:
            raise ValueError(
                f"entropy_coef_min ({self.coef_min}) must be <= entropy_coef_max ({self.coef_max})."
            )

    @property
    def enabled(self) -> bool:
        """Whether the loss has the entropy term: a non-zero coefficient, or adaptive control
        (which may raise a zero coefficient later)."""
        return self.coef != 0.0 or self.adaptive

    def applied(self, coef: float, last_entropy: float | None) -> float:
        """The coefficient an optimizer step multiplies the bonus by.

        Args:
            coef: The current coefficient (`coef` at the start of a run).
            last_entropy: The previous step's measured entropy; None = not measured yet.

        Returns:
            `coef`, except under adaptive control when the last entropy is above `target` (or
            not measured yet): 0.
        """
        if not self.adaptive:
            return coef
        last = math.inf if last_entropy is None else last_entropy
        return coef if last <= self.target else 0.0

    def updated(self, coef: float, step_entropy: float) -> float:
        """The coefficient after an optimizer step whose mean entropy was `step_entropy` (the
        same `coef` unless adaptive)."""
        if not self.adaptive:
            return coef
        if step_entropy <= self.target:
            return min(coef + self.coef_delta, self.coef_max)
        return max(coef - self.coef_delta, self.coef_min)
