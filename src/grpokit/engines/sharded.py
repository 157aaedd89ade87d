"""Whole values of FSDP2-sharded parameters for a sampler copy, gathered a bucket at a time.

`fully_shard` places each parameter as a `DTensor` split along dim 0 over the process group:
rank r of P holds rows `[r c, min((r + 1) c, n))` of a parameter of n rows, c = ceil(n / P)
(`torch.chunk`'s split; the last ranks may hold fewer rows or none). `DTensor.full_tensor()`
gathers one parameter per collective call; a sampler copy refilled after every optimizer step
needs all of them, and over gloo the per-call cost dominated (272 calls for SmolLM2-135M;
bench/RESULTS.md). `whole_values` casts each local shard to the copy's dtype (the values of a
cast after the gather: rounding is elementwise), lays the shards of consecutive parameters end
to end in one buffer per process, padded to c rows each, and gathers that buffer in one call,
at most `bucket_bytes` of it at a time, so the extra memory stays bounded whatever the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

BUCKET_BYTES = 64 << 20
"""Bytes of local shards gathered by one collective call (`whole_values`)."""


def is_sharded(tensor: Tensor) -> bool:
    """Whether `tensor` is a `DTensor` (an FSDP2 shard): its whole value takes a collective."""
    return callable(getattr(tensor, "full_tensor", None))


def whole_values(
    shards: Sequence[Tensor], dtype: torch.dtype, *, bucket_bytes: int = BUCKET_BYTES
) -> Iterator[tuple[int, Tensor]]:
    """`(i, whole value of shards[i] cast to dtype)` for every i, in order, a bucket of
    consecutive shards per collective call.

    A collective: every process calls it with the same parameters in the same order and
    consumes it to the end. Shards that are not split along dim 0 over a one-dimensional mesh
    (the way `fully_shard` places parameters) are gathered one by one (`full_tensor()`).

    Raises:
        RuntimeError: a shard holds other rows than `torch.chunk`'s split gives its rank.
    """
    from torch.distributed.tensor import Shard

    if not shards:
        return
    mesh = shards[0].device_mesh  # type: ignore[attr-defined]
    placed = mesh.ndim == 1 and all(
        t.device_mesh == mesh and tuple(t.placements) == (Shard(0),)  # type: ignore[attr-defined]
        for t in shards
    )
    if not placed:
        for i, t in enumerate(shards):
            yield i, t.to(dtype).full_tensor()  # type: ignore[attr-defined]
        return
    group = mesh.get_group()
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    element = torch.empty((), dtype=dtype).element_size()
    bucket: list[int] = []
    used = 0
    for i, t in enumerate(shards):
        span = _rows_per_rank(t.shape[0], size) * math.prod(t.shape[1:]) * element
        if bucket and used + span > bucket_bytes:
            yield from _gather_bucket(shards, bucket, dtype, size, rank, group)
            bucket, used = [], 0
        bucket.append(i)
        used += span
    yield from _gather_bucket(shards, bucket, dtype, size, rank, group)


def _rows_per_rank(n: int, size: int) -> int:
    """c = ceil(n / P): the rows of the fullest shard."""
    return -(-n // size)


def _gather_bucket(
    shards: Sequence[Tensor],
    bucket: list[int],
    dtype: torch.dtype,
    size: int,
    rank: int,
    group: object,
) -> Iterator[tuple[int, Tensor]]:
    """The whole values of `shards[i]` for i in `bucket`, by one all-gather of their local
    shards laid end to end, each padded to c rows (`whole_values`)."""
    parts, layout = [], []
    for i in bucket:
        t = shards[i]
        n, width = t.shape[0], math.prod(t.shape[1:])
        c = _rows_per_rank(n, size)
        rows = [max(0, min(c, n - r * c)) for r in range(size)]
        local = t.to_local()  # type: ignore[attr-defined]
        if local.shape[0] != rows[rank]:
            raise RuntimeError(
                f"a sharded parameter of {n} rows holds {local.shape[0]} on rank {rank} of "
                f"{size}, not the {rows[rank]} of torch.chunk's split"
            )
        part = local.new_zeros(c * width, dtype=dtype)
        part[: local.numel()] = local.reshape(-1)
        parts.append(part)
        layout.append((i, c * width, rows, width))
    flat = torch.cat(parts)  # this process's shards, end to end
    gathered = [torch.empty_like(flat) for _ in range(size)]
    torch.distributed.all_gather(gathered, flat, group=group)
    start = 0
    for i, span, rows, width in layout:
        pieces = [g[start : start + count * width] for g, count in zip(gathered, rows, strict=True)]
        yield i, torch.cat(pieces).view(shards[i].shape)
        start += span
