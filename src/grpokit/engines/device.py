"""What grpokit does differently per device: every device-dependent rule, stated once.

The trainer, the generation engine and the build steps do not test `device.type` themselves: they
ask `device_traits(device)` for the device a model sits on and read the one field that answers
their question. Most of grpokit's speed-ups are CPU kernels and allocator settings; each is off on
a GPU, for the reason given on its field. The random-number and timing helpers below take the
device too, so a CUDA generator or a CUDA queue is never forgotten.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from grpokit.engines.models import bf16_supported, cpu_bf16

# Tokens (rows x padded width) of one training forward on the CPU under max_forward_tokens="auto",
# computing under bf16 autocast and in float32 (where each extra forward costs more: measured on
# an AVX2 CPU, bench/RESULTS.md).
CPU_MAX_FORWARD_TOKENS = 512
CPU_FLOAT32_FORWARD_TOKENS = 768
# Where activations are recomputed (native bf16), a training forward at most this large keeps
# its activations instead (and forwards each shared prompt once), a larger one those of as many
# of its last layers as this holds: its tokens x decoder layers x (hidden + MLP intermediate
# width). SmolLM2-135M's size at 1024 tokens: a kept forward of it holds about 0.85 MiB a
# token, so at most about 0.9 GiB (bench/RESULTS.md).
CPU_KEPT_ACTIVATION_SIZE = 1024 * 30 * (576 + 1536)
# Bytes a kept forward holds per unit of that size (one token in one layer, per unit of width)
# under bf16 autocast: SmolLM2-135M's 0.85 MiB a token over 30 x (576 + 1536). It turns bytes
# the run does not need elsewhere into kept size (`train.build.resolve_activation_bound`).
KEPT_ACTIVATION_BYTES = 14


@dataclass(frozen=True)
class DeviceTraits:
    """The device-dependent decisions for one device (built by `device_traits`).

    Attributes:
        type: torch's device type ("cpu", "cuda", "meta", ...).
        native_bf16: The device computes bf16 natively (`engines.models.bf16_supported`: a CPU
            with ``avx512_bf16``/``amx_bf16`` whose ISA no ``ONEDNN_MAX_CPU_ISA`` /
            ``ATEN_CPU_CAPABILITY`` setting caps below it (`engines.models.cpu_bf16`); a CUDA GPU
            of compute capability 8.0 or newer, or ROCm). Then `bf16=True` runs forward/backward
            under bf16 autocast and the generation engine samples from a bf16 copy of the
            policy; elsewhere bf16 would be emulated, slower than float32, and both stay
            float32.
        bf16_reason: What `native_bf16` rests on, for messages: the CPU's flag and caps
            (``avx512_bf16``, ``avx512_bf16 capped by ONEDNN_MAX_CPU_ISA=AVX2``,
            ``no avx512_bf16/amx_bf16``), the GPU's compute capability, or the device type.
        pack_sampler_weights: Keep the sampler's linear weights in oneDNN's blocked layout
            (`engines.packed_linear`): the bf16 copy's (`PackedLinear`, held only packed where
            no other module reads them: `PackedLinear.release_weight`, so the sampler's weights
            are held once) where bf16 is native, else the float32 policy's while it decodes
            (`DecodePacks`, a second copy beside the trained weights). CPU only: oneDNN is
            torch's CPU matmul library; cuBLAS reads the plain layout.
        grouped_attention: `attention="auto"` and the sampler copy use `core.attention`'s grouped
            attention. CPU only: there torch's SDPA runs a flash kernel that is slow for one
            query row per decode step; on a GPU SDPA's kernels are the fast path and never
            materialise the scores.
        retain_freed_memory: `GRPOConfig.retain_freed_memory` (glibc's `mallopt`) applies. CPU
            only: a GPU's tensors live in torch's CUDA caching allocator, which already reuses
            freed blocks; the setting would only keep the host's RSS at its peak.
        intra_op_threads: torch's intra-op thread count (`TransformersEngine(num_threads=...)`)
            is worth setting. CPU only: CUDA kernels do not run on those threads.
        tf32: TensorFloat-32 matmuls exist (`GRPOConfig.tf32`): a CUDA GPU of compute capability
            8.0 or newer.
        max_forward_tokens: What `GRPOConfig.max_forward_tokens="auto"` bounds one training
            forward to under bf16 autocast (`train.microbatch`; None = no bound) where it does
            not recompute activations instead (`activation_bound`). CPU:
            `CPU_MAX_FORWARD_TOKENS`. There activations of the whole micro-batch, kept for
            backward, are most of the process's peak memory, while matmuls of a few hundred rows
            already run at the CPU's matmul rate: smaller forwards cost little time
            (bench/RESULTS.md). A GPU needs large forwards to be kept busy; its micro-batch size
            is left to the user.
        float32_forward_tokens: The same bound for float32 compute. CPU:
            `CPU_FLOAT32_FORWARD_TOKENS`, higher: on a CPU without native bf16 (an AVX2 EPYC)
            384-token forwards cost 25% more update time than one forward per micro-batch and
            768-token ones about as much as 660 (1.03x), while the sampler's float32 packs are
            freed during the update (`DecodePacks.discard_trainable`) to make room
            (bench/RESULTS.md). None on a GPU.
        recompute_activations: Under bf16 autocast, `max_forward_tokens="auto"` bounds the
            training activations by recomputing them in the backward pass (non-reentrant
            gradient checkpointing of the decoder layers) over the whole micro-batch, instead
            of splitting it into forwards of `max_forward_tokens`, except in the layers a
            forward's `kept_activation_size` lets it keep. A CPU with native bf16, whether its
            bf16 matmuls run on AMX or on AVX-512 BF16: each extra forward of a split
            micro-batch costs a pass over all the gradients (accumulation, weight casts, the
            tied embedding's dense gradient), which is most of its cost once the matmuls run in
            bf16, while recomputing a layer costs one more forward of it. Measured on a Xeon
            with AMX and on a Zen 5 EPYC without AMX, recomputing (keeping what
            `kept_activation_size` allows) is faster than 512-token forwards and holds less
            memory (bench/RESULTS.md). False elsewhere: in float32 the matmuls dominate, and
            on a GPU.
        kept_activation_size: Under `recompute_activations`, a training forward whose tokens x
            decoder layers x (hidden + MLP intermediate width) is at most this keeps its
            activations instead of recomputing them (`train.build.ActivationBound.keep_up_to`),
            and a larger one keeps those of as many of its last layers as fit in it
            (`ActivationBound.kept_layers`): recomputing costs a layer's forward time, while
            the kept activations stay a bounded amount of memory (measured for SmolLM2-135M:
            about 0.85 MiB a token in all 30 layers). CPU: `CPU_KEPT_ACTIVATION_SIZE`; None on a
            GPU (never used there: no recomputation by default).
    """

    type: str
    native_bf16: bool
    bf16_reason: str
    pack_sampler_weights: bool
    grouped_attention: bool
    retain_freed_memory: bool
    intra_op_threads: bool
    tf32: bool
    max_forward_tokens: int | None
    float32_forward_tokens: int | None
    recompute_activations: bool
    kept_activation_size: int | None

    def activation_bound(self, bf16: bool) -> tuple[int | None, bool]:
        """How `GRPOConfig.max_forward_tokens="auto"` bounds the activations of training
        forwards on this device, for compute under bf16 autocast (`bf16`) or in float32.

        Returns:
            ``(max_tokens, recompute)``: the bound on the tokens of one training forward (None
            = one forward per micro-batch) and whether the decoder layers recompute their
            activations in the backward pass (`recompute_activations`, bf16 only).
        """
        if bf16 and self.recompute_activations:
            return None, True
        return (self.max_forward_tokens if bf16 else self.float32_forward_tokens), False

    @property
    def sampler_dtype(self) -> torch.dtype | None:
        """The dtype of the generation engine's sampler copy: bf16 where native, else None
        (no copy: the engine samples from the policy itself)."""
        return torch.bfloat16 if self.native_bf16 else None

    def autocast(
        self, enabled: bool, *, recompute: bool = False
    ) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this device type when `enabled`, else a no-op (float32 compute).
        Whether to enable it is `train.build.resolve_precision`'s rule (`native_bf16`).

        With `recompute` (a training forward whose decoder layers recompute their activations,
        `train.build.ActivationBound`) autocast keeps no cache of its weight casts: the cache
        would hold a bf16 copy of every weight until the forward ends, while each layer casts
        its weights again when it is recomputed in the backward pass anyway. The same casts
        and values; measured, one forward of 16 rows with recomputed layers: peak RSS
        3485-3737 instead of 3684-4014 MiB (bench/RESULTS.md)."""
        if enabled:
            return torch.autocast(
                device_type=self.type, dtype=torch.bfloat16, cache_enabled=not recompute
            )
        return contextlib.nullcontext()


def device_traits(device: torch.device | str | None = None) -> DeviceTraits:
    """The device-dependent decisions for `device` (see `DeviceTraits` for each rule).

    Args:
        device: A torch device or its name; None = the default device (CUDA when available).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device).type
    on_cpu = kind == "cpu"
    native_bf16 = bf16_supported(kind)
    return DeviceTraits(
        type=kind,
        native_bf16=native_bf16,
        bf16_reason=_bf16_reason(kind),
        pack_sampler_weights=on_cpu,
        grouped_attention=on_cpu,
        retain_freed_memory=on_cpu,
        intra_op_threads=on_cpu,
        tf32=kind == "cuda" and _cuda_has_tf32(),
        max_forward_tokens=CPU_MAX_FORWARD_TOKENS if on_cpu else None,
        float32_forward_tokens=CPU_FLOAT32_FORWARD_TOKENS if on_cpu else None,
        recompute_activations=on_cpu and native_bf16,
        kept_activation_size=CPU_KEPT_ACTIVATION_SIZE if on_cpu else None,
    )


def _bf16_reason(kind: str) -> str:
    if kind == "cpu":
        return cpu_bf16().reason
    if kind == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"CUDA compute capability {major}.{minor}"
    return f"a {kind} device"


def _cuda_has_tf32() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def model_device(model: Any) -> torch.device:
    """The device of `model`'s first parameter (the CPU for a model without parameters)."""
    param = next(iter(model.parameters()), None)
    return torch.device("cpu") if param is None else param.device


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on `device` (CUDA runs kernels asynchronously), so that a timer
    read next counts it; a no-op on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fork_rng() -> contextlib.AbstractContextManager[Any]:
    """`torch.random.fork_rng` over the CPU generator and, once CUDA is in use, every visible
    CUDA device's (`torch.manual_seed` reseeds them all): torch's random state is restored after
    the block. A process that never touched CUDA does not start it here."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda, device_type="cuda")
