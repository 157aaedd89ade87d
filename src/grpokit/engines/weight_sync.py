"""Moving a policy's weights into a vLLM engine: which tensors, under which names, over what.

`merged_weights` gives the tensors to send under the names of the Hugging Face checkpoint (a
PEFT model's adapters merged into its base weights, made one at a time as they are sent),
optionally only those a training step can change. `WeightGroup` is a two-member
`torch.distributed` process group between a trainer and a vLLM server (gloo on CPU, NCCL when
both ends are on CUDA devices), made directly on a `TCPStore` so that it never touches the
default process group a multi-process run may have. Tensors travel packed into flat buffers of
at most `CHUNK_BYTES`, in the server's dtype.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from grpokit.core.logprobs import is_prompt_learning

CHUNK_BYTES = 256 << 20  # largest flat buffer of one broadcast (a larger tensor goes alone)
SENDER, RECEIVER = 0, 1  # ranks in the group: the trainer sends, the server receives


class OutgoingWeights:
    """The weights `merged_weights` gives: their names (the HF checkpoint's) and shapes at once,
    their values one at a time as they are iterated, `(name, tensor)`. A LoRA layer's merged
    weight is made when its turn comes and dropped by the consumer after use, so that sending a
    large model never holds all its merged copies at once.

    Under FSDP2 the parameters are shards (`DTensor`s): each value is then cast to `dtype` (when
    given) and gathered whole as it is made; under DeepSpeed ZeRO-3 the partitions each value is
    made from are gathered for it alone (`deepspeed.zero.GatheredParameters`) and released
    after. Both are collectives, so every process must then iterate the same weights in the
    same order; each whole tensor is released once its consumer drops it
    (the sender packs at most `CHUNK_BYTES` of them for one broadcast)."""

    def __init__(self, entries: list[tuple[str, Tensor, Any]], dtype: torch.dtype | None) -> None:
        """`entries`: `(name, tensor, lora)`: the tensor itself when `lora` is None, else the
        base weight of the plain LoRA layer `lora`, sent merged (`merged_lora_weight`).
        `dtype`: the values' dtype (None = the tensors' own)."""
        self._entries, self._dtype = entries, dtype
        self.names = [name for name, _, _ in entries]
        self.shapes = [tuple(_whole_shape(w)) for _, w, _ in entries]

    @property
    def device(self) -> torch.device:
        """The device the tensors are on (that of the first)."""
        return self._entries[0][1].device

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        for name, weight, lora in self._entries:
            sources = [weight] if lora is None else _lora_sources(lora)
            with _gathered(sources) as gathered:
                value = weight if lora is None else merged_lora_weight(lora)
                if self._dtype is not None:
                    value = value.detach().to(self._dtype)
                value = whole_tensor(value)  # gathered when a DTensor
                if gathered and value.data_ptr() == weight.data_ptr():
                    value = value.clone()  # the gathered tensor is released on exit
            yield name, value

    def tensors(self) -> Iterator[Tensor]:
        """The values alone, in order, made one at a time."""
        return (tensor for _, tensor in self)


def whole_tensor(tensor: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a `DTensor`; a collective: every process of its
    mesh must call it for the same tensor, in the same order), or `tensor` itself.

    A CPU shard over gloo split along its first dimension (FSDP2's `Shard(0)` on one mesh
    dimension) is gathered by `gather_by_broadcasts`; other shards by `DTensor.full_tensor`."""
    if not is_shard(tensor):
        return tensor
    mesh, placements = tensor.device_mesh, tensor.placements  # type: ignore[attr-defined]
    plain = (
        mesh.ndim == 1
        and len(placements) == 1
        and type(placements[0]).__name__ == "Shard"
        and placements[0].is_shard(0)
        and tensor.device.type == "cpu"
    )
    group = mesh.get_group() if plain else None
    if group is None or torch.distributed.get_backend(group) != "gloo":
        return tensor.full_tensor()  # type: ignore[attr-defined]
    local = tensor.to_local().contiguous()  # type: ignore[attr-defined]
    size, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    # DTensor's Shard(0): torch.chunk's rows, the processes past the last chunk holding none
    rows = [len(chunk) for chunk in torch.arange(tensor.shape[0]).chunk(size)]
    rows += [0] * (size - len(rows))
    if local.shape[0] != rows[rank]:
        return tensor.full_tensor()  # type: ignore[attr-defined]
    whole = torch.empty(tensor.shape, dtype=tensor.dtype)
    gather_by_broadcasts(whole, local, rows, group)
    return whole


