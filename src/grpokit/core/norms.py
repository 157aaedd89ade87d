"""A Llama-style RMSNorm that casts its output once, for forwards under low-precision autocast.

Under bf16 autocast the residual stream of a Llama-style decoder stays float32, and so does the
output of its RMSNorms (each layer's `input_layernorm` and `post_attention_layernorm`, and the
final `norm`). Only linear layers read that output, and each casts it to bf16 again on its own:
the q, k and v projections three times, gate and up twice. Autograd keeps every one of those
casts for the weights' gradients, and the norm keeps its float32 normalized values for its own.
`rms_norm_cast` computes the same float32 values, casts them once to autocast's dtype (what each
linear layer computed with before, bit for bit) and keeps only its input and the `[..., 1]`
inverse RMS for the backward pass, which recomputes the normalized values.

For SmolLM2-135M at 16 rows of 165 tokens under bf16 autocast this cut the tensors one decoder
layer keeps for the backward pass from 92 to 72 MiB, and the update's forward + backward by
4-6% on a Xeon with AMX (bench/RESULTS.md). The gradients are the same formula's, computed in
float32 in closed form rather than through autograd's chain of operations: equal up to float32
rounding (tests/test_norms.py).

`cast_norm_outputs` installs it on the norms of a "llama", "qwen2" or "mistral" model, where the
norms feed only linear layers; the norms act as before wherever autocast is off.

The output layer then receives a slice of the final norm's bf16 output (the positions
`logits_to_keep` keeps), where autocast's cast used to hand it a new contiguous tensor. With a
frozen output layer (a LoRA adapter's, the reference model's) torch's `matmul` does not fold such
a bf16 slice into one matrix product: it copies the weight once per row into a batched product
(SmolLM2-135M's [49152, 576] head, 16 rows: a 906 MiB copy; LoRA's peak RSS on the bar workload
3747 MiB with it, 2779 MiB without; bench/RESULTS.md). `cast_norm_outputs` therefore also has
the output layer take its input contiguous, with row-major strides: one position of one shared
prompt (`[1, 1, hidden]`) is contiguous with its prompt's stride, and is not folded either.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

# transformers model types whose decoder layer is Llama's (pre-norm RMSNorm feeding the q/k/v and
# gate/up projections, the final norm feeding the output layer), and the class names of their norms
MODEL_TYPES = ("llama", "qwen2", "mistral")
NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")


def llama_rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """transformers' LlamaRMSNorm of `x` `[..., D]` with `weight` `[D]`, operation for operation
    (so its values bit for bit): `(weight * (x * r).to(x.dtype), r)`, `r` the float32 inverse
    RMS `[..., 1]`, `rsqrt(mean(x^2) + eps)` of `x` in float32."""
    h = x.to(torch.float32)
    inverse_rms = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h * inverse_rms).to(x.dtype), inverse_rms


class _RMSNormCast(torch.autograd.Function):
    """`(weight * (x * rsqrt(mean(x^2) + eps))).to(dtype)` for float32 `x` `[..., D]` and
    `weight` `[D]`; keeps `x`, `weight` and the inverse RMS `[..., 1]` for backward.

    With `r = rsqrt(mean(x^2) + eps)`, `xhat = x r`, output gradient `g` (as float32) and
    `gh = g * weight`: `d/dweight = sum over positions of g * xhat` and
    `d/dx = r * (gh - xhat * mean(gh * xhat))`.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
        out, inverse_rms = llama_rms_norm(x, weight, eps)  # then the consumers' cast
        ctx.save_for_backward(x, weight, inverse_rms)
        return out.to(dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, weight, inverse_rms = ctx.saved_tensors
        g = grad.to(torch.float32)
        xhat = x.to(torch.float32) * inverse_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g * xhat).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            gh = g * weight
            grad_x = inverse_rms * (gh - xhat * (gh * xhat).mean(-1, keepdim=True))
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_weight, None, None


def rms_norm_cast(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """Llama's RMSNorm of `x` `[..., D]` (float32) with `weight` `[D]`, cast to `dtype`:
    `[..., D]` in `dtype` (module docstring)."""
    return _RMSNormCast.apply(x, weight, eps, dtype)


def is_llama_norm(module: Any) -> bool:
    """Whether `module` is one of the RMSNorm classes of `NORMS` (with `variance_epsilon`)."""
    return type(module).__name__ in NORMS and hasattr(module, "variance_epsilon")


def linear_fed_norms(model: Any) -> list[Any]:
    """The norms of `model` (a transformers causal LM, or a PEFT model around one) whose output
    only linear layers read: each decoder layer's two and the final one, for a model of
    `MODEL_TYPES`; empty for any other model, or when one of them is not a `NORMS` norm."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config, inner = getattr(base, "config", None), getattr(base, "model", None)
    if getattr(config, "model_type", None) not in MODEL_TYPES or inner is None:
        return []
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "norm"):
        return []
    norms = [
        getattr(layer, name, None)
        for layer in layers
        for name in ("input_layernorm", "post_attention_layernorm")
    ]
    norms.append(inner.norm)
    return norms if all(is_llama_norm(norm) for norm in norms) else []


def _cast_forward(self: Any, x: Tensor) -> Tensor:
    """A norm's forward once `cast_norm_outputs` installed it: `rms_norm_cast` under
    low-precision autocast of `x`'s device type with a float32 `x`, else the class's forward."""
    kind = x.device.type
    if x.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        dtype = torch.get_autocast_dtype(kind)
        if dtype != torch.float32:
            return rms_norm_cast(x, self.weight, self.variance_epsilon, dtype)
    return type(self).forward(self, x)


def cast_norm_outputs(model: Any) -> int:
    """Make the `linear_fed_norms` of `model` return their output in autocast's dtype when
    autocast is on (`rms_norm_cast`), and its output layer take an input `matmul` cannot fold
    (the final norm's output sliced to the positions kept: `foldable`) as a contiguous copy;
    idempotent. A copy of the model (`copy.deepcopy`) keeps the change. Returns how many norms
    it applies to (0: none, the model is unchanged)."""
    norms = linear_fed_norms(model)
    for norm in norms:
        norm.forward = types.MethodType(_cast_forward, norm)
    head = model.get_output_embeddings() if norms else None
    if head is not None and _contiguous_input not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(_contiguous_input)
    return len(norms)


def _contiguous_input(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """A forward pre-hook: the module's first input as a contiguous copy with row-major strides,
    when torch's `matmul` could not fold it into the rows of one product as it is (`foldable`)."""
    if args and isinstance(args[0], Tensor) and not foldable(args[0]):
        return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def foldable(x: Tensor) -> bool:
    """Whether `x` `[..., n, in]` is contiguous with every leading dimension's stride that of
    row-major order, so that torch's `matmul` by a 2-D weight views it as one `[rows, in]` matrix
    and makes one product. A tensor can be contiguous without that: a slice of one position,
    `[1, 1, in]` out of `[1, P, in]` (a shared prompt's last position), keeps the stride `P * in`
    in its first dimension, and for a weight that needs no gradient `matmul` then multiplies
    through a batched product of the weight copied whole."""
    if not x.is_contiguous():
        return False
    return all(x.stride(i) == x.stride(i + 1) * x.shape[i + 1] for i in range(x.dim() - 2))
