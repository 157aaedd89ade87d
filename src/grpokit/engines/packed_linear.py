"""CPU kernels for the sampler copy: linear layers kept packed in oneDNN's blocked layout."""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor


class PackedLinear(torch.nn.Linear):
    """An inference-only `nn.Linear` that keeps its weight in oneDNN's blocked layout.

    transformers' bf16 matmuls on CPU go through oneDNN, which reorders the `[out, in]` weight
    into its blocked layout on every call; with 16 rows per decode step that reordering costs
    about as much as the product. `pack()` reorders once (`torch.ops.mkldnn`); `forward` then
    multiplies by the packed copy: the same bf16 product.

    Two ways to keep the weight:

    - beside the packed copy (default): the `weight` parameter stays usable (tying, weight
      copies, PEFT), and `repack_if_changed()` re-packs after it was written in place;
    - packed only, after `release_weight()`: `weight` becomes a placeholder of the same shape
      and dtype that holds one element (stride 0), so the layer's weights are held once. New
      values then arrive through `pack(source)`, and `dense_weight()` unpacks them.
    """

    packed: Tensor | None = None
    packed_version: int = -1
    weight_released: bool = False

    def pack(self, source: Tensor | None = None) -> None:
        """(Re)build the packed copy from `source` `[out, in]` (cast to the layer's dtype), or
        from `weight` when None.

        Raises:
            ValueError: `source` is None after `release_weight()` (there is nothing to pack).
        """
        if source is None:
            if self.weight_released:
                raise ValueError("pack(): the weight was released; pass the new values.")
            source = self.weight
        self.packed = None  # free the old copy before the new one is built
        bf16 = source.detach().to(self.weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(bf16)
        self.packed_version = self.weight._version

    def release_weight(self) -> None:
        """Keep the weight only in the packed layout (see the class docstring)."""
        if self.packed is None:
            raise ValueError("release_weight(): pack() the layer first.")
        placeholder = self.weight.new_zeros(()).expand(self.weight.shape)
        self.weight.data = placeholder
        self.weight_released = True

    def dense_weight(self) -> Tensor:
        """The `[out, in]` weight the layer multiplies by (unpacked when released)."""
        if self.weight_released:
            assert self.packed is not None
            return self.packed.to_dense()
        return self.weight

    def repack_if_changed(self) -> None:
        if not self.weight_released and self.weight._version != self.packed_version:
            self.pack()

    def forward(self, x: Tensor) -> Tensor:
        """`x` `[..., in]` -> `[..., out]`."""
        if self.packed is None or (x.dtype != self.weight.dtype and not self.weight_released):
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linear_layers(model: torch.nn.Module, *, release: bool = False) -> list[PackedLinear]:
    """Turn every plain bf16 CPU `nn.Linear` of `model` into a `PackedLinear` in place (same
    parameters, so tied weights stay tied) and pack it. Returns them; empty (model unchanged)
    when this torch cannot pack (no oneDNN).

    Args:
        model: The module to convert.
        release: Also `release_weight()` of every packed layer whose weight no other module
            uses (a weight tied to the input embeddings stays, the embedding reads it).
    """
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
    ]
    if not layers or not torch.backends.mkldnn.is_available():
        return []
    try:  # a private operator: check it works here before converting anything
        probe = layers[0].weight.detach()[:2]
        torch.ops.mkldnn._linear_pointwise(
            probe.new_zeros(1, probe.shape[1]),
            torch.ops.mkldnn._reorder_linear_weight(probe),
            None,
            "none",
            [],
            "",
        )
    except (RuntimeError, AttributeError):
        return []
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    packed = []
    for layer in layers:
        layer.__class__ = PackedLinear
        assert isinstance(layer, PackedLinear)
        layer.pack()
        if release and uses[id(layer.weight)] == 1:
            layer.release_weight()
        packed.append(layer)
    return packed
