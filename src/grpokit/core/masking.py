"""Masked tensor helpers shared by the loss modules (`core.losses`, `core.importance`,
`core.loss_metrics`, `core.entropy`).

`mask` is `[N, T]` bool, True = the token counts in the loss (a completion's tokens up to and
including its EOS; padding after it does not). Values at padding positions never reach a sum, a
mean or an extreme, even when they are inf or NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def zero_padding(values: Tensor, mask: Tensor) -> Tensor:
    """`values` with padding replaced by 0 (so inf/NaN at padding cannot leak into sums)."""
    return torch.where(mask, values, torch.zeros_like(values))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where `mask` is True (0 when there are none)."""
    values = values.expand_as(mask)
    return zero_padding(values, mask).sum() / mask.sum().clamp(min=1)


def masked_extreme(values: Tensor, mask: Tensor, reduce: Callable[[Tensor], Tensor]) -> Tensor:
    """min or max of `values` over `mask`; 1.0 (a neutral ratio) when there are no loss tokens."""
    selected = values.expand_as(mask)[mask]
    return reduce(selected) if selected.numel() else torch.ones((), device=values.device)


def check_same_shape(reference: Tensor, **tensors: Tensor | None) -> None:
    """Raise a `ValueError` naming the first of `tensors` (None skipped) whose shape is not
    `reference`'s `[N, T]`."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.shape != reference.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logprobs is {tuple(reference.shape)}; "
                "all per-token tensors must be [N, T] with the same N and T."
            )