def gather_by_broadcasts(
    whole: Tensor, local: Tensor, rows: Sequence[int], group: Any = None
) -> None:
    """Gather into `whole` (contiguous) the rows of every process of `group` along the first
    dimension, in rank order (`rows[k]` of process k; `local`, this process's), as one
    broadcast per process that holds rows: gloo's all-gather is several times slower than its
    broadcast on two processes (pytorch/gloo#471; bench/RESULTS.md). Each process copies its
    rows into their place, then every place is broadcast from its owner: the same bytes as an
    all-gather."""
    start, rank = 0, torch.distributed.get_rank(group)
    for k, count in enumerate(rows):
        if count:
            place = whole.narrow(0, start, count)  # process k's rows
            if k == rank:
                place.copy_(local)
            source = k if group is None else torch.distributed.get_global_rank(group, k)
            torch.distributed.broadcast(place, src=source, group=group)
        start += count


def is_shard(tensor: Tensor) -> bool:
    """Whether `tensor` is an FSDP2 shard (a `DTensor`, whose `full_tensor` gathers it)."""
    return callable(getattr(tensor, "full_tensor", None))


def sharded_parameter(param: Tensor) -> bool:
    """Whether `param` is an FSDP2 shard or a DeepSpeed ZeRO-3 parameter: its whole value takes
    a collective of every process (`full_tensor`, or gathering its partitions)."""
    return is_shard(param) or hasattr(param, "ds_id")


def zero3_partition(param: Tensor) -> bool:
    """Whether `param` holds only this process's ZeRO-3 partition (DeepSpeed keeps the whole
    parameter's size in `ds_numel`, its shape in `ds_shape`), not its whole value."""
    whole = getattr(param, "ds_numel", None)
    return whole is not None and param.numel() != whole


def _whole_shape(tensor: Tensor) -> torch.Size:
    """The whole tensor's shape: a ZeRO-3 partition's `ds_shape`, else its own (a DTensor's is
    the whole's)."""
    shape = getattr(tensor, "ds_shape", None)
    return torch.Size(shape) if shape is not None else tensor.shape


@contextlib.contextmanager
def _gathered(params: Sequence[Tensor]) -> Iterator[bool]:
    """Within the block, those of `params` that are ZeRO-3 partitions hold their whole values
    (a collective: every process gathers the same ones), released after; yields whether any
    were gathered."""
    partitions = [p for p in params if zero3_partition(p)]
    if not partitions:
        yield False
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitions, modifier_rank=None):
        yield True


def _lora_sources(layer: Any) -> list[Tensor]:
    """The parameters a plain LoRA layer's merged weight is made from."""
    (adapter,) = layer.active_adapters
    return [layer.base_layer.weight, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]


@contextlib.contextmanager
def merged_weights(
    model: Any, *, changed_only: bool = False, dtype: torch.dtype | None = None
) -> Iterator[OutgoingWeights]:
    """The weights to send, with the names the HF checkpoint uses (see `OutgoingWeights`).

    Under PEFT each plain LoRA layer (`plain_lora_layer`) is sent as `W + scaling * B @ A`,
    made out of place: the model's own weights are never written. Any other adapter layer
    (DoRA, several active adapters, LoRA on an embedding, another tuner) is merged into its
    base weight in place for the duration and unmerged after (exact up to the fp32 rounding
    of `W + dW - dW`). Adapter tensors and the frozen originals of `modules_to_save` are left
    out. A tensor held by several modules (tied embeddings) appears once, under its first name.

    Args:
        model: A transformers causal LM, optionally a PEFT model.
        changed_only: Only the tensors an optimizer step can change: parameters with
            `requires_grad`, and under PEFT the base weights that adapters merge into and
            `modules_to_save`.
        dtype: Cast each value to this dtype as it is made (None = as it is).
    """
    refuse_prompt_learning(model)
    if not callable(getattr(model, "get_base_model", None)):
        yield OutgoingWeights(
            [
                (name, w, None)
                for name, w in model.named_parameters()
                if not changed_only or w.requires_grad
            ],
            dtype,
        )
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = model.get_base_model()
    apart: dict[str, Any] = {}  # base weight's name -> its plain LoRA layer, merged out of place
    in_place: list[Any] = []  # other adapter layers, merged into their base weights meanwhile
    for name, module in base.named_modules():
        if isinstance(module, BaseTunerLayer):
            if plain_lora_layer(module):
                apart[f"{name}.base_layer.weight"] = module
            elif not module.merged:  # one merged already holds its adapters in its weights
                in_place.append(module)
    if any(sharded_parameter(p) for m in in_place for p in m.parameters()):
        raise ValueError(
            "Only plain LoRA layers can be pushed to vLLM from a model sharded by FSDP2 or "
            "partitioned by DeepSpeed ZeRO-3 (their merge is made tensor by tensor); this "
            "adapter has others (DoRA, several active adapters, LoRA on an embedding or another "
            "tuner). Train a plain LoRA adapter, or launch with DDP or ZeRO-2."
        )
    for module in in_place:
        module.merge()
    try:
        yield OutgoingWeights(
            [
                (
                    name.replace(".base_layer.", ".").replace(".modules_to_save.default.", "."),
                    w,
                    apart.get(name),
                )
                for name, w in base.named_parameters()
                if "lora_" not in name
                and ".original_module." not in name
                and (
                    not changed_only
                    or w.requires_grad
                    or ".modules_to_save." in name
                    or name.endswith(".base_layer.weight")
                )
            ],
            dtype,
        )
    finally:
        for module in in_place:
            module.unmerge()


