"""QLoRA: a policy loaded with quantized weights (bitsandbytes 4-bit or 8-bit), trained through a
LoRA adapter, as TRL's `GRPOTrainer(quantization_config=..., peft_config=...)`.

`GRPOTrainer(quantization_config=BitsAndBytesConfig(...))` loads the policy from its path with that
config (TRL's contract; `model_init_kwargs["quantization_config"]` is the same), placed on the
training device. The quantized weights are frozen: the adapter's weights (float32, as every
trainable weight in grpokit) are what trains, and the reference model is the quantized base with
the adapter disabled. bitsandbytes runs on CUDA and, in recent versions (`pip install
grpokit[qlora]`), on x86 CPUs, where 4-bit layers need widths that are multiples of 64.

Departure from TRL: TRL casts the adapter to bf16 for a quantized model (the QLoRA paper's
setting); grpokit keeps it float32, so that small updates are not rounded away.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from grpokit.train.checkpoint import is_peft_model
from grpokit.train.config import GRPOConfig


def quantization_method(quantization_config: Any) -> str | None:
    """The `quant_method` of a transformers quantization config or its dict (None: no config);
    a dict with `load_in_4bit` / `load_in_8bit` and no method is bitsandbytes', as transformers
    reads it."""
    if quantization_config is None:
        return None
    if isinstance(quantization_config, dict):
        method = quantization_config.get("quant_method")
        if method is None and (
            quantization_config.get("load_in_4bit") or quantization_config.get("load_in_8bit")
        ):
            return "bitsandbytes"
        return None if method is None else str(method)
    method = getattr(quantization_config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def is_quantized(model: Any) -> bool:
    """Whether `model` (or the model a PEFT wrapper holds) has quantized weights."""
    return bool(getattr(model, "is_quantized", False))


def resolve_quantization(
    model: Any, quantization_config: Any, peft_config: Any, args: GRPOConfig
) -> Any:
    """Check a run that quantizes the policy, before anything is loaded; return the config to
    load it with (None: no quantization to apply).

    Args:
        model: The trainer's `model` argument (a path / id, or an instance).
        quantization_config: The trainer's `quantization_config` argument.
        peft_config: The trainer's `peft_config` argument.
        args: The run's config (`model_init_kwargs` may hold a `quantization_config`).

    Raises:
        ValueError: a quantization config with a model instance, in both places, without
            `peft_config` (quantized weights cannot be trained), with `use_vllm`, or a
            bitsandbytes config without bitsandbytes installed.
    """
    in_kwargs = (args.model_init_kwargs or {}).get("quantization_config")
    if quantization_config is not None and in_kwargs is not None:
        raise ValueError(
            "quantization_config is set both as a GRPOTrainer argument and in "
            "args.model_init_kwargs; set it in one place (the trainer argument)."
        )
    config = quantization_config if quantization_config is not None else in_kwargs
    quantized_instance = not isinstance(model, str) and is_quantized(model)
    if config is None and not quantized_instance:
        return None
    if config is not None and not isinstance(model, str):
        raise ValueError(
            "quantization_config applies when GRPOTrainer loads the model from its id or path; "
            "the model is already an instance. Pass the path, or load the model quantized "
            "yourself (from_pretrained(..., quantization_config=...)) and drop "
            "quantization_config."
        )
    if peft_config is None and not is_peft_model(model):
        raise ValueError(
            "a quantized model's weights cannot be trained: pass peft_config (e.g. "
            "peft.LoraConfig(...)) to train a LoRA adapter on the quantized model (QLoRA), or "
            "drop quantization_config."
        )
    if args.use_vllm:
        raise ValueError(
            "use_vllm=True cannot generate with a bitsandbytes-quantized policy; set "
            "use_vllm=False (generation then runs on the quantized model with its adapter)."
        )
    if (
        quantization_method(config) == "bitsandbytes"
        and importlib.util.find_spec("bitsandbytes") is None
    ):
        raise ValueError(
            "quantization_config asks for bitsandbytes quantization, which is not installed: "
            "`pip install bitsandbytes` (CUDA, or x86 CPUs in recent versions), or drop "
            "quantization_config."
        )
    return config


def keep_4bit_layers_differentiable(model: Any) -> int:
    """Turn off bitsandbytes' CPU inference layout of 4-bit weights in `model`.

    On a CPU with AVX512-BF16, a bitsandbytes `Linear4bit` in eval mode without gradients
    (generation) repacks its weight for a faster inference kernel, and keeps it repacked; that
    kernel has no backward, so the next training forward gives no gradient to the layers before
    it (their adapters would never learn, with only a warning). Returns the layers changed.
    """
    changed = 0
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed
