"""Everything `GRPOTrainer` builds before its loop runs, as plain functions.

Loading the policy and its tokenizer, precision, dropout / gradient checkpointing / LoRA, the
frozen reference model, the number of optimizer steps, AdamW and its learning-rate schedule, and
restoring all of that from a checkpoint. Each function takes the config and what it needs and
returns what it builds; none keeps state, so the trainer's `__init__` reads as a list of steps.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from grpokit.core import attention
from grpokit.core.attention import use_grouped_attention
from grpokit.engines.base import GenerationEngine, SamplingParams
from grpokit.engines.device import (
    KEPT_ACTIVATION_BYTES,
    DeviceTraits,
    device_traits,
    model_device,
)
from grpokit.engines.models import resolve_model_path
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.engines.weight_sync import plain_lora_layer
from grpokit.errors import ConfigError
from grpokit.tools.chat import check_tool_template
from grpokit.tools.environments import Environments
from grpokit.tools.parsing import resolve_parser
from grpokit.tools.turns import ToolCalling
from grpokit.train import checkpoint as ckpt
from grpokit.train import optimizers, quantization, resume
from grpokit.train.checkpoint import TrainerState
from grpokit.train.config import GRPOConfig
from grpokit.train.distributed import save_process_rng_states
from grpokit.train.run_settings import resolve_steps

logger = logging.getLogger("grpokit")

REF_MODEL_FILE = "ref_model.safetensors"  # the synced reference model inside a checkpoint


# ---- model ---------------------------------------------------------------------------------------
def load_policy(
    model: Any,
    processing_class: Any,
    args: GRPOConfig,
    *,
    quantization_config: Any = None,
    device: torch.device | None = None,
) -> tuple[Any, Any]:
    """Load the policy (and tokenizer) from a string, or take an instance; keep float32 weights.

    Args:
        model: A Hugging Face id or path (see `engines.models.resolve_model_path`) or a causal-LM
            instance. A bf16/fp16 instance is upcast to float32 with a warning (a quantized one
            keeps its quantized weights).
        processing_class: The tokenizer, or None to load it from the model's path.
        args: The run's config (`model_init_kwargs`).
        quantization_config: Load the model with these quantized weights (checked by
            `quantization.resolve_quantization`), placed on `device`.
        device: Where a quantized model is loaded (default: the CPU).

    Returns:
        `(model, tokenizer)`; the tokenizer has a pad token (EOS when it had none).

    Raises:
        ValueError: `model_init_kwargs` with a model instance, or no tokenizer to be found.
        TypeError: `model` is neither a string nor a torch module.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    remote = {"trust_remote_code": True} if args.trust_remote_code else {}
    if isinstance(model, str):
        path = resolve_model_path(model)
        kwargs = {"dtype": torch.float32, **remote, **(args.model_init_kwargs or {})}
        if quantization_config is not None:  # quantized on loading, straight onto its device
            place = torch.device("cpu") if device is None else device
            kwargs.update(quantization_config=quantization_config, device_map={"": place})
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    elif args.model_init_kwargs:
        raise ValueError(
            "model_init_kwargs applies only when model is a string; the model is already an "
            "instance. Remove model_init_kwargs."
        )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"model must be a model id/path or a torch module, got {type(model).__name__}."
        )
    low = {p.dtype for p in model.parameters() if p.dtype in (torch.bfloat16, torch.float16)}
    if low and not quantization.is_quantized(model):
        logger.warning(
            "The model has %s weights; upcasting to float32 so that small updates are not lost "
            "(compute still uses bf16 autocast when bf16=True).",
            ", ".join(sorted(str(d) for d in low)),
        )
        model = model.float()
    if processing_class is None:
        source = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
        if not source:
            raise ValueError(
                "processing_class is None and the model has no path to load a tokenizer from; "
                "pass processing_class=<its tokenizer>."
            )
        processing_class = AutoTokenizer.from_pretrained(source, **remote)
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and generation_config.pad_token_id is None:
        generation_config.pad_token_id = processing_class.pad_token_id
    return model, processing_class


def prepare_model(
    model: Any,
    peft_config: Any,
    args: GRPOConfig,
    device: torch.device,
    *,
    recompute: bool = False,
) -> Any:
    """Dropout, gradient checkpointing and the LoRA adapter; move to `device`.

    Args:
        recompute: Enable gradient checkpointing even without `args.gradient_checkpointing`
            (`ActivationBound.recompute`: `max_forward_tokens="auto"` chose it). Enabled before
            the adapter is added: transformers then makes the input embeddings' output require
            gradients, so a frozen embedding under LoRA still passes gradients through the
            checkpointed layers.

    Raises:
        ValueError: `sync_ref_model` together with `peft_config`.
    """
    if args.disable_dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    if args.gradient_checkpointing or recompute:
        kwargs = {"use_reentrant": False, **(args.gradient_checkpointing_kwargs or {})}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "config", None) is not None:
        model.config.use_cache = args.use_cache  # training forwards; generation has its own cache
    if peft_config is not None:
        if args.sync_ref_model:
            raise ValueError(
                "sync_ref_model=True is not supported with peft_config (the reference model is "
                "the base model with the adapter disabled); set sync_ref_model=False."
            )
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    skip_adapter_input_casts(model)
    set_attention(model, args.attention, device)
    if quantization.is_quantized(model):  # loaded onto its device; its weights stay frozen
        quantization.keep_4bit_layers_differentiable(model)
        return model
    return model.to(device)