def plain_lora_layer(module: Any) -> bool:
    """Whether `module` is a plain LoRA layer, whose merged weight is `W + scaling * B @ A`
    (`merged_lora_weight`): a `torch.nn.Linear` base, one active adapter, no DoRA or other
    variant, no adapter bias, not transposed (`fan_in_fan_out`), not merged in place, adapters
    on."""
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(module, LoraLinear) or type(module.base_layer) is not torch.nn.Linear:
        return False
    active = list(module.active_adapters)
    if len(active) != 1 or module.merged or module.disable_adapters or module.fan_in_fan_out:
        return False
    (adapter,) = active
    return not (
        module.use_dora.get(adapter, False)
        or getattr(module, "lora_bias", {}).get(adapter, False)
        or getattr(module, "lora_variant", {}).get(adapter) is not None
    )


def mergeable_lora_layers(model: Any) -> dict[str, Any] | None:
    """The adapter layers of a PEFT model by their names in its base model, where every one is
    a plain LoRA layer (`plain_lora_layer`) a sampler may hold merged. None for any other model
    (not PEFT, a prompt-learning adapter, another tuner or LoRA layer, `modules_to_save`, or no
    adapter layer), whose sampler keeps the PEFT layers."""
    if not callable(getattr(model, "get_base_model", None)) or is_prompt_learning(model):
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    layers: dict[str, Any] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            return None
        if not isinstance(module, BaseTunerLayer):
            continue
        if not plain_lora_layer(module):
            return None
        layers[name] = module
    return layers or None


def merged_lora_weight(layer: Any) -> Tensor:
    """`W + scaling * B @ A` of a plain LoRA layer (`plain_lora_layer`): a new tensor, in the
    base weight's dtype; the layer is left as it is."""
    (adapter,) = layer.active_adapters
    with torch.no_grad():
        base = layer.base_layer.weight
        return base + layer.get_delta_weight(adapter).to(base.dtype)


def refuse_prompt_learning(model: Any) -> None:
    """Raise if `model`'s adapter is a prompt-learning one (prompt/prefix tuning, p-tuning):
    its virtual tokens are not weights, so no merged checkpoint carries them to vLLM.

    Raises:
        ValueError: naming the ways out (a LoRA-style adapter, or sampling without vLLM).
    """
    if is_prompt_learning(model):
        raise ValueError(
            "vLLM samples from the policy's (merged) weights, and a prompt-learning PEFT adapter "
            "(prompt tuning, prefix tuning, p-tuning) adds virtual tokens that no weight "
            "carries: train a LoRA-style adapter with use_vllm=True, or set use_vllm=False to "
            "sample through the PEFT model's own generate."
        )


def chunk_plan(numels: Sequence[int], element_bytes: int, limit: int = CHUNK_BYTES) -> list[range]:
    """Consecutive tensor indices packed into each flat buffer of at most `limit` bytes (a tensor
    larger than `limit` gets a buffer of its own). Sender and receiver compute the same plan."""
    plan: list[range] = []
    start, size = 0, 0
    for i, numel in enumerate(numels):
        nbytes = numel * element_bytes
        if i > start and size + nbytes > limit:
            plan.append(range(start, i))
            start, size = i, 0
        size += nbytes
    if start < len(numels):
        plan.append(range(start, len(numels)))
    return plan


