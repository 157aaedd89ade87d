"""CPU kernels for the sampler copy: linear layers kept packed in oneDNN's blocked layout."""

from __future__ import annotations

import torch
from torch import Tensor


class PackedLinear(torch.nn.Linear):
    """An inference-only `nn.Linear` that also keeps its weight in oneDNN's blocked layout.

    transformers' bf16 matmuls on CPU go through oneDNN, which reorders the `[out, in]` weight
    into its blocked layout on every call; with 16 rows per decode step that reordering costs
    about as much as the product. `pack()` reorders once (`torch.ops.mkldnn`); `forward` then
    multiplies by the packed copy: the same bf16 product. The `weight` parameter stays (tying,
    weight copies, PEFT), and `repack_if_changed()` re-packs after it was written in place.
    """

    packed: Tensor | None = None
    packed_version: int = -1

    def pack(self) -> None:
        """(Re)build the packed copy from `weight`."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach())
        self.packed_version = self.weight._version

    def repack_if_changed(self) -> None:
        if self.weight._version != self.packed_version:
            self.pack()

    def forward(self, x: Tensor) -> Tensor:
        """`x` `[..., in]` -> `[..., out]`."""
        if self.packed is None or x.dtype != self.weight.dtype:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])


def pack_linear_layers(model: torch.nn.Module) -> list[PackedLinear]:
    """Turn every plain bf16 CPU `nn.Linear` of `model` into a `PackedLinear` in place (same
    parameters, so tied weights stay tied) and pack it. Returns them; empty (model unchanged)
    when this torch cannot pack (no oneDNN)."""
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
    packed = []
    for layer in layers:
        layer.__class__ = PackedLinear
        assert isinstance(layer, PackedLinear)
        layer.pack()
        packed.append(layer)
    return packed