def skip_adapter_input_casts(model: Any) -> int:
    """Stop a PEFT model's plain LoRA layers (`engines.weight_sync.plain_lora_layer`) casting
    their input to the adapters' dtype; returns how many layers changed (0 for any other
    model).

    Under bf16 autocast a LoRA layer's input arrives in bf16; PEFT casts it up to its float32
    adapters, and autocast casts it straight back down for the adapter's product: two copies of
    the input per layer and forward (and their backward), for the same values, since bf16 ->
    float32 -> bf16 is exact. Skipped only where every floating-point parameter is float32 and
    the model is not quantized (grpokit's policy): an input is then in bf16 only under autocast,
    whose products cast it themselves. A quantized base (QLoRA) computes in its own dtype and
    keeps PEFT's casts, and so do other adapter layers (DoRA's norms, other tuners)."""
    if not callable(getattr(model, "get_base_model", None)) or quantization.is_quantized(model):
        return 0
    params = [p for p in model.parameters() if p.is_floating_point()]
    if any(p.dtype != torch.float32 for p in params):
        return 0
    layers = [m for m in model.modules() if plain_lora_layer(m)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False  # read by PEFT's `_cast_input_dtype`
    return len(layers)


def compile_policy(model: Any, args: GRPOConfig, *, ref_model: Any = None) -> str | None:
    """Compile the policy `model` (and `ref_model`, when there is one) in place with
    `torch.compile` when `args.torch_compile`; what was compiled, for the log (None when not
    compiling).

    Each repeated decoder block (a module whose class the model names in `_no_split_modules`,
    e.g. `LlamaDecoderLayer`) is compiled on its own: the blocks share their code, so one
    compilation serves every layer, where compiling the whole model traces all of them
    (SmolLM2-135M on a 2-core CPU: about 26 s of compiling against 95 s, and the same step time
    after; bench/RESULTS.md). A model that names no blocks is compiled whole. `Module.compile` keeps
    the parameters' names, so checkpoints and weight syncs are unchanged. A copy of a compiled
    module (`copy.deepcopy`) is not compiled, hence the reference model's own call here;
    generation runs eagerly anyway (`TransformersEngine`).

    Raises:
        ConfigError: an unknown `torch_compile_backend`, or the inductor backend on a CPU with no
            C++ compiler to build its kernels.
    """
    if not args.torch_compile:
        return None
    backend = args.torch_compile_backend or "inductor"
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(
            f"torch_compile_backend={backend!r} is not a torch.compile backend; use one of "
            f"{sorted(known)}."
        )
    if backend == "inductor" and model_device(model).type == "cpu" and not _cxx_compiler():
        raise ConfigError(
            "torch_compile=True with the inductor backend builds C++ kernels on the CPU, and no "
            "C++ compiler was found (set CXX, or install one: `apt install g++`); or set "
            'torch_compile_backend="aot_eager" (no kernels built), or torch_compile=False.'
        )
    what = _compile_blocks(model, backend, args.torch_compile_mode)
    if ref_model is not None:
        _compile_blocks(ref_model, backend, args.torch_compile_mode)
    mode = args.torch_compile_mode or "default"
    whose = "policy and reference" if ref_model is not None else "policy"
    logger.info("torch.compile of the %s: %s, backend %s, mode %s", whose, what, backend, mode)
    return what


def _compile_blocks(model: Any, backend: str, mode: str | None) -> str:
    """`Module.compile` each block `model` names in `_no_split_modules`, or the whole model."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for module in blocks or [model]:
        module.compile(backend=backend, mode=mode)
    return f"{len(blocks)} {type(blocks[0]).__name__} blocks" if blocks else "the whole model"


def _cxx_compiler() -> str | None:
    """The C++ compiler inductor builds CPU kernels with (its own search: `$CXX`, then g++ and
    the other defaults), or None."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def generation_server_url(args: GRPOConfig) -> str:
    """The vLLM server's URL in server mode (`vllm_server_base_url`, else host and port)."""
    from grpokit.engines.vllm_client import server_url

    return server_url(args.vllm_server_base_url, args.vllm_server_host, args.vllm_server_port)


def check_generation_server(args: GRPOConfig) -> None:
    """With `use_vllm` and `vllm_mode="server"`: wait (up to `vllm_server_timeout` s) until the
    vLLM server answers, so that a wrong address fails before any model loads.

    Raises:
        VLLMServerError: no `grpokit vllm-serve` server is ready at the configured address.
    """
    if not (args.use_vllm and args.vllm_mode == "server"):
        return
    from grpokit.engines.vllm_client import ServerConnection, wait_for_server

    url = generation_server_url(args)
    wait_for_server(ServerConnection(url, args.vllm_server_timeout), args.vllm_server_timeout)


def make_generation_engine(
    model: Any, tokenizer: Any, args: GRPOConfig, *, max_new_tokens: int | None = None
) -> GenerationEngine:
    """The engine `args` asks for: with `use_vllm`, `VLLMEngine` (vLLM in this process) or in
    server mode `VLLMServerEngine` (a `grpokit vllm-serve` server); else `TransformersEngine`.
    `model` is the prepared policy (PEFT-wrapped, on its device), or the model to evaluate.
    `max_new_tokens` (default `max_completion_length`) sizes vLLM's `max_model_len` when
    `vllm_max_model_length` is None (colocate mode; a server has its own)."""
    if not args.use_vllm:
        return TransformersEngine(model, tokenizer)
    if args.vllm_mode == "server":
        from grpokit.engines.vllm_client import VLLMServerEngine

        return VLLMServerEngine(
            model,
            tokenizer,
            base_url=generation_server_url(args),
            timeout=args.vllm_server_timeout,
            group_port=args.vllm_group_port,
        )
    from grpokit.engines.vllm_engine import VLLMEngine

    completion = args.max_completion_length if max_new_tokens is None else max_new_tokens
    length = args.vllm_max_model_length
    if length is None:
        limit = getattr(model.config, "max_position_embeddings", None)
        prompt = args.max_prompt_length or (limit - completion if limit else None)
        if prompt is None or prompt < 1:
            raise ValueError(
                "use_vllm=True: set vllm_max_model_length (or max_prompt_length); the model's "
                "config gives no usable maximum length."
            )
        length = prompt + completion
    return VLLMEngine(
        model,
        tokenizer,
        max_model_len=length,
        seed=args.seed,
        enforce_eager=args.vllm_enforce_eager,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        kv_cache_memory_bytes=None if torch.cuda.is_available() else 1 << 30,
    )


def apply_process_settings(args: GRPOConfig) -> None:
    """The process-wide settings of a run, applied before anything is built: seeds (or full
    determinism), TF32 and the log level.

    Raises:
        ValueError: `tf32=True` without a CUDA device that has TF32 (Ampere or newer), as
            transformers refuses it.
    """
    from transformers import enable_full_determinism, set_seed
    from transformers.utils import logging as hf_logging

    if args.full_determinism:
        enable_full_determinism(args.seed)
    else:
        set_seed(args.seed)
    if args.tf32 is not None:
        has_tf32 = device_traits("cuda").tf32
        if args.tf32 and not has_tf32:
            raise ValueError(
                "tf32=True needs a CUDA GPU of the Ampere generation or newer (the CPU has no "
                "TF32); set tf32=None."
            )
        if has_tf32:
            set_tf32(args.tf32)
    if args.log_level != "passive":
        level = logging.getLevelName(args.log_level.upper())
        logger.setLevel(level)
        hf_logging.set_verbosity(level)


def set_tf32(enable: bool) -> None:
    """Allow (or forbid) TensorFloat-32 in CUDA float32 matmuls and convolutions."""
    if hasattr(torch.backends, "fp32_precision"):  # torch >= 2.9
        torch.backends.fp32_precision = "tf32" if enable else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = enable
        torch.backends.cudnn.allow_tf32 = enable


def set_attention(model: Any, attention: str | None, device: torch.device) -> None:
    """Apply the `attention` setting of `GRPOConfig` to `model` (see its docstring): "auto" is
    grouped attention where `DeviceTraits.grouped_attention` says so (the CPU)."""
    if attention is None or (attention == "auto" and not device_traits(device).grouped_attention):
        return
    if attention == "auto":
        if not use_grouped_attention(model):
            logger.info("attention: the model cannot switch implementation; keeping its own")
        return
    base = model.get_base_model() if ckpt.is_peft_model(model) else model
    base.set_attn_implementation(attention)


@dataclasses.dataclass(frozen=True)
class ActivationBound:
    """How a run bounds the activations its training forwards keep for the backward pass
    (`resolve_activation_bound`); log-prob and evaluation passes run without gradients and keep
    none.

    Attributes:
        max_forward_tokens: The bound on the tokens (rows x trimmed width) of one training
            forward (`train.microbatch`); None = one forward per micro-batch.
        recompute: The decoder layers recompute their activations in the backward pass
            (non-reentrant gradient checkpointing): the user's `gradient_checkpointing`, or
            `max_forward_tokens="auto"` on a device whose `DeviceTraits.recompute_activations`
            says so.
        reason: What decided, in a few words, for the log.
        keep_up_to: With `recompute`, a training forward of at most this many tokens (with
            each shared prompt counted once, `core.logprobs.forward_tokens`) keeps its
            activations (`recomputes`); a larger micro-batch is split into such forwards of
            whole prompts where each prompt's rows fit (`train.microbatch`, `share_up_to`); a
            forward still larger keeps those of as many of its last decoder layers as the
            activations of `keep_up_to` tokens take (`kept_layers`), and shares its prompts
            too where the policy's checkpointed layers take the cache (not under FSDP2 and
            ZeRO-3: `GRPOTrainer.micro_batch_loss`). None = every forward recomputes in every
            layer. Set by "auto" only (`DeviceTraits.kept_activation_size`).
        layers: The model's decoder layers, with `keep_up_to` (`kept_layers`).
        agreed: With `keep_up_to` on several processes, each training forward is judged by
            the largest of the processes' sizes for it (`GRPOTrainer.micro_batch_loss`), so
            every process keeps and recomputes the same layers in it: under DeepSpeed
            (`resolve_activation_bound`'s `agree_forwards`).
    """

    max_forward_tokens: int | None
    recompute: bool
    reason: str
    keep_up_to: int | None = None
    layers: int | None = None
    agreed: bool = False

    def recomputes(self, tokens: int) -> bool:
        """Whether a training forward of `tokens` tokens recomputes its activations (in some of
        its layers at least: `kept_layers`)."""
        return self.recompute and (self.keep_up_to is None or tokens > self.keep_up_to)

    def kept_layers(self, tokens: int) -> int:
        """How many decoder layers of a training forward of `tokens` tokens (as it runs: each
        shared prompt counted once) that `recomputes` keep their activations, the last ones;
        the others recompute theirs. The activations of `keep_up_to` tokens in all `layers` are
        those of `keep_up_to * layers // tokens` layers of this forward: a forward's kept
        activations stay within the same bound whatever its size, and the recomputation it pays
        for shrinks as it does. 0 without `keep_up_to` or `layers`."""
        if self.keep_up_to is None or not self.layers:
            return 0
        return min(self.layers, self.keep_up_to * self.layers // max(tokens, 1))

    def describe(self) -> str:
        """E.g. ``recomputed activations, one forward per micro-batch (<reason>)``, or with
        `keep_up_to` ``activations kept by forwards of at most 1024 tokens (a larger
        micro-batch split into ...), above that by as many of their last layers as the same
        memory holds, ...``."""
        bound = self.max_forward_tokens
        forwards = "one forward per micro-batch" if bound is None else f"at most {bound} tokens"
        kept = "recomputed activations" if self.recompute else "activations kept"
        if self.recompute and self.keep_up_to is not None:
            size = self.keep_up_to
            kept = (
                f"activations kept by forwards of at most {size} tokens (a larger micro-batch "
                "split into forwards of whole prompts that fit), above that by as many of their "
                "last layers as the same memory holds, recomputed in the others"
            )
            if self.agreed:
                kept += ", each forward sized by the largest of the processes' sizes for it"
            return f"{kept} ({self.reason})"
        return f"{kept}, {forwards} ({self.reason})"


def activation_width(model: Any) -> tuple[int, int] | None:
    """`(decoder layers, hidden + MLP intermediate width)` of `model`'s config: the activations
    a training forward keeps grow with their product per token, those of one layer with the
    width; None when the config lacks one."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    names = ("num_hidden_layers", "hidden_size", "intermediate_size")
    sizes = [getattr(config, name, None) for name in names]
    if not all(isinstance(v, int) and v > 0 for v in sizes):
        return None
    layers, hidden, intermediate = (int(v) for v in sizes)  # type: ignore[arg-type]
    return layers, hidden + intermediate


def frozen_gradient_bytes(model: Any, peft_config: Any = None, *, shards: int = 1) -> int:
    """The float32 gradient bytes, per process, of `model`'s weights that training leaves
    unchanged: those already frozen, or with `peft_config` all of them (PEFT freezes the base
    model and trains new adapter weights). A parameter DeepSpeed ZeRO-3 partitioned counts
    whole (`ds_numel`); `shards`: the processes a sharding engine (FSDP2, ZeRO-2/3) splits
    gradients over, 1 where each process would hold them all."""
    frozen = sum(
        getattr(p, "ds_numel", p.numel())
        for p in model.parameters()
        if peft_config is not None or not p.requires_grad
    )
    return 4 * frozen // max(shards, 1)


def resolve_activation_bound(
    args: GRPOConfig,
    traits: DeviceTraits,
    *,
    bf16: bool,
    model: Any = None,
    agree_forwards: bool = False,
    frozen_gradient_bytes: int = 0,
) -> ActivationBound:
    """How the run's training forwards bound their activations (`GRPOConfig.max_forward_tokens`
    and `gradient_checkpointing`); logged once.

    A number or None is taken as given. "auto" is the device's choice
    (`DeviceTraits.activation_bound`): on a CPU with native bf16, with bf16 autocast, recomputed
    activations and no token bound, except in forwards small enough to keep theirs and in the
    last layers of larger ones (`ActivationBound.keep_up_to` and `kept_layers`:
    `DeviceTraits.kept_activation_size` over the model's `activation_width`; under DeepSpeed
    by the sizes the processes agree on: `agree_forwards`); elsewhere on
    the CPU 512 tokens per forward under bf16 autocast (where bf16 is not native, or a model
    that cannot checkpoint its layers) and 768 in float32; on a GPU no bound. "auto" keeps the
    device's token bound without recomputing when the user set `gradient_checkpointing` (that
    setting then decides: the token bound and recomputed activations on any CPU) or when
    `model` cannot checkpoint its layers. Recomputation works under DDP, FSDP2 and DeepSpeed
    ZeRO-2/3 alike (tests/test_distributed*.py, scenario bnpo).

    Args:
        args: The run's config.
        traits: The training device's rules.
        bf16: Training computes under bf16 autocast (`resolve_precision`).
        model: The policy (before LoRA); None = assume it supports gradient checkpointing (and
            recompute every forward).
        agree_forwards: The model is run by DeepSpeed, under which every process must run
            each training forward alike, so the processes decide each forward by the largest
            of their sizes (`ActivationBound.agreed`). ZeRO-3 gathers a layer's partitions in
            hooks around its forward, a recomputation's too: a process recomputing a layer
            that another process keeps would gather it alone (two ZeRO-3 processes deciding by
            their own sizes hung; bench/RESULTS.md). ZeRO-2 reduces the gradients by their
            place in a flat buffer that the backward fills in the order it readies them, so
            processes whose forwards differ in structure would sum different parameters'
            gradients (a forward that shares its prompts and recomputes readies a layer's
            q/k/v gradients in another order than one that keeps its activations: 2 ZeRO-2
            processes deciding by their own sizes trained weights 0.17 away from one
            process's; bench/RESULTS.md). DDP's wrapper only reduces the gradients, in buckets
            launched in an order fixed across processes, and FSDP2 gathers each layer once
            before its forward and once before its backward, where the recomputation runs on
            the gathered parameters: under these each process keeps or recomputes as its own
            forward's size says, so on one step one process may keep a forward's activations
            while another recomputes its own (tests/test_distributed.py, scenario
            kept_activations: both kinds of forward on each process, and the 1-process
            weights).
        frozen_gradient_bytes: The float32 gradients this process would hold for the weights
            the run does not train (`frozen_gradient_bytes`: LoRA's base model). Those bytes
            are free, so the kept size grows by them, at most doubling: a LoRA run keeps more
            of its activations and recomputes less, and still holds less than the same run's
            full fine-tune (measured on the bar workload with LoRA r 16, bench/RESULTS.md).
    """
    tokens, user_recompute = args.max_forward_tokens, args.gradient_checkpointing
    keep_up_to: int | None = None
    layers: int | None = None
    if tokens != "auto":
        assert tokens is None or isinstance(tokens, int)  # GRPOConfig checked it
        bound = ActivationBound(tokens, user_recompute, f"max_forward_tokens={tokens}")
    else:
        max_tokens, recompute = traits.activation_bound(bf16)
        reason = f'max_forward_tokens="auto" on {traits.type}'
        if traits.recompute_activations and not bf16:
            reason += " computing in float32 (recomputing pays under bf16 autocast only)"
        if recompute:
            reason += " with native bf16"
            fallback = ""
            if user_recompute:
                fallback = "gradient_checkpointing set"
            elif model is not None and not getattr(model, "supports_gradient_checkpointing", False):
                fallback = "the model cannot checkpoint its layers"
            if fallback:
                max_tokens, recompute = traits.max_forward_tokens, False
                reason += f", {fallback}: the token bound instead"
            sizes = activation_width(model)
            if recompute and sizes and traits.kept_activation_size:
                layers, width = sizes
                size = traits.kept_activation_size
                widened = min(size, frozen_gradient_bytes // KEPT_ACTIVATION_BYTES)
                if widened:
                    reason += (
                        f", the kept size widened by {frozen_gradient_bytes / 2**20:.0f} MiB "
                        "of frozen weights' gradients"
                        + (" (capped at double)" if widened == size else "")
                    )
                keep_up_to = (size + widened) // (layers * width)
        recomputes = recompute or user_recompute
        agreed = agree_forwards and keep_up_to is not None
        bound = ActivationBound(max_tokens, recomputes, reason, keep_up_to, layers, agreed)
    logger.info("training forwards: %s", bound.describe())
    return bound


class LayerRecompute:
    """Turns the recomputation `prepare_model` enabled on `model`'s decoder layers off and on
    again around one training forward or log-prob pass (`ActivationBound.keep_up_to`,
    `ActivationBound.kept_layers`), and runs every layer's checkpointed calls within
    `core.attention.recomputed_layers`.

    transformers checkpoints a layer whose `gradient_checkpointing` flag is set when it is
    called in training mode; the flag is read at call time, and a layer that ran with it off
    keeps its activations for its own backward. A shared prompt's forward passes its cache
    through the checkpointed layers (`core.logprobs.prompt_sharing_supported`), and its prompt
    pass recomputes in every layer.

    A checkpointed layer's call, and its recomputation in the backward pass, run through the
    function transformers stores on the layer (`_gradient_checkpointing_func`); wrapped here,
    both run within `core.attention.recomputed_layers`, so they take the same attention path
    (torch's checkpoint compares the tensors each saves), while a layer that keeps its
    activations in the same forward does not: its attention keeps the usual bound on the
    probabilities it holds until the backward pass.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
        # the decoder layers, in order (the model's own flag is not a layer's)
        self.layers = [m for m in self.flagged if isinstance(m, GradientCheckpointingLayer)]
        for layer in self.layers:
            run = getattr(layer, "_gradient_checkpointing_func", None)
            if run is not None and not getattr(run, "within_recomputed_layers", False):
                wrapped = _within_recomputed_layers(run)
                setattr(layer, "_gradient_checkpointing_func", wrapped)  # noqa: B010

    @contextlib.contextmanager
    def keep(self, layers: int | None = None) -> Iterator[None]:
        """Within the block the last `layers` decoder layers keep their activations (none with
        0); None = every layer and the model (no recomputation, the cache kept). The flags are
        restored after."""
        kept: list[torch.nn.Module] = self.flagged
        if layers is not None:
            kept = list(self.layers[max(len(self.layers) - layers, 0) :]) if layers > 0 else []
        for module in kept:
            setattr(module, "gradient_checkpointing", False)  # noqa: B010
        try:
            yield
        finally:
            for module in kept:
                setattr(module, "gradient_checkpointing", True)  # noqa: B010

    def off(self, off: bool = True) -> contextlib.AbstractContextManager[None]:
        """Within the block, with `off`, no layer recomputes (`keep(None)`); else a no-op."""
        return self.keep(None if off else 0)


def _within_recomputed_layers(checkpoint: Callable[..., Any]) -> Callable[..., Any]:
    """A layer's gradient checkpointing function that runs the layer's call, in the forward
    and when the backward pass recomputes it, within `core.attention.recomputed_layers`."""

    def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def layer(*layer_args: Any, **layer_kwargs: Any) -> Any:
            with attention.recomputed_layers():
                return function(*layer_args, **layer_kwargs)

        return checkpoint(layer, *args, **kwargs)

    run.within_recomputed_layers = True  # type: ignore[attr-defined]
    run.__wrapped__ = checkpoint  # type: ignore[attr-defined]  # its use_reentrant
    return run


def make_ref_model(model: Any, args: GRPOConfig) -> Any:
    """A frozen copy of the initial policy when beta != 0; None when beta == 0 or under LoRA
    (there the reference is the base model with the adapter disabled)."""
    if args.beta == 0 or ckpt.is_peft_model(model):
        return None
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def resolve_precision(args: GRPOConfig, device: torch.device | str) -> bool:
    """Whether to compute under bf16 autocast on `device`: the one precision rule, used by
    training (`GRPOTrainer`) and evaluation (`grpokit eval`, before/after `grpokit train`).

    Weights, gradients and optimizer state are always float32. Compute runs under bf16 autocast
    when `args.bf16` is set and `device` computes bf16 natively (`DeviceTraits.native_bf16`: a
    CPU with avx512_bf16/amx_bf16 not capped below it by `ONEDNN_MAX_CPU_ISA` /
    `ATEN_CPU_CAPABILITY`, a CUDA GPU of compute capability 8.0 or newer); otherwise in
    float32 (emulated bf16 would be slower than float32). `fp16` never gets here: `GRPOConfig`
    refuses it.
    """
    device = torch.device(device)
    if not args.bf16:
        logger.info("precision: float32 weights and compute (bf16=False)")
        return False
    traits = device_traits(device)
    if traits.native_bf16:
        logger.info("precision: float32 weights/optimizer, bf16 autocast compute")
    else:
        logger.info(
            "precision: float32 (this %s has no native bf16: %s)", device.type, traits.bf16_reason
        )
    return traits.native_bf16


def sampling_params(args: GRPOConfig) -> SamplingParams:
    """The generation half of the config."""
    return SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        generation_kwargs=dict(args.generation_kwargs or {}),
    )


# ---- schedule and optimizer ----------------------------------------------------------------------
def make_tool_calling(
    tools: list[Any] | None, environment_factory: Any, tokenizer: Any, args: GRPOConfig
) -> tuple[ToolCalling | None, Environments | None]:
    """The tool-calling settings and the environment pool of a run (None, None without tools
    or environments).

    Raises:
        ConfigError: a tool without type hints or docstring, two tools with one name, an
            environment without `reset`, or a chat template that cannot show tools or render a
            tool conversation.
    """
    if not tools and environment_factory is None:
        return None, None
    calling = ToolCalling.from_functions(
        list(tools or []),
        parser=resolve_parser(args.tool_call_parser),
        max_iterations=args.max_tool_calling_iterations,
        timeout=args.tool_timeout,
    )
    pool = None
    if environment_factory is not None:
        pool = Environments(environment_factory, calling.tools)
    if calling.tools or (pool is not None and pool.methods):
        check_tool_template(tokenizer, args.chat_template_kwargs)
    return calling, pool


def as_list(value: Any) -> list[Any]:
    """`value` as a list: None -> [], a list/tuple as is, anything else in a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def resolve_max_steps(args: GRPOConfig, dataset_size: int | None) -> int:
    """Optimizer steps of the run: `max_steps`, or derived from `num_train_epochs`.

    Raises:
        ValueError: `max_steps=-1` with a dataset of unknown length.
    """
    if args.max_steps > 0:
        return args.max_steps
    if dataset_size is None:
        raise ValueError(
            "max_steps=-1 needs a dataset with a length to derive the steps from "
            "num_train_epochs; set max_steps for an IterableDataset."
        )
    rounds = math.ceil(args.num_train_epochs * dataset_size / args.prompts_per_generation)
    return max(1, rounds) * args.steps_per_round


def make_optimizer(model: torch.nn.Module, args: GRPOConfig) -> torch.optim.Optimizer:
    """The optimizer `args.optim` names (see `train.optimizers`); weight decay on matrices only
    (not biases or norm weights), as transformers."""
    return optimizers.make_optimizer(model, args)


def make_optimizers(
    model: torch.nn.Module, args: GRPOConfig, max_steps: int, pair: Any = (None, None)
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and learning-rate schedule: `pair` is the trainer's `optimizers=(optimizer,
    scheduler)` argument; what it leaves None is built from `args` (`make_optimizer`,
    `make_scheduler`), as transformers' `Trainer` does.

    Raises:
        TypeError: `optimizers` is not a pair, or its optimizer is not a `torch.optim.Optimizer`.
        ValueError: the optimizer does not hold exactly the model's trainable parameters
            (`check_optimizer_matches`), or a scheduler steps another optimizer than the one used.
    """
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"optimizers must be a pair (optimizer, scheduler), either None, got {pair!r}."
        )
    given, scheduler = pair
    if given is not None:
        check_optimizer_matches(given, model)
    optimizer: torch.optim.Optimizer = given if given is not None else make_optimizer(model, args)
    if scheduler is None:
        return optimizer, make_scheduler(optimizer, args, max_steps)
    if getattr(scheduler, "optimizer", None) is not optimizer:
        built = " (built from args, as optimizers[0] is None)" if given is None else ""
        raise ValueError(
            "optimizers: the scheduler steps another optimizer than the one training uses"
            f"{built}; pass the optimizer the scheduler was built on as optimizers[0]."
        )
    return optimizer, scheduler


def check_optimizer_matches(optimizer: Any, model: torch.nn.Module) -> None:
    """Refuse an optimizer that does not hold exactly the trainable parameters of `model` (the
    model as trained: loaded, LoRA-wrapped and on its device).

    Raises:
        TypeError: not a `torch.optim.Optimizer`.
        ValueError: it holds tensors that are not the model's parameters, or misses trainable
            ones (they would get gradients and never change).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            "optimizers[0] must be a torch.optim.Optimizer or None, got "
            f"{type(optimizer).__name__}."
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    foreign = len(held - {id(p) for p in model.parameters()})
    if foreign:
        raise ValueError(
            f"optimizers: the optimizer holds {foreign} tensor(s) that are not parameters of the "
            "model being trained: it was built for another model, or for a model GRPOTrainer "
            "then loaded from a path or wrapped with peft_config. Build it on the model you pass "
            "(under LoRA: wrap it with peft.get_peft_model yourself and pass that, without "
            "peft_config), or pass optimizers=(None, None)."
        )
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        peft = (
            " Under peft_config the adapter is created by GRPOTrainer: wrap the model with "
            "peft.get_peft_model yourself, build the optimizer on it and pass that model without "
            "peft_config."
            if ckpt.is_peft_model(model)
            else ""
        )
        raise ValueError(
            f"optimizers: {len(missing)} trainable parameter(s) of the model are not in the "
            f"optimizer (first: {missing[0]!r}); they would get gradients and never change. Add "
            f"them to the optimizer, or freeze them with requires_grad_(False).{peft}"
        )


def make_scheduler(optimizer: torch.optim.Optimizer, args: GRPOConfig, max_steps: int) -> Any:
    """The learning-rate schedule with warm-up (`warmup_steps`, else `warmup_ratio`)."""
    from transformers import get_scheduler

    if args.warmup_steps:
        warmup = resolve_steps(args.warmup_steps, max_steps)
    else:
        warmup = math.ceil(args.warmup_ratio * max_steps)
    return get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
    )


# ---- output folder and resume -------------------------------------------------------------------
def model_name(model: Any) -> str:
    """The policy's `name_or_path` ("" for a model built in memory); PEFT wrappers see through."""
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or "")


