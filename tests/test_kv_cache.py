"""The decode loop's reserved key/value cache (`engines.kv_cache`) against transformers' own."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from grpokit.engines.kv_cache import ReservedLayer, reserve_positions


def _states(b: int, s: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, s, 4, generator=g), torch.randn(b, 2, s, 4, generator=g)


def test_reserved_layer_holds_what_the_growing_layer_holds_in_one_buffer() -> None:
    plain, reserved = DynamicLayer(), ReservedLayer(capacity=9)
    steps = [_states(3, s, seed) for seed, s in enumerate((5, 1, 1, 1, 1))]  # prompt + 4 steps
    pointers = set()
    for keys, values in steps:
        k0, v0 = plain.update(keys, values)
        k1, v1 = reserved.update(keys, values)
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
        pointers.add(k1.data_ptr())
    assert reserved.get_seq_length() == plain.get_seq_length() == 9
    assert len(pointers) == 1  # written in place: one buffer for the whole call
    # past the reserve (a multi-turn call that grew): twice the positions needed, same values
    keys, values = _states(3, 2, 9)
    k0, _ = plain.update(keys, values)
    k1, _ = reserved.update(keys, values)
    assert torch.equal(k0, k1) and reserved.capacity == 22
    assert reserved.get_seq_length() == 11


def test_reserved_layer_follows_the_cache_methods_that_replace_its_tensors() -> None:
    plain, reserved = DynamicLayer(), ReservedLayer(capacity=12)
    for layer in (plain, reserved):
        layer.update(*_states(2, 3, 0))
        layer.batch_repeat_interleave(3)  # 6 rows
        layer.update(*_states(6, 1, 1))
        layer.batch_select_indices(torch.tensor([0, 2, 5]))
        layer.update(*_states(3, 1, 2))
        layer.crop(-1)
        layer.update(*_states(3, 2, 3))
    assert torch.equal(plain.keys, reserved.keys)
    assert torch.equal(plain.values, reserved.values)
    assert reserved.get_seq_length() == 6


def test_reserved_layer_drops_rows_in_place() -> None:
    """Dropping rows (a decode loop's ended completions) keeps the others' keys and values in
    the same buffer, rows moving up over dropped ones, and later steps append after them."""
    plain, reserved = DynamicLayer(), ReservedLayer(capacity=10)
    for layer in (plain, reserved):
        layer.update(*_states(6, 4, 0))
    start = reserved.keys.data_ptr()
    for seed, keep in enumerate(([1, 2, 4, 5], [0, 3], [1]), start=1):
        for layer in (plain, reserved):
            layer.batch_select_indices(torch.tensor(keep))
            layer.update(*_states(len(keep), 1, seed))
        assert torch.equal(plain.keys, reserved.keys)
        assert torch.equal(plain.values, reserved.values)
        assert reserved.keys.data_ptr() == start  # no new buffer
    assert reserved.keys.shape == (1, 2, 7, 4)


def test_reserve_positions_swaps_only_plain_layers() -> None:
    cache = DynamicCache()
    cache.update(*_states(2, 3, 0), layer_idx=0)
    cache.update(*_states(2, 3, 1), layer_idx=1)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    assert reserve_positions(cache, 10) is cache
    assert all(type(layer) is ReservedLayer for layer in cache.layers)
    new = _states(2, 1, 2)
    keys, values = cache.update(*new, layer_idx=1)
    assert torch.equal(keys, torch.cat([before[1][0], new[0]], dim=2))
    assert torch.equal(values, torch.cat([before[1][1], new[1]], dim=2))
    assert cache.get_seq_length(0) == 3 and cache.get_seq_length(1) == 4
    other = object()
    assert reserve_positions(other, 10) is other  # no layers: left alone
