"""Grouped-query attention for CPU training and decoding, plugged into transformers' attention API.

transformers' "eager" attention repeats each key/value head once per query head of its group
(`repeat_kv`, a full copy of K and V in every layer and every decode step) and its "sdpa" path on
CPU runs a flash kernel that is slow for the short sequences of RL fine-tuning: in the training
backward, and in decoding where each query head is a problem of one row (profiles and timings in
bench/RESULTS.md). `grouped_attention` computes the same
softmax attention without the copy: the query heads of a group are stacked along the row dimension
and multiplied by their shared key/value head. Scores use the same scaling, additive mask and
float32 softmax arithmetic as transformers' eager attention, but every score-sized tensor stays in
the dtype the products run in (autocast's, else the query's): under bf16 autocast eager attention
writes the masked scores and the probabilities in float32 and keeps a float32 and a bf16 copy of
the probabilities for backward, 6 bytes a score against 2 here (`grouped_matmul_attention`).

Two calls go to `torch.nn.functional.scaled_dot_product_attention` instead:

- a decode step (one query per row, no gradient): the stacked query rows of a group share one
  `[B, 1, 1, K]` mask, so SDPA's kernel runs on them directly. It reads the cache's strided views
  without copying them (the matrix product copies a transposed key view every step), keeps the
  probabilities in float32, and in bf16 takes about a third of the eager math's time per call;
- a call whose score tensor would be large (long sequences), since SDPA never materialises it.

A causal call of many queries (a training forward or a prefill, over the whole sequence or after
a cached prompt: the queries are the last keys' positions, every key after a query masked for
it) is split into blocks of `CAUSAL_QUERY_BLOCK` queries, each against only the keys up to its
last query: the scores above the diagonal that the mask would discard are never computed (in
the backward pass neither). For one 549-token row this took about half the time per layer
forward and backward, and a float32 update of 512-token completions 6.5% less
(bench/RESULTS.md). The same attention, summed over fewer exact zeros.

`register()` makes the function available to any transformers model as `attn_implementation=NAME`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

NAME = "grpokit_grouped"
# Above this many attention scores (batch * heads * queries * keys) in one call, use SDPA: the
# probabilities of every layer are kept for backward, so this bounds that memory (8 MB a layer in
# bf16, 16 MB in float32).
MAX_MATERIALIZED_SCORES = 1 << 22
# Queries per block of a causal call of many queries (module docstring); longer calls are split.
CAUSAL_QUERY_BLOCK = 128


def grouped_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Softmax attention with grouped key/value heads, in transformers' attention-function form.

    Args:
        module: The attention module (only `training` is read, for dropout).
        query: `[B, H, S, D]`. key, value: `[B, Hkv, K, D]` with `H` a multiple of `Hkv`; query head
            `h` uses key/value head `h // (H // Hkv)`, as transformers' `repeat_kv` does.
        attention_mask: `[B, 1, S, >=K]` additive float mask (0 = attend, a large negative value =
            masked; transformers' eager mask) or None for no mask.
        scaling: Score scale (None = `D ** -0.5`).
        dropout: Attention dropout probability (applied in training mode only).

    Returns:
        `(output [B, S, H, D] contiguous, None)`; attention weights are not returned.
    """
    b, h, s, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    mask = None if attention_mask is None else attention_mask[..., :k]
    blocks = causal_query_blocks(mask, s, k)
    if blocks:
        assert mask is not None
        past = k - s  # cached keys before the first query's own
        outs = [
            grouped_attention(
                module,
                query[:, :, a:z],
                key[:, :, : past + z],
                value[:, :, : past + z],
                mask[..., a:z, : past + z],
                scale,
                dropout,
            )[0]
            for a, z in blocks
        ]
        return torch.cat(outs, dim=1), None  # [B, S, H, D]
    decode = s == 1 and not (torch.is_grad_enabled() and query.requires_grad)
    if decode or b * h * s * k > MAX_MATERIALIZED_SCORES:
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)  # additive, so fully masked rows match the path below
        # In a decode step the query heads of a group, stacked as rows, share the [B, 1, 1, K]
        # mask: SDPA takes them as rows of their key/value head (module docstring). Otherwise
        # SDPA pairs the heads itself (`enable_gqa`).
        rows = query.reshape(b, hkv, h // hkv, d) if decode else query  # [B, Hkv, g, D]
        out = torch.nn.functional.scaled_dot_product_attention(
            rows,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout if module.training else 0.0,
            scale=scale,
            enable_gqa=not decode and h != hkv,
        )
        if decode:
            return out.view(b, 1, h, d), None  # [B, Hkv, g, D] is [B, H, D] in memory
        return out.transpose(1, 2).contiguous(), None
    return grouped_matmul_attention(module, query, key, value, mask, scale, dropout), None


def causal_query_blocks(mask: Tensor | None, s: int, k: int) -> list[tuple[int, int]]:
    """The query blocks `[(start, end), ...]` a call of `s` queries over `k >= s` keys with
    `mask` `[B, 1, S, K]` (additive: masked = at most half the dtype's lowest value; or bool:
    True = attend) is split into, query `i` being at key position `k - s + i`: blocks of
    `CAUSAL_QUERY_BLOCK` queries when `s` exceeds it and the mask masks every key after each
    block's last query for the block's queries (checked); else `[]`, one call. Block
    `(a, z)` attends the keys `[0, k - s + z)`."""
    if mask is None or s > k or s <= CAUSAL_QUERY_BLOCK or mask.shape[-2] != s:
        return []
    blocks = [(a, min(s, a + CAUSAL_QUERY_BLOCK)) for a in range(0, s, CAUSAL_QUERY_BLOCK)]
    for a, z in blocks[:-1]:
        later = mask[..., a:z, k - s + z :]  # the keys after the block, for its queries
        if mask.dtype == torch.bool:
            attended = bool(later.any())
        else:
            attended = bool((later > torch.finfo(mask.dtype).min / 2).any())
        if attended:
            return []
    return blocks


def grouped_matmul_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    dropout: float = 0.0,
) -> Tensor:
    """`grouped_attention`'s matrix-product math, for any call: the query heads of a group
    stacked as rows, scores `[B, Hkv, g*S, K]` materialised (with `mask` `[B, 1, S, K]` added),
    softmax with float32 arithmetic. Shapes as `grouped_attention`; returns the output
    `[B, S, H, D]` contiguous, in the compute dtype.

    The compute dtype is autocast's when autocast is on for the query's device (the dtype its
    products would run in anyway), else the query's. Every score-sized tensor is held in it:
    the scale is applied to the query before the product (exact when it is a power of two, as
    for head size 64), the mask is added in place, and softmax runs on the compute-dtype
    scores (its CPU kernel reads and writes that dtype and does its arithmetic in float32).
    Autograd then keeps one score-sized tensor per call for backward, the probabilities in the
    compute dtype (2 bytes a score under bf16 autocast), and softmax's own backward kernel.
    """
    b, h, s, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    g = h // hkv
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    q = (query * scale).to(dtype).reshape(b, hkv, g * s, d)  # a group's query heads as rows
    scores = torch.matmul(q, key.to(dtype).transpose(2, 3))  # [B, Hkv, g*S, K]
    if mask is not None:
        if torch.finfo(mask.dtype).min < torch.finfo(dtype).min:
            # float32's most negative value is -inf in bf16: a fully masked row (a padding
            # query) would give NaN probabilities instead of uniform ones
            mask = mask.clamp(min=torch.finfo(dtype).min)
        scores.view(b, hkv, g, s, k).add_(mask.to(dtype).unsqueeze(2))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value.to(dtype))  # [B, Hkv, g*S, D]
    return out.view(b, h, s, d).transpose(1, 2).contiguous()


def register() -> str:
    """Make `grouped_attention` available as `attn_implementation=NAME` (with transformers' eager
    additive mask); idempotent. Returns NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME


def use_grouped_attention(model: Any) -> bool:
    """Switch `model` (a transformers model, or a PEFT model around one) to `grouped_attention`.

    Returns False, leaving the model unchanged, when it does not support switching (no
    `set_attn_implementation`, or transformers rejects the custom implementation).
    """
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    setter = getattr(base, "set_attn_implementation", None)
    if not callable(setter):
        return False
    try:
        setter(register())
    except (ValueError, ImportError):
        return False
    return True