def find_checkpoint(resume_from_checkpoint: bool | str | None, output_dir: str) -> Path | None:
    """The checkpoint to resume from: True = the newest valid one in `output_dir`, a path = that
    one (verified). Checkpoints skipped for True are logged with the reason.

    Raises:
        FileNotFoundError: True with no `checkpoint-N` directory in `output_dir`, or a path that
            does not exist.
        CheckpointError: True and no checkpoint verifies (each reason listed), or a path that does
            not verify.
    """
    if not resume_from_checkpoint:
        return None
    ckpt.remove_temporary_folders(output_dir)
    if resume_from_checkpoint is not True:
        path = Path(resume_from_checkpoint)
        if not path.exists():
            raise FileNotFoundError(
                f"resume_from_checkpoint={str(path)!r} does not exist; pass a checkpoint-N "
                "directory, or True for the newest valid one in output_dir."
            )
        ckpt.verify_checkpoint(path)
        return path
    found, skipped = ckpt.newest_valid_checkpoint(output_dir)
    for error in skipped:
        logger.warning("skipping %s: %s", error.path, error.reason)
    if found is not None:
        return found
    if not skipped:
        raise FileNotFoundError(
            f"resume_from_checkpoint=True but {output_dir} holds no checkpoint-N "
            "directory; pass a checkpoint path or start without resuming."
        )
    reasons = "; ".join(f"{e.path.name}: {e.reason}" for e in skipped)
    raise ckpt.CheckpointError(
        output_dir,
        f"no checkpoint verifies ({reasons}); start again with overwrite_output_dir=True "
        "(CLI: --overwrite) or pass another checkpoint.",
    )


