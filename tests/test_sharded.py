"""engines.sharded: whole values of FSDP2 shards gathered a bucket at a time, checked on three
simulated processes (threads exchanging their buffers in a fake all-gather) with parameters
whose rows do not split evenly; the real FSDP2 run is in tests/test_distributed.py (the
sampler copy equals the whole trained weights rounded to bf16)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from grpokit.engines import sharded

SIZE = 3  # simulated processes


class Mesh:
    ndim = 1

    def get_group(self) -> str:
        return "group"


MESH = Mesh()


class FakeShard:
    """Rank `rank`'s part of `full` as `fully_shard` places it: `torch.chunk` rows."""

    def __init__(self, full: torch.Tensor, rank: int, placement: Any = None) -> None:
        self.full, self.shape, self.device_mesh = full, full.shape, MESH
        self.placements = (placement or Shard(0),)
        chunks = torch.chunk(full, SIZE)
        self.local = chunks[rank] if rank < len(chunks) else full[:0]

    def to_local(self) -> torch.Tensor:
        return self.local

    def to(self, dtype: torch.dtype) -> FakeShard:  # a Replicate() placement's path
        return FakeShard(self.full.to(dtype), 0, self.placements[0])

    def full_tensor(self) -> torch.Tensor:
        return self.full


class Group:
    """Three threads as ranks: `all_gather` hands each the buffers of all three."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.barrier = threading.Barrier(SIZE)
        self.buffers: dict[int, torch.Tensor] = {}
        self.calls = [0] * SIZE

    def all_gather(self, out: list[torch.Tensor], tensor: torch.Tensor, group: Any = None) -> None:
        rank = self.local.rank
        self.calls[rank] += 1
        self.buffers[rank] = tensor.clone()
        self.barrier.wait()
        for k in range(SIZE):
            out[k].copy_(self.buffers[k])
        self.barrier.wait()


def run_ranks(monkeypatch, fulls: list[torch.Tensor], **kwargs: Any) -> tuple[list, Group]:
    """`whole_values` on every simulated rank: each rank's list of `(i, value)`."""
    group = Group()
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: SIZE)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: group.local.rank)
    monkeypatch.setattr(torch.distributed, "all_gather", group.all_gather)
    results: list[Any] = [None] * SIZE
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        group.local.rank = rank
        try:
            shards = [FakeShard(full, rank) for full in fulls]
            results[rank] = list(sharded.whole_values(shards, torch.bfloat16, **kwargs))
        except BaseException as error:  # reported by the test thread
            errors.append(error)
            group.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(SIZE)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    if errors:
        raise errors[0]
    return results, group


# rows 5 (2, 2, 1 per rank), 1 (1, 0, 0), 7 (3, 3, 1), 6 (2, 2, 2)
SHAPES = [(5, 2), (1, 3), (7,), (6, 4)]


@pytest.mark.parametrize(("bucket_bytes", "calls"), [(1 << 20, 1), (20, 2), (8, 4)])
def test_whole_values_of_unevenly_split_shards_by_buckets(monkeypatch, bucket_bytes, calls):
    generator = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=generator) for shape in SHAPES]
    results, group = run_ranks(monkeypatch, fulls, bucket_bytes=bucket_bytes)
    for rank in range(SIZE):
        assert [i for i, _ in results[rank]] == [0, 1, 2, 3]
        for (i, value), full in zip(results[rank], fulls, strict=True):
            assert value.dtype == torch.bfloat16 and value.shape == full.shape
            assert torch.equal(value, full.to(torch.bfloat16)), (rank, i)
    # A bucket per call: the padded shards take 2*2, 1*3, 3 and 2*4 bf16 values (8, 6, 6 and 16
    # bytes): 20 bytes hold the first three, then the last; 8 bytes one a call (the last alone,
    # larger than a bucket).
    assert group.calls == [calls] * SIZE


def test_a_shard_holding_other_rows_than_torch_chunk_gives_is_refused(monkeypatch):
    class Shifted(FakeShard):
        def to_local(self) -> torch.Tensor:
            return self.full[:2]  # torch.chunk gives each of 3 ranks one of the 3 rows

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: SIZE)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: 1)
    with pytest.raises(RuntimeError, match="of 3 rows holds 2 on rank 1 of 3, not the 1"):
        list(sharded.whole_values([Shifted(torch.ones(3, 2), 1)], torch.bfloat16))


def test_shards_placed_otherwise_are_gathered_one_by_one() -> None:
    full = torch.arange(6.0).view(3, 2)
    shard = FakeShard(full, 0, Replicate())
    assert sharded.is_sharded(shard) and not sharded.is_sharded(full)
    [(i, value)] = list(sharded.whole_values([shard], torch.bfloat16))
    assert i == 0 and value.dtype == torch.bfloat16 and torch.equal(value, full.bfloat16())
    assert list(sharded.whole_values([], torch.bfloat16)) == []
