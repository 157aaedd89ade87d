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
- a call whose score tensor would be large (long sequences), since SDPA never materialises it:
  above `MAX_MATERIALIZED_SCORES` scores, or within `recomputed_layers` in bf16 above
  `MAX_RECOMPUTED_SCORES`. A layer that recomputes its activations in backward keeps its
  probabilities only while its own backward runs, and SDPA's CPU kernel is slow in that backward
  (bf16 on AMX, 16 rows x 1061 positions: a layer's two forwards and backward 509 ms with the
  probabilities materialised, 820 ms through SDPA; bench/RESULTS.md).

A causal call of many queries (a training forward or a prefill, over the whole sequence or after
a cached prompt: the queries are the last keys' positions, every key after a query masked for
it) is split into blocks of `CAUSAL_QUERY_BLOCK` queries, each against only the keys up to its
last query: the scores above the diagonal that the mask would discard are never computed (in
the backward pass neither). For one 549-token row this took about half the time per layer
forward and backward, and a float32 update of 512-token completions 6.5% less
(bench/RESULTS.md). The same attention, summed over fewer exact zeros. The blocks are checked
against the mask, and the mask converted to the compute dtype, once for all the layers of a
forward, which transformers passes the same mask tensor (`_layer_mask`).

`register()` makes the function available to any transformers model as `attn_implementation=NAME`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

NAME = "grpokit_grouped"
# Above this many attention scores (batch * heads * queries * keys) in one call, use SDPA: the
# probabilities of every layer are kept for backward, so this bounds that memory (8 MB a layer in
# bf16, 16 MB in float32).
MAX_MATERIALIZED_SCORES = 1 << 22
# The same bound in bf16 within `recomputed_layers`, where a call's probabilities are kept only
# while its layer's backward runs (128 MiB a call in bf16; a layer's calls hold their sum).
MAX_RECOMPUTED_SCORES = 1 << 26
_recomputed_layers = False  # within `recomputed_layers`
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
    s, d, k = query.shape[2], query.shape[3], key.shape[2]
    scale = d**-0.5 if scaling is None else scaling
    if attention_mask is None or s == 1:  # one query: no blocks (`causal_query_blocks`)
        mask = None if attention_mask is None else attention_mask[..., :k]
        return _attend(module, query, key, value, mask, scale, dropout), None
    blocks, prepared = _layer_mask(attention_mask, s, k, _compute_dtype(query))
    if not blocks:
        return _attend(module, query, key, value, prepared, scale, dropout), None
    past = k - s  # cached keys before the first query's own
    outs = [
        _attend(
            module,
            query[:, :, a:z],
            key[:, :, : past + z],
            value[:, :, : past + z],
            prepared[..., a:z, : past + z],
            scale,
            dropout,
        )
        for a, z in blocks
    ]
    return torch.cat(outs, dim=1), None  # [B, S, H, D]


def _attend(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None,
    scale: float,
    dropout: float,
) -> Tensor:
    """`grouped_attention` of one call or one causal query block, through SDPA or the
    materialised math (module docstring); `mask` `[B, 1, S, K]` or None. Returns `[B, S, H, D]`
    contiguous."""
    b, h, s, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    decode = s == 1 and not (torch.is_grad_enabled() and query.requires_grad)
    limit = MAX_MATERIALIZED_SCORES
    if _recomputed_layers and _compute_dtype(query) == torch.bfloat16:
        limit = MAX_RECOMPUTED_SCORES
    if decode or b * h * s * k > limit:
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
            return out.view(b, 1, h, d)  # [B, Hkv, g, D] is [B, H, D] in memory
        return out.transpose(1, 2).contiguous()
    return grouped_matmul_attention(module, query, key, value, mask, scale, dropout)


@contextlib.contextmanager
def recomputed_layers(on: bool = True) -> Iterator[None]:
    """Within the block (with `on`), the calls come from decoder layers that recompute their
    activations in the backward pass (non-reentrant gradient checkpointing), so the tensors a
    call keeps for backward are held for one layer at a time: in bf16, calls of up to
    `MAX_RECOMPUTED_SCORES` scores materialise their probabilities instead of going to SDPA.

    Enter it around a checkpointed layer's call and around its recomputation in the backward
    pass (`train.build.LayerRecompute` wraps each layer's checkpoint function so): the
    recomputation must take the path the forward took (torch's checkpoint compares the tensors
    each saves). A process-wide setting, restored on exit; the autograd engine's threads see it.
    """
    global _recomputed_layers
    before = _recomputed_layers
    _recomputed_layers = on
    try:
        yield
    finally:
        _recomputed_layers = before