def prepare_fresh_output_dir(args: GRPOConfig) -> None:
    """Before a fresh (not resumed) run: refuse an `output_dir` holding another run's checkpoints,
    or, with `overwrite_output_dir`, delete them, naming each.

    Raises:
        CheckpointError: `output_dir` holds `checkpoint-N` directories and `overwrite_output_dir`
            is False.
    """
    existing = ckpt.list_checkpoints(args.output_dir)
    if not existing:
        return
    if not args.overwrite_output_dir:
        names = ", ".join(p.name for p in existing)
        raise ckpt.CheckpointError(
            args.output_dir,
            f"output_dir already holds checkpoints of another run ({names}). Pass "
            "resume_from_checkpoint=True to continue it, set overwrite_output_dir=True to delete "
            "them and start afresh, or choose another output_dir.",
        )
    remove_checkpoints(args.output_dir, say=logger.warning)


def remove_checkpoints(output_dir: str | Path, say: Any = print) -> list[Path]:
    """Delete every `checkpoint-N` of `output_dir`, saying for each whether it was valid.

    Args:
        output_dir: the run folder.
        say: called with one line per deleted checkpoint (`print`, `logger.warning`, ...).
    """
    removed = []
    for path in ckpt.list_checkpoints(output_dir):
        try:
            manifest = ckpt.verify_checkpoint(path)
            what = f"a valid checkpoint of step {manifest['step']}"
        except ckpt.CheckpointError as error:
            what = f"not a valid checkpoint: {error.reason}"
        say(f"overwrite: deleting {path} ({what})")
        shutil.rmtree(path)
        removed.append(path)
    ckpt.remove_temporary_folders(output_dir)
    return removed