def local_address_towards(host: str, port: int) -> str:
    """This machine's IP address on the route to `host` (a UDP `connect` sends no packet)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))
        return str(probe.getsockname()[0])


def _gloo_device(address: str) -> Any:
    """The gloo transport device: `GLOO_SOCKET_IFNAME` when set, else bound to `address`."""
    interface = os.environ.get("GLOO_SOCKET_IFNAME", "")
    if interface:
        return torch.distributed.ProcessGroupGloo.create_device(interface=interface.split(",")[0])
    return torch.distributed.ProcessGroupGloo.create_device(hostname=address)


class WeightGroup:
    """A two-member process group (trainer rank 0 sends, server rank 1 receives).

    The trainer hosts the rendezvous `TCPStore` (`host_store`); each group's keys live under its
    own `prefix`, so one store serves every group a trainer process opens. Both ends build the
    group, which blocks until the other has joined (at most `timeout` seconds). Every later
    broadcast also fails after `timeout` seconds, and at once when the other process has died.
    """

    _hosted: ClassVar[dict[int, Any]] = {}  # the trainer's stores, by port

    def __init__(
        self,
        store: Any,
        *,
        prefix: str,
        rank: int,
        backend: str,
        address: str,
        timeout: float,
    ) -> None:
        """Join the group.

        Args:
            store: The rendezvous store: `host_store(...)` on the trainer, `connect_store(...)`
                on the server.
            prefix: This group's namespace in the store (the same on both ends).
            rank: `SENDER` (0, the trainer) or `RECEIVER` (1, the server).
            backend: "gloo" (tensors on the CPU) or "nccl" (tensors on the current CUDA device).
            address: This end's address for gloo's connections (ignored by NCCL).
            timeout: Seconds for the rendezvous and for each broadcast.
        """
        self.prefix = prefix
        delta = datetime.timedelta(seconds=timeout)
        dist: Any = torch.distributed  # the process-group classes are not in torch's stubs
        scoped = dist.PrefixStore(prefix, store)
        self.group: Any
        if backend == "gloo":
            options = dist.ProcessGroupGloo._Options()
            options._timeout = delta
            options._devices = [_gloo_device(address)]
            self.group = dist.ProcessGroupGloo(scoped, rank, 2, options)
            self.device = torch.device("cpu")
        elif backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = delta
            self.group = dist.ProcessGroupNCCL(scoped, rank, 2, options)
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}.")
        self.backend = backend

    @classmethod
    def host_store(cls, port: int, timeout: float) -> Any:
        """The trainer's rendezvous store on `port` of every interface, made once per port
        (0 = a new store on a free port; its `.port` says which).

        Raises:
            RuntimeError: `port` is taken by another process.
        """
        if port in cls._hosted:
            return cls._hosted[port]
        try:
            store = torch.distributed.TCPStore(
                "0.0.0.0",
                port,
                None,
                True,
                timeout=datetime.timedelta(seconds=timeout),
                wait_for_workers=False,
            )
        except (RuntimeError, OSError) as error:
            raise RuntimeError(
                f"Cannot listen on vllm_group_port {port} for the weight-update group ({error}); "
                "set vllm_group_port to a free port (0 = any)."
            ) from error
        cls._hosted[int(store.port)] = store
        return store

    @staticmethod
    def connect_store(host: str, port: int, timeout: float) -> Any:
        """The server's connection to the trainer's rendezvous store."""
        return torch.distributed.TCPStore(
            host, port, None, False, timeout=datetime.timedelta(seconds=timeout)
        )

    def _broadcast(self, buffer: Tensor) -> None:
        options = torch.distributed.BroadcastOptions()
        options.rootRank = SENDER
        self.group.broadcast([buffer], options).wait()

    def send(
        self, shapes: Sequence[Sequence[int]], tensors: Iterable[Tensor], dtype: torch.dtype
    ) -> None:
        """Broadcast `tensors` (of these `shapes`, taken one at a time), cast to `dtype`, packed
        into flat buffers (see `chunk_plan`)."""
        numels = [int(torch.Size(shape).numel()) for shape in shapes]
        element = torch.empty((), dtype=dtype).element_size()
        values = iter(tensors)
        for chunk in chunk_plan(numels, element):
            flat = [next(values).detach().reshape(-1).to(self.device, dtype) for _ in chunk]
            self._broadcast(torch.cat(flat) if len(flat) > 1 else flat[0].contiguous())

    def receive(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> list[Tensor]:
        """Receive the tensors a `send` of tensors with these shapes broadcast, in order."""
        numels = [int(torch.Size(shape).numel()) for shape in shapes]
        element = torch.empty((), dtype=dtype).element_size()
        out: list[Tensor] = []
        for chunk in chunk_plan(numels, element):
            buffer = torch.empty(sum(numels[i] for i in chunk), dtype=dtype, device=self.device)
            self._broadcast(buffer)
            pieces = buffer.split([numels[i] for i in chunk])
            out.extend(p.view(*shapes[i]) for p, i in zip(pieces, chunk, strict=True))
        return out
