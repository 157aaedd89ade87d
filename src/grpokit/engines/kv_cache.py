"""A key/value cache for the decode loop whose buffers are reserved once per call.

transformers' `DynamicLayer` appends each decode step's keys and values with `torch.cat`: every
step of every layer allocates a slightly larger tensor and frees the previous one. With
`retain_freed_memory` (glibc keeps freed blocks) a freed block rarely fits the next, larger one,
so the heap grows with the length: after one generation of 32 rows x 512 tokens from
SmolLM2-135M, 2784 MiB of freed blocks were kept (1912 MiB with this cache; the rest comes from
the attention's own temporaries, which grow with the length too; bench/RESULTS.md).
`ReservedLayer` holds the keys and values in buffers reserved for every position the call can
reach and returns views of their filled part, so the cache is allocated once. The values, and
the attention computed from them, are the same.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers of `capacity` positions.

    `keys` / `values` are the views `[B, Hkv, L, D]` of the filled part (`L` positions) of the
    buffers `[B, Hkv, capacity, D]`, so every `DynamicLayer` method that reads them works
    unchanged. A method that replaces them (`crop`, `batch_repeat_interleave`, `reset`) leaves
    tensors that are not views of the buffers; the next `update` copies them into new buffers.
    `batch_select_indices` keeps the selected rows in the buffers. An update that would pass
    `capacity` (a multi-turn call that grew) reallocates the buffers at twice the positions
    needed.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None
        self._views: tuple[Tensor, Tensor] | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        """Write `key_states` / `value_states` `[B, Hkv, S, D]` after the `L` cached positions;
        returns the views `[B, Hkv, L + S, D]`."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        adopted = self._views is not None and (
            self._views[0] is self.keys and self._views[1] is self.values
        )
        if not adopted or end > self.capacity:
            capacity = self.capacity if end <= self.capacity else 2 * end
            self._reserve(key_states, value_states, length, capacity)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[:, :, length:end].copy_(key_states)
        self._value_buffer[:, :, length:end].copy_(value_states)
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep only the rows `indices` (`[B']` long, ascending) of the cache, in place: they
        move to the first `B'` rows of the same buffers, so the cache stays reserved (no new
        allocation) and the rows dropped simply end. Without adopted buffers (nothing cached
        yet, or tensors a replacing method left), `DynamicLayer`'s own selection."""
        adopted = self._views is not None and (
            self._views[0] is self.keys and self._views[1] is self.values
        )
        if not adopted:
            super().batch_select_indices(indices)
            return
        assert self._key_buffer is not None and self._value_buffer is not None  # adopted
        length, kept = self.get_seq_length(), int(indices.numel())
        buffers = []
        for buffer in (self._key_buffer, self._value_buffer):
            # the gather copies first, so rows moving up never read a row already overwritten
            buffer[:kept, :, :length] = buffer[indices, :, :length]
            buffers.append(buffer[:kept])
        self._key_buffer, self._value_buffer = buffers
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]
        self._views = (self.keys, self.values)

    def _reserve(
        self, key_states: Tensor, value_states: Tensor, length: int, capacity: int
    ) -> None:
        """New buffers of `capacity` positions holding the `length` cached positions."""
        b, hkv, _, d = key_states.shape
        keys = key_states.new_empty((b, hkv, capacity, d))
        values = value_states.new_empty((b, hkv, capacity, value_states.shape[-1]))
        if length:
            assert self.keys is not None and self.values is not None  # length > 0
            keys[:, :, :length].copy_(self.keys)
            values[:, :, :length].copy_(self.values)
        self.capacity, self._key_buffer, self._value_buffer = capacity, keys, values


def reserve_positions(cache: Any, capacity: int) -> Any:
    """Replace each plain `DynamicLayer` of transformers' `cache` (an object with a `layers`
    list) by a `ReservedLayer` of `capacity` positions holding the same keys and values (copied
    at its first update); other layer kinds (sliding-window, linear attention) and caches without
    layers are left as they are. Returns `cache`, changed in place."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is not DynamicLayer or layer.keys is None or layer.values is None:
            continue
        reserved = ReservedLayer(capacity)
        reserved.lazy_initialization(layer.keys, layer.values)
        reserved.keys, reserved.values = layer.keys, layer.values
        layers[i] = reserved
    return cache