def check_resume_config(
    path: Path, args: GRPOConfig, model: Any = None, *, policy: str | None = None
) -> None:
    """Compare this run's config (and model, when given) with checkpoint `path`'s; refuse or log
    the changes per `policy` (default: `args.resume_config_changes`; see `train.resume`).

    Raises:
        ResumeConfigError: a locked field or the model changed and the policy is "refuse".
    """
    saved = ckpt.read_json(path, ckpt.GRPO_CONFIG)
    state = ckpt.read_json(path, ckpt.TRAINER_STATE)
    changes = resume.config_changes(
        saved,
        args.to_dict(),
        saved_model=state.get("model_name_or_path") if model is not None else None,
        current_model=model_name(model) if model is not None else None,
    )
    resume.check_config_changes(path, changes, policy or args.resume_config_changes)


def restore_checkpoint(
    path: Path,
    *,
    args: GRPOConfig,
    model: Any,
    ref_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_steps: int,
) -> TrainerState:
    """Check the config against checkpoint `path`, then load weights, optimizer, scheduler, RNG
    and the synced reference model. With config changes applied, the optimizer keeps this run's
    hyper-parameters and `scheduler` (this run's) is moved to the resumed step instead of being
    loaded.

    Returns:
        The saved `TrainerState`, with `max_steps` of this run.

    Raises:
        CheckpointError: the checkpoint does not verify or is unsafe to load.
        ResumeConfigError: the config changes the optimisation and the policy is "refuse".
    """
    check_resume_config(path, args, model)
    saved_config = ckpt.read_json(path, ckpt.GRPO_CONFIG)
    applying = bool(resume.config_changes(saved_config, args.to_dict()))
    settings = resume.optimizer_settings(optimizer)
    saved = ckpt.load_checkpoint(
        path, model=model, optimizer=optimizer, scheduler=None if applying else scheduler
    )
    saved["max_steps"] = max_steps
    saved["model_name_or_path"] = model_name(model)
    known = {f.name for f in dataclasses.fields(TrainerState)}
    state = TrainerState(**{k: v for k, v in saved.items() if k in known})
    if applying:
        resume.apply_new_settings(optimizer, scheduler, settings, state.global_step)
    if (path / REF_MODEL_FILE).exists() and ref_model is not None:
        from safetensors.torch import load_model

        load_model(ref_model, str(path / REF_MODEL_FILE))
    if state.global_step % args.steps_per_round and state.global_step < max_steps:
        warnings.warn(
            f"Checkpoint {path} was saved mid generation round (step {state.global_step}); "
            "the resumed run starts a fresh round.",
            stacklevel=2,
        )
    newer = [p.name for p in ckpt.list_checkpoints(path.parent) if _step(p) > state.global_step]
    if newer and Path(args.output_dir).resolve() == path.parent.resolve():
        logger.warning(
            "output_dir holds checkpoints newer than %s (%s); this run replaces them as it "
            "reaches their steps, and resume_from_checkpoint=True would pick them meanwhile.",
            path.name,
            ", ".join(newer),
        )
    logger.info("resumed from %s at step %d", path, state.global_step)
    return state


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name[len(ckpt.CHECKPOINT_PREFIX) :])


