"""One decode step of a Llama-style decoder written out, for the lean decode loop.

A decode step runs one token per row through every layer. At the 16 rows of a typical GRPO step
transformers' forward spends a large part of each step around the products: Python module calls,
the mask built anew, the rotary embedding applied to queries and keys separately, each sibling
projection called on its own (the fused group computes once and slices). `LlamaDecodeStep` makes
the same operations on the same tensors in the same order, so its logits are transformers' bit
for bit (tests/test_llama_decode.py), with little Python around them: each `FusedGroup` (q/k/v,
gate/up) multiplied once by its packed weight, the rotary embedding applied to queries and keys
together, the norms inlined and the additive mask made once per step (for SmolLM2-135M, 60
dispatched tensor operations a layer against 78; bench/RESULTS.md for the time).

It is used only where it was written for (`LlamaDecodeStep.build` returns None otherwise, and the
loop keeps transformers' forward): a "llama", "qwen2" or "mistral" model without sliding-window
attention, SiLU MLP and Llama's RMSNorm, using `core.attention.grouped_attention`, whose q/k/v and
gate/up products are packed as groups: either a bf16 sampler copy's `FusedGroup`s
(`pack_linear_layers(fuse=True)`: a CPU with native bf16 and oneDNN, no PEFT), or the float32
policy's `DecodePacks` (a CPU without native bf16; PEFT LoRA layers included), whose groups
transformers' forward multiplies by too within `DecodePacks.active()`, so the step gives that
forward's logits bit for bit there as well. Only on a cache of `kv_cache.ReservedLayer`s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from grpokit.core import attention
from grpokit.core.norms import MODEL_TYPES, is_llama_norm, llama_rms_norm
from grpokit.engines.kv_cache import ReservedLayer
from grpokit.engines.packed_linear import (
    DecodePacks,
    FusedGroup,
    PackedLinear,
    group_product,
    layer_product,
    packed_product,
)

Product = Callable[[Tensor], Tensor]


class LlamaDecodeStep:
    """The decode step of one sampler model (see the module docstring); build with `build`."""

    def __init__(self, model: Any, packs: DecodePacks | None = None) -> None:
        self.model = model
        self.packs = packs
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(config.num_key_value_heads)
        attn = model.model.layers[0].self_attn
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        # per decoder layer: the products (q/k/v stacked, o, gate/up stacked, down), `[N, in]`
        # -> `[N, out]`; and the output layer's
        self.products: list[tuple[Product, Product, Product, Product]] = []
        self._entries: list[Any] = []  # the `DecodePacks` entries the products read
        if packs is None:
            for layer in model.model.layers:
                attn, mlp = layer.self_attn, layer.mlp
                self.products.append(
                    (
                        functools.partial(_fused_product, attn.q_proj.group),
                        functools.partial(_product, attn.o_proj),
                        functools.partial(_fused_product, mlp.gate_proj.group),
                        functools.partial(_product, mlp.down_proj),
                    )
                )
            self.head: Product = model.lm_head
            return
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            qkv, gate_up = packs.layer_of(attn.q_proj), packs.layer_of(mlp.gate_proj)
            o, down = packs.layer_of(attn.o_proj), packs.layer_of(mlp.down_proj)
            assert qkv and gate_up and o and down and qkv.group and gate_up.group
            self._entries += [qkv, o, gate_up, down]
            self.products.append(
                (
                    functools.partial(group_product, qkv.group),
                    functools.partial(layer_product, o),
                    functools.partial(group_product, gate_up.group),
                    functools.partial(layer_product, down),
                )
            )
        head = packs.layer_of(model.lm_head)
        assert head is not None
        self._entries.append(head)
        self.head = functools.partial(layer_product, head)

    @classmethod
    def build(cls, model: Any, packs: DecodePacks | None = None) -> LlamaDecodeStep | None:
        """The step for `model` (a transformers causal LM; with `packs`, the base model of a
        PEFT LoRA wrapper too), or None when `model` is not exactly the structure the step was
        written for.

        Args:
            packs: The float32 policy's `DecodePacks`: the step multiplies by them (its q/k/v
                and gate/up grouped, `packed_linear._DecodeGroup`). None = a bf16 sampler copy
                whose projections are packed and fused (`FusedGroup`).
        """
        config = getattr(model, "config", None)
        inner = getattr(model, "model", None)
        # MODEL_TYPES: decoder layers like Llama's (pre-norm RMSNorm, rotary, grouped attention,
        # gated SiLU MLP); biases on the projections (Qwen2) are part of the packed products
        if config is None or inner is None or config.model_type not in MODEL_TYPES:
            return None
        if config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
            return None  # its mask would be a sliding window's
        if getattr(config, "use_sliding_window", False) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()
        ):
            return None
        if config.hidden_act != "silu" or config._attn_implementation != attention.NAME:
            return None
        if getattr(config, "pretraining_tp", 1) != 1:
            return None
        parts = ("embed_tokens", "rotary_emb", "layers", "norm")
        if not all(hasattr(inner, name) for name in parts) or not is_llama_norm(inner.norm):
            return None
        if not isinstance(getattr(model, "lm_head", None), torch.nn.Linear):
            return None
        if packs is not None:
            fits = packs.layer_of(model.lm_head) is not None and all(
                _layer_fits(layer, packs) for layer in inner.layers
            )
            return cls(model, packs) if fits else None
        return cls(model) if all(_layer_fits(layer) for layer in inner.layers) else None

    def accepts(self, cache: Any) -> bool:
        """Whether the step can run on `cache`: one `ReservedLayer` per decoder layer, and every
        packed weight present (a discarded one is refilled by the engine's sync first)."""
        layers = getattr(cache, "layers", None)
        decoder = self.model.model.layers
        if not isinstance(layers, list) or len(layers) != len(decoder):
            return False
        if not all(type(layer) is ReservedLayer for layer in layers):
            return False
        if self.packs is not None:
            return all(self.packs.ready(entry) for entry in self._entries)
        return not any(
            layer.self_attn.q_proj.discarded or layer.mlp.gate_proj.discarded for layer in decoder
        )

    def __call__(self, tokens: Tensor, mask: Tensor, positions: Tensor, cache: Any) -> Tensor:
        """Run one token per row and return the next-token logits.

        Args:
            tokens: `[N]` the tokens of this step.
            mask: `[N, K]` 1 = attend, for the K positions after this step (cached + this one).
            positions: `[N, 1]` this step's position ids.
            cache: transformers' cache of `ReservedLayer`s (`accepts`); this step's keys and
                values are written into it.

        Returns:
            `[N, V]` logits in the model's dtype.
        """
        inner = self.model.model
        n = tokens.shape[0]
        h, hkv, d = self.heads, self.kv_heads, self.head_dim
        x = inner.embed_tokens(tokens[:, None])  # [N, 1, hidden]
        cos, sin = inner.rotary_emb(x, positions)  # [N, 1, D], x's dtype
        # transformers' eager mask: 0 = attend, the dtype's lowest value = masked; [N, 1, 1, K]
        additive = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
        additive = additive.masked_fill_(mask == 0, torch.finfo(x.dtype).min)[:, None, None, :]
        half = d // 2
        for layer, kv, products in zip(inner.layers, cache.layers, self.products, strict=True):
            qkv_product, o_product, gate_up_product, down_product = products
            qkv = qkv_product(_rms_norm(layer.input_layernorm, x))
            qk = qkv[:, : (h + hkv) * d].view(n, h + hkv, d)  # query heads, then key heads
            # transformers' apply_rotary_pos_emb on queries and keys at once (elementwise alike)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            keys, values = kv.update(qk[:, h:, None], qkv[:, (h + hkv) * d :].view(n, hkv, 1, d))
            rows = qk[:, :h].reshape(n, hkv, h // hkv, d)  # grouped_attention's decode rows
            out = torch.nn.functional.scaled_dot_product_attention(
                rows, keys, values, attn_mask=additive, scale=self.scaling
            )
            x = x + o_product(out.view(n, h * d))[:, None]
            gate_up = gate_up_product(_rms_norm(layer.post_attention_layernorm, x))
            inter = gate_up.shape[-1] // 2
            act = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]
            x = x + down_product(act)[:, None]
        return self.head(_rms_norm(inner.norm, x))  # [N, V]


def _layer_fits(layer: Any, packs: DecodePacks | None = None) -> bool:
    """A decoder layer made of exactly the parts `LlamaDecodeStep` computes, its q/k/v and
    gate/up packed as one group each (with `packs`, its groups; else the bf16 copy's
    `FusedGroup`s) and its o and down projections packed alone."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is None or mlp is None:
        return False
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not all(is_llama_norm(norm) for norm in norms):
        return False
    if getattr(attn, "sliding_window", None) is not None or hasattr(attn, "q_norm"):
        return False
    siblings = (
        [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")],
        [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")],
    )
    parts = (
        *siblings[0],
        *siblings[1],
        getattr(attn, "o_proj", None),
        getattr(mlp, "down_proj", None),
    )
    if not all(isinstance(m, torch.nn.Module) for m in parts):
        return False
    if packs is None:
        qkv = getattr(attn.q_proj, "group", None)
        gate_up = getattr(mlp.gate_proj, "group", None)
        return (
            isinstance(qkv, FusedGroup)
            and qkv.members == siblings[0]
            and isinstance(gate_up, FusedGroup)
            and gate_up.members == siblings[1]
            and mlp.gate_proj.out_features == mlp.up_proj.out_features
            and isinstance(attn.o_proj, torch.nn.Linear)
            and isinstance(mlp.down_proj, torch.nn.Linear)
        )
    entries = [packs.layer_of(m) for m in (attn.q_proj, mlp.gate_proj, attn.o_proj, mlp.down_proj)]
    qkv, gate_up, o, down = entries
    if qkv is None or gate_up is None or o is None or down is None:
        return False
    if qkv.group is None or gate_up.group is None or o.group is not None or down.group is not None:
        return False
    widths = [c.stop - c.start for c in gate_up.group.columns]
    return (
        [m.module for m in qkv.group.members] == siblings[0]
        and [m.module for m in gate_up.group.members] == siblings[1]
        and widths[0] == widths[1]
    )


def _rms_norm(norm: Any, x: Tensor) -> Tensor:
    """transformers' Llama RMSNorm, operation for operation (`core.norms.llama_rms_norm`):
    `[N, 1, hidden]` -> `[N, hidden]`."""
    return llama_rms_norm(x.view(x.shape[0], -1), norm.weight, norm.variance_epsilon)[0]


def _fused_product(group: FusedGroup, x: Tensor) -> Tensor:
    """`x` `[N, in]` times a group's stacked packed weight: `[N, sum of the members' out]`."""
    return packed_product(group.packed, group.bias, x)


def _product(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    """`layer(x)` for `x` `[N, in]`: the packed product when the layer holds one."""
    if isinstance(layer, PackedLinear) and layer.group is None and layer.packed is not None:
        return packed_product(layer.packed, layer.bias, x)
    return layer(x)
