"""CPU kernels for sampling: linear weights kept packed in oneDNN's blocked layout (or, frozen
float32 weights, as fbgemm's float16 panels).

`PackedLinear` for the bf16 sampler copy (CPUs with native bf16), `DecodePacks` for the float32
policy that samples itself (CPUs without).
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grpokit.engines.weight_sync import is_shard


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
    group: FusedGroup | None = None  # set by `fuse_projections`: the group holds the weight

    def pack(self, source: Tensor | None = None) -> None:
        """(Re)build the packed copy from `source` `[out, in]` (cast to the layer's dtype), or
        from `weight` when None. In a `FusedGroup` the values go to the group's packed weight.

        Raises:
            ValueError: `source` is None after `release_weight()` (there is nothing to pack).
        """
        if source is None:
            if self.weight_released:
                raise ValueError("pack(): the weight was released; pass the new values.")
            source = self.weight
        if self.group is not None:
            self.group.stage(self, source.detach().to(self.weight.dtype))
            return
        self.packed = None  # free the old copy before the new one is built
        bf16 = source.detach().to(self.weight.dtype)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(bf16)
        self.packed_version = self.weight._version

    def release_weight(self) -> None:
        """Keep the weight only in the packed layout (see the class docstring)."""
        if self.packed is None and self.group is None:
            raise ValueError("release_weight(): pack() the layer first.")
        placeholder = self.weight.new_zeros(()).expand(self.weight.shape)
        self.weight.data = placeholder
        self.weight_released = True

    def dense_weight(self) -> Tensor:
        """The `[out, in]` weight the layer multiplies by (unpacked when released)."""
        self._check_not_discarded()
        if self.group is not None:
            return self.group.dense_weight(self)
        if self.weight_released:
            assert self.packed is not None
            return self.packed.to_dense()
        return self.weight

    @property
    def discarded(self) -> bool:
        """Whether the weight is held nowhere (`discard()`) until the next `pack(source)`."""
        if self.group is not None:
            return self.group.packed is None
        return self.weight_released and self.packed is None

    def discard(self) -> None:
        """Free the packed weight of a layer that holds it only packed (in a group: the group's)
        when new values are due anyway; `pack(source)` of every member brings it back.

        Raises:
            ValueError: the layer's weight is not released (it would then have two states).
        """
        if not self.weight_released:
            raise ValueError("discard(): only a layer whose weight is held packed only.")
        if self.group is not None:
            self.group.discard()
        else:
            self.packed = None

    def _check_not_discarded(self) -> None:
        if self.discarded:
            raise RuntimeError(
                "This packed layer's weight was discarded (`discard()`, before an optimizer "
                "step); pack() its new values first (the engine's update_weights does)."
            )

    def repack_if_changed(self) -> None:
        """Re-pack after the plain weight was written in place; in a `FusedGroup`, apply the
        values `pack(source)` staged and follow in-place writes to the biases."""
        if self.group is not None:
            self.group.flush()
        elif not self.weight_released and self.weight._version != self.packed_version:
            self.pack()

    def forward(self, x: Tensor) -> Tensor:
        """`x` `[..., in]` -> `[..., out]`."""
        self._check_not_discarded()
        if self.group is not None:
            return self.group.forward(self, x)
        if self.packed is None or (x.dtype != self.weight.dtype and not self.weight_released):
            return super().forward(x)
        return packed_product(self.packed, self.bias, x.to(self.weight.dtype))


def pack_linear_layers(
    model: torch.nn.Module, *, release: bool = False, fuse: bool = False
) -> list[PackedLinear]:
    """Turn every plain bf16 CPU `nn.Linear` of `model` into a `PackedLinear` in place (same
    parameters, so tied weights stay tied) and pack it. Returns them; empty (model unchanged)
    when this torch cannot pack (no oneDNN).

    Args:
        model: The module to convert.
        release: Also `release_weight()` of every packed layer whose weight no other module
            uses (a weight tied to the input embeddings stays, the embedding reads it).
        fuse: Hold sibling projections as one packed weight instead (`fuse_projections`:
            their weights are released too).
    """
    layers = [
        m
        for m in model.modules()
        if type(m) is torch.nn.Linear
        and m.weight.dtype == torch.bfloat16
        and m.weight.device.type == "cpu"
    ]
    if not layers or not can_pack(layers[0].weight):  # a private operator: check it works
        return []
    for layer in layers:
        layer.__class__ = PackedLinear
    packed: list[PackedLinear] = layers  # type: ignore[assignment]
    # Groups first, packed from the plain weights: no member is packed on its own before.
    grouped = {id(m) for g in fuse_projections(model) for m in g.members} if fuse else set()
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for layer in packed:
        if id(layer) in grouped:
            continue
        layer.pack()
        if release and uses[id(layer.weight)] == 1:
            layer.release_weight()
    return packed


# Sibling projections that read the same input, by attribute name: a Llama-style attention's
# query/key/value projections and its gated MLP's gate/up projections (Llama, Mistral, Qwen2/3).
FUSABLE_PROJECTIONS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class KeptProduct:
    """A sibling group's last product, kept for the members called after the first one on the
    same input (transformers' Llama attention and MLP call their sibling projections one after
    another on one unchanged tensor).

    The first member called on an input computes the group's whole product; each member takes
    its columns of it, and the product is dropped once every member has. It is reused only for
    the same tensor object, unchanged since: its version counter, or for an inference-mode
    tensor (which has none) its identity alone. Any other input is computed afresh: the same
    values, only slower.
    """

    def __init__(self, members: int) -> None:
        self.members = members
        self.clear()

    def clear(self) -> None:
        self.input: Tensor | None = None
        self.version = -1
        self.output: Tensor | None = None  # [..., sum of out]
        self.waiting = 0  # members that have not yet taken their columns of `output`

    def columns(self, x: Tensor, columns: slice, product: Callable[[Tensor], Tensor]) -> Tensor:
        """One member's `columns` of `product(x)` (`[..., in]` -> `[..., sum of out]`), computed
        once for the group's members called on `x` in turn."""
        version = -1 if x.is_inference() else x._version
        if not (self.waiting > 0 and x is self.input and version == self.version):
            self.output = product(x)
            self.input, self.version, self.waiting = x, version, self.members
        assert self.output is not None
        out = self.output[..., columns]
        self.waiting -= 1
        if self.waiting == 0:
            self.clear()
        return out


class FusedGroup:
    """Sibling `PackedLinear`s that read the same input, held as one packed weight
    `[sum of out, in]`: a Llama attention's q, k and v projections, or its MLP's gate and up.

    transformers calls each projection on its own (`q_proj(x)`, then `k_proj(x)`, ...); with a
    few rows per decode step one oneDNN product over the stacked weight costs less than one per
    member (timings in bench/RESULTS.md). So the first member called on an input computes the
    whole product and the group keeps it for the others called on the same input
    (`KeptProduct`); each member returns its own columns of it. Each column of the stacked
    product equals the member's own product bit for bit (checked in tests/test_generation.py).

    The members hold no weight of their own (the group releases them,
    `PackedLinear.release_weight`), so the weights are still held once. New values arrive
    through a member's `pack(source)`, are staged, and `flush()` (the members'
    `repack_if_changed()`) re-packs the group once.
    """

    def __init__(self, members: list[PackedLinear]) -> None:
        self.members = members
        self.columns: dict[int, slice] = {}  # id(member) -> its columns of the product
        start = 0
        for member in members:
            self.columns[id(member)] = slice(start, start + member.out_features)
            start += member.out_features
        self.staged: dict[int, Tensor] = {}  # id(member) -> new `[out, in]` values
        self.packed = torch.ops.mkldnn._reorder_linear_weight(
            torch.cat([member.dense_weight() for member in members])
        )
        self.bias: Tensor | None = None
        self.bias_versions: tuple[int, ...] = ()
        self._refresh_bias()
        self.kept = KeptProduct(len(members))
        for member in members:
            member.group = self
            member.packed = None  # the group holds the weight now
            if not member.weight_released:
                member.release_weight()

    def forward(self, member: PackedLinear, x: Tensor) -> Tensor:
        """`member`'s product: `x` `[..., in]` -> `[..., member.out_features]`."""
        dtype = member.weight.dtype
        return self.kept.columns(
            x,
            self.columns[id(member)],
            lambda rows: packed_product(self.packed, self.bias, rows.to(dtype)),
        )

    def stage(self, member: PackedLinear, values: Tensor) -> None:
        """Record new `[out, in]` values of `member`, packed by the next `flush()`, or at once
        when every member has new values (so an update of every weight keeps at most one
        group's new values unpacked at a time, not a copy of all of them)."""
        self.staged[id(member)] = values
        if len(self.staged) == len(self.members):
            self.flush()

    def flush(self) -> None:
        """Re-pack the group once if any member has staged values, and re-stack the biases if
        any was written in place."""
        self.kept.clear()
        self._refresh_bias()
        if not self.staged:
            return
        if len(self.staged) == len(self.members):
            dense = torch.cat([self.staged[id(member)] for member in self.members])
        elif self.packed is None:  # discarded: only new values of every member can refill it
            return
        else:
            dense = self.packed.to_dense()  # [sum of out, in], one group at a time
            for member in self.members:
                values = self.staged.get(id(member))
                if values is not None:
                    dense[self.columns[id(member)]] = values
        self.staged = {}
        self.packed = None  # free the old copy before the new one is built
        self.packed = torch.ops.mkldnn._reorder_linear_weight(dense)

    def discard(self) -> None:
        """Free the packed weight until every member has new values (`PackedLinear.discard`)."""
        self.kept.clear()
        self.staged = {}
        self.packed = None

    def dense_weight(self, member: PackedLinear) -> Tensor:
        """`member`'s `[out, in]` weight (a new tensor)."""
        staged = self.staged.get(id(member))
        if staged is not None:
            return staged
        return self.packed.to_dense()[self.columns[id(member)]].clone()

    def _refresh_bias(self) -> None:
        biases = [member.bias for member in self.members]
        if biases[0] is None:
            return
        versions = tuple(bias._version for bias in biases if bias is not None)
        if versions != self.bias_versions:
            self.bias = torch.cat([bias.detach() for bias in biases if bias is not None])
            self.bias_versions = versions


def fuse_projections(model: torch.nn.Module) -> list[FusedGroup]:
    """Group the sibling projections of `model` (`FUSABLE_PROJECTIONS`) into `FusedGroup`s
    where that is exact: every member a `PackedLinear` (so not wrapped by a PEFT adapter) whose
    weight no other module uses (not tied), not yet grouped, all with the same input width and
    dtype and all with or all without a bias. The members' own weights are released. Returns
    the groups."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    groups = []
    for module in model.modules():
        for names in FUSABLE_PROJECTIONS:
            members = [getattr(module, name, None) for name in names]
            if _fusable(members, uses):
                groups.append(FusedGroup(members))  # type: ignore[arg-type]
    return groups


def _fusable(members: list[Any], uses: Counter[int]) -> bool:
    first = members[0]
    if not all(
        type(m) is PackedLinear
        and m.group is None
        and (m.weight_released or uses[id(m.weight)] == 1)
        for m in members
    ):
        return False
    if len({id(m) for m in members}) != len(members):
        return False
    return all(
        m.in_features == first.in_features
        and m.weight.dtype == first.weight.dtype
        and (m.bias is None) == (first.bias is None)
        and (m.bias is None or m.bias.dtype == first.bias.dtype)
        for m in members
    )


def can_pack(weight: Tensor) -> bool:
    """Whether this torch packs and multiplies a weight like `weight` (a private operator)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = weight.detach()[:2]
        torch.ops.mkldnn._linear_pointwise(
            probe.new_zeros(1, probe.shape[1]),
            torch.ops.mkldnn._reorder_linear_weight(probe),
            None,
            "none",
            [],
            "",
        )
    except (RuntimeError, AttributeError):
        return False
    return True


@dataclass
class _DecodeLayer:
    """One packed product: `module`'s forward while decoding is `x @ packed.T + linear.bias`
    (`half`: plus each adapter's `(x @ a_t) @ b_t`)."""

    module: torch.nn.Module  # the module whose forward is replaced (a LoRA layer, or `linear`)
    linear: torch.nn.Linear  # the plain layer holding the weight (the base layer under LoRA)
    adapters: tuple[str, ...] = ()  # active LoRA adapters
    # oneDNN float32 weight with the adapters merged in, or (`half`) fbgemm float16 base weight
    packed: Any = None
    half: bool = False  # in a group: the group's
    # with `half`: (A.T [in, r], scaling * B.T [r, out]) per adapter, float32
    low_rank: tuple[tuple[Tensor, Tensor], ...] = ()
    stamp: tuple[int, int] = (0, -1)  # (storage address, version counter) when last packed
    # sibling layers packed as one weight (then `packed` stays None)
    group: _DecodeGroup | None = field(default=None, repr=False)


@dataclass
class _DecodeGroup:
    """Sibling `_DecodeLayer`s that read the same input (a Llama attention's q/k/v, its MLP's
    gate/up), packed as one weight `[sum of out, in]`: one product a decode step instead of one
    per member. Its product (`group_product`) is `x @ packed.T + bias`, plus under `half` the
    members' adapters at once, `(x @ a_t) @ b_t` with `a_t` `[in, R]` the members' `A.T` side by
    side and `b_t` `[R, sum of out]` their `scaling * B.T` on the block diagonal."""

    members: list[_DecodeLayer]
    columns: list[slice]  # each member's columns of the product
    packed: Any = None
    half: bool = False
    bias: Tensor | None = None
    low_rank: tuple[Tensor, Tensor] | None = None
    stamps: tuple[tuple[int, int], ...] = ()
    # the last product, kept for the members not yet called on the same input
    kept: KeptProduct = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.kept = KeptProduct(len(self.members))


class DecodePacks:
    """Packed copies of a float32 model's linear weights, multiplied by only while it decodes.

    Without native bf16 the engine samples from the policy itself. Its linear layers go through
    MKL, which re-blocks the weight on every call; with a few rows per decode step that costs
    more than the product (most for the `[V, D]` output layer). These packed copies skip that.

    - A trainable weight is packed in float32 (oneDNN's blocked layout) at every `refresh`, the
      same float32 product up to summation order. A PEFT LoRA layer whose base weight is
      trainable too is packed with its adapters merged in (`W + scaling * B @ A`).
    - With `fp16_frozen`, a frozen weight (a LoRA layer's base, a frozen embedding) is packed
      once as fbgemm's float16 panels (`linear_prepack_fp16`): it is rounded to float16, the
      activations stay float32 and the products accumulate in float32 (`half_product`). A
      decode step's products read half the bytes: 1.5-1.8x faster for SmolLM2-135M's larger
      weights on an AVX2 CPU, no faster for the smallest (bench/RESULTS.md). The adapters of a
      LoRA layer over it are applied apart, as `(x @ A.T) @ (scaling * B.T)` in float32, so a
      training step re-packs nothing. Frozen weights beyond float16's range stay float32. A
      float16 weight of more than `HALF_BLOCK_LIMIT` bytes (an output layer over a large
      vocabulary) is packed in blocks of output rows (`pack_half`): faster to pack and to
      multiply by on a 2-core AVX2 CPU, the same products.
    - Without it, a frozen weight is packed in float32 once, a LoRA layer with its adapters
      merged at every `refresh`.
    - `refresh(fp16_trainable=True)` packs the trainable weights as float16 panels too, for
      that call: the float16 packing costs several times the float32 one (1.3-1.9 s against
      0.15-0.35 s for SmolLM2-135M's 211 weights on an AVX2 CPU), which a long decode pays
      back (bench/RESULTS.md) and a short one does not. fbgemm packs on one thread; packing
      on two threads took a third less time but raised the trainer's peak RSS by about 330
      MiB (glibc kept the freed float16 panels in the worker threads' own arenas).

    In a Llama-style decoder layer the sibling projections (q/k/v, gate/up) are packed as one
    weight each (`_DecodeGroup`: the same input width and bias layout, the same adapters, all
    trainable or all frozen): one product a decode step instead of two or three, and the
    written-out decode step (`engines.llama_decode`) multiplies by them.

    Unlike `PackedLinear` the model is left as it is (class, parameters, training forward): only
    inside `active()` does each packed layer's forward multiply by its packed copy (a grouped
    layer's: its columns of the group's product, computed once for the siblings called on the
    same input). `refresh()` re-packs what may have changed before a decode.
    """

    def __init__(
        self, layers: list[_DecodeLayer], *, fp16_frozen: bool = False, fp16: bool = False
    ) -> None:
        """`fp16`: this torch has fbgemm's float16 products (`fp16_frozen` needs it)."""
        if fp16_frozen and not fp16:
            raise ValueError("fp16_frozen needs fbgemm's float16 products (fp16=True).")
        self.layers = layers
        self.fp16_frozen = fp16_frozen
        self.fp16 = fp16

    @torch.no_grad()
    def refresh(self, *, fp16_trainable: bool = False) -> None:
        """Re-pack every trainable weight (fused optimizers write in place without bumping the
        version counter), every LoRA layer's adapters (they train) and every frozen weight
        whose storage or version counter moved.

        Args:
            fp16_trainable: Pack the trainable weights as float16 panels (see the class
                docstring) instead of float32.

        Raises:
            ValueError: `fp16_trainable` and this torch has no fbgemm float16 products.
        """
        if fp16_trainable and not self.fp16:
            raise ValueError("fp16_trainable needs fbgemm's float16 products (fp16=True).")
        for group in self.groups:
            self._refresh_group(group, fp16_trainable)
        for layer in self.layers:
            if layer.group is not None:
                continue
            weight = layer.linear.weight
            stamp = (weight.data_ptr(), weight._version)
            frozen = not weight.requires_grad
            unchanged = layer.packed is not None and frozen and stamp == layer.stamp
            if not (unchanged and (layer.half or not layer.adapters)):
                layer.packed = None  # free the old copy first: one copy at a time
                wanted = self.fp16_frozen if frozen else fp16_trainable
                layer.half = wanted and _fits_float16(weight)
                if layer.half:
                    layer.packed = pack_half(weight.detach())
                else:
                    merged = weight.detach()
                    for name in layer.adapters:
                        merged = merged + layer.module.get_delta_weight(name)  # type: ignore[operator]
                    layer.packed = torch.ops.mkldnn._reorder_linear_weight(merged)
                layer.stamp = stamp
            # a float16 layer's adapters are applied apart: copied at every refresh (they train)
            layer.low_rank = (
                tuple(_low_rank(layer.module, a) for a in layer.adapters) if layer.half else ()
            )

    def _refresh_group(self, group: _DecodeGroup, fp16_trainable: bool) -> None:
        """`refresh` for one group: the same rules, applied to all its members at once."""
        weights = [member.linear.weight for member in group.members]
        stamps = tuple((w.data_ptr(), w._version) for w in weights)
        frozen = not any(w.requires_grad for w in weights)
        adapters = group.members[0].adapters
        unchanged = group.packed is not None and frozen and stamps == group.stamps
        group.kept.clear()
        if not (unchanged and (group.half or not adapters)):
            group.packed = None  # free the old copy first
            wanted = self.fp16_frozen if frozen else fp16_trainable
            group.half = wanted and all(_fits_float16(w) for w in weights)
            parts = []
            for member in group.members:
                part = member.linear.weight.detach()
                if not group.half:
                    for name in member.adapters:
                        part = part + member.module.get_delta_weight(name)  # type: ignore[operator]
                parts.append(part)
            dense = torch.cat(parts)  # [sum of out, in]
            if group.half:
                group.packed = pack_half(dense)
            else:
                group.packed = torch.ops.mkldnn._reorder_linear_weight(dense)
            group.stamps = stamps
        biases = [member.linear.bias for member in group.members]
        group.bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        group.low_rank = _group_low_rank(group) if group.half and adapters else None
        for member in group.members:
            member.half = group.half

    def discard_trainable(self) -> int:
        """Free the packed copies `refresh` would re-pack anyway (trainable weights and merged
        LoRA layers), e.g. before an optimizer step: during the update they would only take
        memory (a full fine-tune's float32 linear weights again: 513 MiB for SmolLM2-135M).
        Returns how many were freed."""
        freed = 0
        for group in self.groups:
            group.low_rank = None
            group.kept.clear()
            merged = bool(group.members[0].adapters) and not group.half
            trainable = any(m.linear.weight.requires_grad for m in group.members)
            if group.packed is not None and (merged or trainable):
                group.packed = None
                freed += 1
        for layer in self.layers:
            layer.low_rank = ()  # a float16 layer's adapters, copied again at `refresh`
            # a merged copy moves with its adapters; a float16 base under them does not
            merged = bool(layer.adapters) and not layer.half
            if layer.packed is not None and (merged or layer.linear.weight.requires_grad):
                layer.packed = None
                freed += 1
        return freed

    @property
    def groups(self) -> list[_DecodeGroup]:
        """The sibling groups, in the order of their first member."""
        seen: dict[int, _DecodeGroup] = {}
        for layer in self.layers:
            if layer.group is not None:
                seen.setdefault(id(layer.group), layer.group)
        return list(seen.values())

    def ready(self, layer: _DecodeLayer) -> bool:
        """Whether `layer` multiplies by its packed copy within `active()` (its group's, if in
        one): packed since the last discard, and its adapters as they were then."""
        group = layer.group
        if group is not None:
            adapters = bool(layer.adapters)
            return (
                group.packed is not None
                and (not group.half or not adapters or group.low_rank is not None)
                and all(_adapters_unchanged(member) for member in group.members)
            )
        complete = not layer.half or len(layer.low_rank) == len(layer.adapters)
        return layer.packed is not None and complete and _adapters_unchanged(layer)

    def layer_of(self, module: torch.nn.Module) -> _DecodeLayer | None:
        """The `_DecodeLayer` whose forward `module`'s is, or None."""
        for layer in self.layers:
            if layer.module is module:
                return layer
        return None

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Within the block every packed layer multiplies by its packed copy. A LoRA layer whose
        adapters were disabled, merged or switched since `refresh` keeps its own forward."""
        for layer in self.layers:
            if layer.group is not None:
                if self.ready(layer):
                    index = next(i for i, m in enumerate(layer.group.members) if m is layer)
                    forward = functools.partial(_member_product, layer.group, index)
                    layer.module.__dict__["forward"] = forward
                continue
            if self.ready(layer):
                if layer.half:
                    forward = functools.partial(
                        half_product, layer.packed, layer.linear.bias, layer.low_rank
                    )
                else:
                    forward = functools.partial(packed_product, layer.packed, layer.linear.bias)
                layer.module.__dict__["forward"] = forward
        try:
            yield
        finally:
            for layer in self.layers:
                layer.module.__dict__.pop("forward", None)


def group_product(group: _DecodeGroup, x: Tensor) -> Tensor:
    """`x` `[N, in]` float32 times a group's stacked weight -> `[N, sum of out]` float32."""
    if group.half:
        x = x.float()  # bf16 under autocast: the panels multiply float32 rows only
        out = _half_rows(group.packed, x)
        if group.bias is not None:
            out = out.add_(group.bias)
        if group.low_rank is not None:
            out = torch.addmm(out, x @ group.low_rank[0], group.low_rank[1])
        return out
    return torch.ops.mkldnn._linear_pointwise(x, group.packed, group.bias, "none", [], "")


def layer_product(layer: _DecodeLayer, x: Tensor) -> Tensor:
    """`x` `[N, in]` times an ungrouped layer's packed weight (and adapters) -> `[N, out]`."""
    if layer.half:
        return half_product(layer.packed, layer.linear.bias, layer.low_rank, x)
    return packed_product(layer.packed, layer.linear.bias, x)


def _member_product(group: _DecodeGroup, index: int, x: Tensor) -> Tensor:
    """Member `index`'s forward within `active()`: its columns of the group's product of `x`
    `[..., in]`, computed once for the members called on `x` in turn (`KeptProduct`)."""

    def product(x: Tensor) -> Tensor:
        return group_product(group, x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    return group.kept.columns(x, group.columns[index], product)


def _group_low_rank(group: _DecodeGroup) -> tuple[Tensor, Tensor]:
    """`(a_t [in, R], b_t [R, sum of out])`: every member's adapters side by side, float32."""
    a_parts, b_blocks = [], []
    for member, columns in zip(group.members, group.columns, strict=True):
        for name in member.adapters:
            a_t, b_t = _low_rank(member.module, name)  # [in, r], [r, out]
            a_parts.append(a_t)
            b_blocks.append((b_t, columns))
    a_t = torch.cat(a_parts, dim=1)
    b_t = a_t.new_zeros((a_t.shape[1], group.columns[-1].stop))
    row = 0
    for block, columns in b_blocks:
        b_t[row : row + block.shape[0], columns] = block
        row += block.shape[0]
    return a_t, b_t


def _form_groups(model: torch.nn.Module, layers: list[_DecodeLayer]) -> None:
    """Group the `_DecodeLayer`s of sibling projections (`FUSABLE_PROJECTIONS`) of every Llama-
    style decoder layer (`is_llama_block`): the same input width, all with or all without a
    bias, the same adapters, all trainable or all frozen, each weight used by that layer only."""
    by_module = {id(layer.module): layer for layer in layers}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    for parent in model.modules():
        if not is_llama_block(parent):
            continue
        for owner, names in (
            (parent.self_attn, FUSABLE_PROJECTIONS[0]),
            (parent.mlp, FUSABLE_PROJECTIONS[1]),
        ):
            members = [by_module.get(id(getattr(owner, name, None))) for name in names]
            if any(m is None or m.group is not None for m in members):
                continue
            first = members[0]
            assert first is not None
            if not all(
                m is not None
                and m.linear.in_features == first.linear.in_features
                and (m.linear.bias is None) == (first.linear.bias is None)
                and m.adapters == first.adapters
                and m.linear.weight.requires_grad == first.linear.weight.requires_grad
                and uses[id(m.linear.weight)] == 1
                for m in members
            ):
                continue
            columns, start = [], 0
            for m in members:
                assert m is not None
                columns.append(slice(start, start + m.linear.out_features))
                start += m.linear.out_features
            group = _DecodeGroup(members, columns)  # type: ignore[arg-type]
            for m in members:
                assert m is not None
                m.group = group


def is_llama_block(module: torch.nn.Module) -> bool:
    """A transformers decoder layer of the Llama family (`LlamaDecoderLayer`,
    `Qwen2DecoderLayer`, `MistralDecoderLayer`), whose attention and MLP call their sibling
    projections one after another on the same input."""
    return type(module).__name__ in (
        "LlamaDecoderLayer",
        "Qwen2DecoderLayer",
        "MistralDecoderLayer",
    )


def _lora_adapters(module: torch.nn.Module) -> tuple[str, ...] | None:
    """The active adapters of a PEFT LoRA `Linear` layer over a plain `nn.Linear` when they can
    be merged into one weight (plain LoRA: no DoRA or other variant, no adapter bias, not merged
    already, not disabled); None for any other module."""
    base = getattr(module, "base_layer", None)
    if type(base) is not torch.nn.Linear or not callable(getattr(module, "get_delta_weight", None)):
        return None
    if getattr(module, "merged", True) or getattr(module, "disable_adapters", True):
        return None
    lora_a: Any = getattr(module, "lora_A", {})
    names = tuple(a for a in getattr(module, "active_adapters", ()) if a in lora_a)
    variants = getattr(module, "lora_variant", {})
    biased = getattr(module, "lora_bias", {})
    if not names or any(a in variants or biased.get(a, False) for a in names):
        return None
    return names


def _adapters_unchanged(layer: _DecodeLayer) -> bool:
    return not layer.adapters or _lora_adapters(layer.module) == layer.adapters


def _low_rank(module: Any, adapter: str) -> tuple[Tensor, Tensor]:
    """`(A.T [in, r], scaling * B.T [r, out])` of a LoRA layer's `adapter`, float32 copies."""
    a = module.lora_A[adapter].weight.detach()
    b = module.lora_B[adapter].weight.detach() * module.scaling[adapter]
    return a.t().contiguous(), b.t().contiguous()


def _fits_float16(weight: Tensor) -> bool:
    """Whether every value of `weight` is within float16's finite range."""
    return bool(weight.detach().abs().max() <= torch.finfo(torch.float16).max)


def half_product(
    packed: Any, bias: Tensor | None, low_rank: tuple[tuple[Tensor, Tensor], ...], x: Tensor
) -> Tensor:
    """`x` `[..., in]` float32 times a float16 `[out, in]` weight packed by `pack_half`
    (float32 accumulation), plus `bias`, plus `(x @ a_t) @ b_t` for each
    `(a_t, b_t)` of `low_rank` -> `[..., out]` float32. A bf16 `x` (under autocast) is
    multiplied as float32."""
    rows = x.reshape(-1, x.shape[-1]).float()
    out = _half_rows(packed, rows)
    if bias is not None:
        out = out.add_(bias)
    for a_t, b_t in low_rank:
        out = torch.addmm(out, rows @ a_t, b_t)
    return out.view(*x.shape[:-1], out.shape[-1])


# A float16 weight larger than this is packed as blocks of output rows of about HALF_BLOCK_BYTES
# each. For SmolLM2-135M's [49152, 576] output layer on a 2-core AVX2 CPU (bench/RESULTS.md),
# blocks of 4096 rows (4.5 MiB) took half the packing time of one panel set (0.32 s against
# 0.67 s) and a 16-row product 14% less time (7.6 ms against 8.8 ms, with the concatenation);
# blocks of 2048 and 8192 rows were about as fast; its decoder weights (at most 3.4 MiB) were no
# faster in blocks.
HALF_BLOCK_LIMIT = 8 << 20
HALF_BLOCK_BYTES = 4 << 20


def half_block_rows(out: int, width: int) -> int | None:
    """The output rows of each block `pack_half` packs an `[out, width]` weight in (a multiple
    of 64, at least 64), or None for one panel set: float16 bytes within `HALF_BLOCK_LIMIT`."""
    if out * width * 2 <= HALF_BLOCK_LIMIT:
        return None
    return max(64, HALF_BLOCK_BYTES // (2 * width) // 64 * 64)


def pack_half(weight: Tensor) -> Any:
    """A float32 `[out, in]` weight as fbgemm float16 panels (`linear_prepack_fp16`): one
    packed weight, or a tuple of them for consecutive blocks of output rows
    (`half_block_rows`). `half_product` multiplies by either; each output column is the same
    sum either way."""
    rows = half_block_rows(*weight.shape)
    if rows is None:
        return torch.ops.quantized.linear_prepack_fp16(weight, None)
    return tuple(torch.ops.quantized.linear_prepack_fp16(b, None) for b in weight.split(rows))


def _half_rows(packed: Any, rows: Tensor) -> Tensor:
    """`rows` `[M, in]` float32 times a `pack_half` weight -> `[M, out]` float32."""
    if isinstance(packed, tuple):
        return torch.cat([torch.ops.quantized.linear_dynamic_fp16(rows, p) for p in packed], 1)
    return torch.ops.quantized.linear_dynamic_fp16(rows, packed)


def can_pack_fp16() -> bool:
    """Whether this torch has fbgemm's float16 products (x86 builds; a private operator)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(2, 2), None)
        torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 2), packed)
    except (RuntimeError, AttributeError):
        return False
    return True


def packed_product(packed: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """`x` `[..., in]` times a packed `[out, in]` weight (`_reorder_linear_weight`), plus `bias`
    -> `[..., out]`, in the weight's dtype (`x` must have it)."""
    if x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, x.shape[-1]), packed, bias, "none", [], ""
    )
    return out.view(*x.shape[:-1], out.shape[-1])


def decode_packs(model: torch.nn.Module, *, fp16_frozen: bool | None = None) -> DecodePacks | None:
    """`DecodePacks` for every plain float32 CPU `nn.Linear` of `model` and every PEFT LoRA layer
    over one, packed now; None when it has none, when its weights are sharded (FSDP2
    `DTensor`s: the forward gathers them) or when this torch cannot pack.

    Args:
        fp16_frozen: Hold frozen weights as float16 panels (see `DecodePacks`). None = when this
            torch has fbgemm's float16 products.

    Raises:
        ValueError: `fp16_frozen=True` and this torch has no fbgemm float16 products.
    """

    def plain(m: torch.nn.Module) -> bool:
        return (
            type(m) is torch.nn.Linear
            and m.weight.dtype == torch.float32
            and m.weight.device.type == "cpu"
        )

    layers: list[_DecodeLayer] = []
    inside_lora: set[int] = set()
    for module in model.modules():
        adapters = _lora_adapters(module)
        base: Any = getattr(module, "base_layer", None)
        if adapters is not None and plain(base):
            layers.append(_DecodeLayer(module, base, adapters))
            inside_lora.update(id(m) for m in module.modules())
    for module in model.modules():
        if id(module) not in inside_lora and plain(module):
            layers.append(_DecodeLayer(module, module))  # type: ignore[arg-type]
    if any(is_shard(p) for p in model.parameters()):
        return None
    if not layers or not can_pack(layers[0].linear.weight):
        return None
    fp16 = can_pack_fp16()
    if fp16_frozen is None:
        fp16_frozen = fp16
    elif fp16_frozen and not fp16:
        raise ValueError(
            "fp16_frozen_weights=True, but this torch has no fbgemm float16 products "
            "(quantized::linear_prepack_fp16); leave it None."
        )
    _form_groups(model, layers)
    packs = DecodePacks(layers, fp16_frozen=fp16_frozen, fp16=fp16)
    packs.refresh()
    return packs