def save_trainer_checkpoint(
    args: GRPOConfig,
    state: TrainerState,
    *,
    model: Any,
    tokenizer: Any,
    ref_model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    process_rng_states: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically, with the synced reference model and the
    merged weights inside when they exist, then drop the oldest checkpoints beyond
    `save_total_limit` (never this one, nor `state.best_model_checkpoint`).
    `process_rng_states`: the random generators of the other processes of a multi-process run
    (ranks 1, 2, ...), sealed with the rest."""
    path = checkpoint_path(args, state)

    def extra(folder: Path) -> None:
        save_process_rng_states(folder, process_rng_states)
        if ref_model is not None and args.sync_ref_model:
            from safetensors.torch import save_model

            save_model(ref_model, str(folder / REF_MODEL_FILE))
        if args.save_merged and ckpt.is_peft_model(model):
            # a sharded model's view holds its whole weights, gathered (`distributed.
            # ShardedModelView.full`); a plain model's are its own
            whole = getattr(model, "full", None)
            ckpt.save_model(model, tokenizer, folder / "merged", merged=True, state_dict=whole)

    ckpt.save_checkpoint(
        path,
        model=model,
        tokenizer=tokenizer,
        optimizer=optimizer,
        scheduler=scheduler,
        trainer_state=state.to_dict(),
        config=args.to_dict(),
        extra=extra,
        model_only=args.save_only_model,
    )
    best = state.best_model_checkpoint  # kept too, as transformers keeps it
    ckpt.rotate_checkpoints(args.output_dir, args.save_total_limit, protect=[path, best])
    return path


def checkpoint_path(args: GRPOConfig, state: TrainerState) -> Path:
    """`output_dir/checkpoint-{global_step}`: where the checkpoint of this step goes."""
    return Path(args.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}"