def in_recomputed_layers() -> bool:
    """Whether the calls run within `recomputed_layers` now."""
    return _recomputed_layers


class _LayerMask(NamedTuple):
    """What `_layer_mask` derived from one mask tensor, for the calls that pass it again."""

    source: weakref.ref[Tensor]  # the mask it came from
    version: int  # the source's `_version` then (an in-place change raises it)
    sizes: tuple[int, int, torch.dtype, int]  # queries, keys, compute dtype, query block
    blocks: list[tuple[int, int]]
    converted: Tensor | None  # the mask in the compute dtype; None = the source's own slice


_last_layer_mask: _LayerMask | None = None


def _layer_mask(
    attention_mask: Tensor, s: int, k: int, dtype: torch.dtype
) -> tuple[list[tuple[int, int]], Tensor]:
    """`causal_query_blocks` of `attention_mask[..., :k]` `[B, 1, S, K]` and that mask in the
    compute `dtype` (an additive one clamped to the dtype's lowest value, so that a fully masked
    row stays finite; a bool one as it is), for a call of `s` queries over `k` keys.

    transformers passes every decoder layer of a forward the same mask tensor (and a checkpointed
    layer's recomputation too): the blocks are checked and the mask converted once, then reused
    while the calls pass that same live tensor, unchanged, with the same sizes and dtype (not
    for an inference-mode tensor, which keeps no version counter: prepared at every call).
    """
    global _last_layer_mask
    last = _last_layer_mask
    sizes = (s, k, dtype, CAUSAL_QUERY_BLOCK)
    memo = not attention_mask.is_inference()  # an inference tensor has no version to check
    if (
        memo
        and last is not None
        and last.source() is attention_mask
        and last.version == attention_mask._version
        and last.sizes == sizes
    ):
        return last.blocks, attention_mask[..., :k] if last.converted is None else last.converted
    view = attention_mask[..., :k]
    blocks = causal_query_blocks(view, s, k)
    mask = view if view.dtype == torch.bool else _additive_mask_in(view, dtype)
    if memo:  # the view itself is not kept: it would keep the source alive
        converted = None if mask is view else mask
        source = weakref.ref(attention_mask, _forget_layer_mask)
        _last_layer_mask = _LayerMask(source, attention_mask._version, sizes, blocks, converted)
    return blocks, mask


def _forget_layer_mask(source: weakref.ref[Tensor]) -> None:
    """Drop the prepared mask once the tensor it came from is freed."""
    global _last_layer_mask
    if _last_layer_mask is not None and _last_layer_mask.source is source:
        _last_layer_mask = None


def _additive_mask_in(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """The additive `mask` in `dtype` (itself when it is already), its masked entries clamped to
    the dtype's lowest value: float32's lowest is -inf in bf16, and a fully masked row (a padding
    query) would give NaN probabilities instead of uniform ones."""
    if torch.finfo(mask.dtype).min < torch.finfo(dtype).min:
        mask = mask.clamp(min=torch.finfo(dtype).min)
    return mask.to(dtype)


def _compute_dtype(query: Tensor) -> torch.dtype:
    """The dtype the attention products run in: autocast's when it is on for the query's
    device, else the query's."""
    device = query.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype


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
    for head size 64), the mask is added, and softmax runs on the compute-dtype scores (its CPU
    kernel reads and writes that dtype and does its arithmetic in float32). Autograd then keeps
    one score-sized tensor per call for backward, the probabilities in the compute dtype (2 bytes
    a score under bf16 autocast), and softmax's own backward kernel. The mask is added out of
    place: added in place to a view of the scores, it made autograd copy the whole score
    gradient in backward (`CopySlices`), a pass that cost more than the forward's transient
    second score tensor (bench/RESULTS.md).
    """
    b, h, s, d = query.shape
    hkv, k = key.shape[1], key.shape[2]
    g = h // hkv
    dtype = _compute_dtype(query)
    q = (query * scale).to(dtype).reshape(b, hkv, g * s, d)  # a group's query heads as rows
    scores = torch.matmul(q, key.to(dtype).transpose(2, 3))  # [B, Hkv, g*S, K]
    if mask is not None:
        masked = scores.view(b, hkv, g, s, k) + _additive_mask_in(mask, dtype).unsqueeze(2)
        scores = masked.view(b, hkv, g * s, k)
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
