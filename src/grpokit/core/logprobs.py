"""Per-token log-probabilities and entropies of sampled tokens, computed without a full log-softmax.

A policy-gradient step needs `log pi(o_t | q, o_<t)` for each sampled token, not the whole
distribution. Materialising `log_softmax(logits)` in float32 costs `N * T * V * 4` bytes (about
2.4 GB for one 4k-token sequence with a 150k vocabulary), so both functions here work on chunks of
positions, upcast each chunk to float32 in one reused buffer, and keep only the `[N, T]` results.
The backward pass recomputes each chunk's probabilities from the saved logits and the `[N, T]`
log-normalizers, so no float32 copy of the logits is held for backward either.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_ELEMENTS = 1 << 21  # logits per float32 chunk (8 MB): small enough to stay in cache


def _positions_per_chunk(vocab_size: int, completion_len: int, chunk_size: int | None) -> int:
    """Positions of one sequence per chunk: `chunk_size`, else as many as fit
    `DEFAULT_CHUNK_ELEMENTS` logits, spread evenly over the `completion_len` positions."""
    limit = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS // max(1, vocab_size))
    blocks = -(-completion_len // limit)  # ceil
    return -(-completion_len // blocks)


def _chunks(n: int, t: int, c: int) -> Iterator[tuple[int, int, int]]:
    """`(row, first, stop)` blocks of at most `c` positions covering `[n, t]` row by row."""
    for row in range(n):
        for first in range(0, t, c):
            yield row, first, min(first + c, t)


class _SelectiveLogSoftmax(torch.autograd.Function):
    """Log-prob of one token per position (and its entropy) from logits, a float32 chunk at a time.

    Inputs: `logits` `[N, L, V]` (any float dtype, last dim contiguous) and `token_ids` `[N, T]`
    with `T <= L`: position `t` of row `n` scores `token_ids[n, t]` with `logits[n, t]`; positions
    `T..L-1` are ignored (get zero gradient). Outputs `[N, T]` float32 log-probs and entropies
    (empty when not requested).

    Forward and backward each make a few passes over one float32 buffer reused across chunks and
    sized to stay in cache, instead of the several full-size float32 tensors that autograd through
    `logsumexp`, `gather` and `softmax` creates. Saved for backward: the logits (the caller holds
    them anyway), the ids and the per-position log-normalizer and entropy `[N, T]`. With
    `overwrite`, for logits nothing reads after this backward (a model's output that
    `model_completion_logprobs` holds alone), the backward pass writes their gradient over them:
    the logits and a gradient of their size are then never held at once. A second backward
    through them would find them changed and raise.

    With `z = logits / temperature`, `p = softmax(z)`, `H = -sum p log p`:
    `d logprob / dz = onehot(token) - p` and `d H / dz = -p * (log p + H)`.
    """

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        token_ids: Tensor,
        temperature: float,
        chunk: int,
        compute_entropy: bool,
        overwrite: bool,
    ) -> tuple[Tensor, Tensor]:
        n, t = token_ids.shape
        v = logits.shape[-1]
        device = logits.device
        logprobs = torch.empty((n, t), dtype=torch.float32, device=device)
        log_normalizer = torch.empty_like(logprobs)
        entropy = torch.empty_like(logprobs) if compute_entropy else logprobs.new_empty(0)
        shifted = torch.empty((chunk, v), dtype=torch.float32, device=device)
        exps = torch.empty_like(shifted)
        with torch.autocast(logits.device.type, enabled=False):
            for row, first, stop in _chunks(n, t, chunk):
                z = shifted[: stop - first]
                z.copy_(logits[row, first:stop])
                if temperature != 1.0:
                    z.div_(temperature)
                peak = z.amax(-1, keepdim=True)  # [c, 1]
                z.sub_(peak)  # z - max
                picked = z.gather(1, token_ids[row, first:stop, None]).squeeze(1)  # [c]
                e = exps[: stop - first]
                torch.exp(z, out=e)
                total = e.sum(-1)  # [c]
                log_total = total.log()
                logprobs[row, first:stop] = picked - log_total
                log_normalizer[row, first:stop] = peak.squeeze(1) + log_total
                if compute_entropy:
                    # H = log S - sum_v e_v (z_v - max) / S, with e = exp(z - max), S = sum_v e_v
                    # in place into e (not needed after): a batched matrix product of this
                    # shape is ~10x slower on some CPUs (bench/RESULTS.md)
                    dot = e.mul_(z).sum(-1)  # [c]
                    entropy[row, first:stop] = log_total - dot / total
        ctx.save_for_backward(logits, token_ids, log_normalizer, entropy)
        ctx.temperature = temperature
        ctx.chunk = chunk
        ctx.overwrite = overwrite
        ctx.set_materialize_grads(False)
        if not compute_entropy:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(
        ctx: Any, grad_logprobs: Tensor | None, grad_entropy: Tensor | None
    ) -> tuple[Tensor | None, None, None, None, None, None]:
        logits, token_ids, log_normalizer, entropy = ctx.saved_tensors
        if grad_logprobs is None and (grad_entropy is None or entropy.numel() == 0):
            return None, None, None, None, None, None
        if entropy.numel() == 0:
            grad_entropy = None
        n, t = token_ids.shape
        # with `overwrite`, chunk by chunk: each chunk is read before its gradient is written
        grad = logits if ctx.overwrite else torch.empty_like(logits)
        grad[:, t:].zero_()  # positions T..L-1 score nothing
        buffer = torch.empty((ctx.chunk, logits.shape[-1]), dtype=torch.float32, device=grad.device)
        probs = torch.empty_like(buffer) if grad_entropy is not None else buffer
        with torch.autocast(logits.device.type, enabled=False):
            for row, first, stop in _chunks(n, t, ctx.chunk):
                z = buffer[: stop - first]
                z.copy_(logits[row, first:stop])
                if ctx.temperature != 1.0:
                    z.div_(ctx.temperature)
                z.sub_(log_normalizer[row, first:stop, None])  # log p
                ids = token_ids[row, first:stop, None]  # [c, 1]
                g = None if grad_logprobs is None else grad_logprobs[row, first:stop, None]
                if grad_entropy is None:
                    assert g is not None
                    z.exp_().mul_(-g)  # -g p
                else:
                    p = probs[: stop - first]
                    torch.exp(z, out=p)
                    gh = grad_entropy[row, first:stop, None]
                    z.add_(entropy[row, first:stop, None]).mul_(p).mul_(-gh)  # -gh p (log p + H)
                    if g is not None:
                        z.sub_(p.mul_(g))  # - g p
                if g is not None:
                    z.scatter_add_(1, ids, g)  # + g at the sampled token
                if ctx.temperature != 1.0:
                    z.div_(ctx.temperature)
                grad[row, first:stop].copy_(z)
        return grad, None, None, None, None, None


def _selective(
    logits: Tensor,
    token_ids: Tensor,
    temperature: float,
    compute_entropy: bool,
    chunk_size: int | None,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """`_SelectiveLogSoftmax` on `logits` `[N, L, V]` scoring `token_ids` `[N, T]`, `T <= L`;
    `overwrite`: the backward pass writes the gradient over `logits` (only for logits the caller
    alone holds and never reads again)."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunk = _positions_per_chunk(logits.shape[-1], token_ids.shape[1], chunk_size)
    logprobs, entropy = _SelectiveLogSoftmax.apply(
        logits, token_ids.long(), temperature, chunk, compute_entropy, overwrite
    )
    return logprobs, (entropy if compute_entropy else None)


def selective_logprobs_and_entropy(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the given tokens (and optionally entropies) from logits, chunk by chunk.

    Equivalent to `torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids)` but never
    holds more than one chunk of float32 log-softmax at once, in forward or backward.

    Args:
        logits: `[N, T, V]` logits in any float dtype (bf16, fp16, fp32).
        token_ids: `[N, T]` integer ids whose log-probabilities are wanted.
        temperature: Sampling temperature; logits are divided by it (must be > 0). Use the
            temperature the completions were sampled with so the log-probs are those of the sampler.
        compute_entropy: Also return the entropy `-sum_v p_v log p_v` of each position's
            (temperature-scaled) distribution.
        chunk_size: Positions of one sequence per float32 chunk (None = as many as fit
            `DEFAULT_CHUNK_ELEMENTS` logits).

    Returns:
        `(logprobs, entropies)`: `logprobs` is `[N, T]` float32; `entropies` is `[N, T]` float32,
        or `None` when `compute_entropy` is False. Gradients flow to `logits` from both when it
        requires grad.

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature or chunk size.
    """
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, T, V] and token_ids [N, T]; got logits {tuple(logits.shape)} and "
            f"token_ids {tuple(token_ids.shape)}. Slice logits to the completion positions first."
        )
    _check_options(temperature, chunk_size)
    return _selective(logits, token_ids, temperature, compute_entropy, chunk_size)


def _check_options(temperature: float, chunk_size: int | None) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}.")


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose `forward` computes `model`'s logits with its full signature.

    A PEFT model's own `forward(*args, **kwargs)` hides the wrapped causal LM's arguments
    (`logits_to_keep`, `position_ids`). For adapters that live inside the base model's layers
    (LoRA and the other injected tuners) the base model computes exactly the same logits, adapters
    included and `disable_adapter()` respected, so it is called directly. Prompt-learning
    adapters (prompt / prefix / p-tuning) add virtual tokens in the wrapper's forward, so those
    keep the wrapper. A training wrapper's `forward(*inputs, **kwargs)` (DDP's, DeepSpeed's
    engine: `training_wrapper`) hides them too: the module it wraps, itself resolved so (a
    caller that trains calls the wrapper, with the arguments the wrapped module names: DDP
    readies its gradient averaging there, the engine its own bookkeeping).
    """
    wrapper = training_wrapper(model)
    if wrapper is not None:
        inner = wrapper.module
        assert isinstance(inner, torch.nn.Module)  # training_wrapper checked it
        model = inner
    get_base_model = getattr(model, "get_base_model", None)
    if getattr(model, "active_peft_config", None) is None or not callable(get_base_model):
        return model
    if is_prompt_learning(model):
        return model
    base: torch.nn.Module = get_base_model()
    return base


def training_wrapper(model: torch.nn.Module) -> torch.nn.Module | None:
    """`model` when it is a wrapper that runs the model it holds as `module` in its own forward,
    whose signature is only `(*args, **kwargs)`: DDP's wrapper, DeepSpeed's engine (its
    `forward` passes every keyword on to the module); None for anything else."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model
    inner = getattr(model, "module", None)
    if not isinstance(inner, torch.nn.Module) or inner is model:
        return None
    kinds = {p.kind for p in inspect.signature(model.forward).parameters.values()}
    hidden = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    return model if kinds and kinds <= hidden else None


def is_prompt_learning(model: Any) -> bool:
    """Whether `model` is a PEFT model whose active adapter is a prompt-learning one (prompt
    tuning, prefix tuning, p-tuning): virtual tokens or a learned key/value prefix that only the
    PEFT wrapper's own `forward`/`generate` add, not any weight of the base model."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    """Whether `model.forward` names `argument` (a bare `**kwargs` does not count: it may drop
    or reject the argument further down)."""
    return argument in inspect.signature(model.forward).parameters


def model_completion_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_len: int,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    share_prompts: bool = False,
    agree: Callable[[bool], bool] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the completion tokens under a causal LM.

    The logits at position `p` predict token `p + 1`, so the last `T` tokens (the completion) are
    scored by the logits at positions `-(T+1) .. -2`. Only those `T + 1` positions are projected to
    the vocabulary when the model accepts `logits_to_keep` (Hugging Face causal LMs do).

    Position ids are computed from the attention mask (`cumsum - 1`), so left padding of the prompt
    does not shift the positions of real tokens and does not change the completion log-probs.
    A PEFT model is called through its base model (see `forward_module`) so that both arguments
    reach it.

    Args:
        model: A causal LM (or a PEFT model wrapping one) whose forward takes `input_ids` and
            `attention_mask` and returns an object with `.logits` `[n, L, V]`.
        input_ids: `[N, P+T]` left-padded prompt followed by the right-padded completion.
        attention_mask: `[N, P+T]`; 1 = real token, 0 = padding.
        completion_len: `T`, the number of completion positions at the end of `input_ids`.
        temperature: Sampling temperature the logits are divided by.
        compute_entropy: Also return per-token entropies.
        batch_size: Run the forward in slices of this many rows (None = all rows at once).
        chunk_size: Positions per float32 chunk (see `selective_logprobs_and_entropy`).
        share_prompts: Forward a prompt that several rows of a slice share once and feed its
            keys and values to each of those rows' completions (`shared_prompt_rows`,
            `prompt_sharing_supported`): the same log-probs and gradients up to float rounding,
            with `U * P + n * T` tokens forwarded instead of `n * (P + T)` for `U` distinct
            prompts. Under transformers' gradient checkpointing too (non-reentrant): the
            checkpointed layers take the prompts' cache read-only. Rows whose prompts all
            differ, models it does not support, and a training wrapper's slice of one
            completion position take the plain path.
        agree: For processes that must all make the same calls (FSDP2 and DeepSpeed ZeRO-3
            gather the weights around every call, ZeRO-2 reduces the gradients in the order
            the backward readies them): called once per slice on every process with whether
            this process's slice would share its prompts (False where `share_prompts` is off),
            it returns whether every process's would; the slice shares only then (a slice of
            one completion token, `completion_len == 1`, answers False). None = each process
            decides alone.

    Returns:
        `(logprobs, entropies)`, each `[N, T]` float32 (entropies None unless requested). Values at
        completion padding positions are meaningless; mask them with `completion_mask`. Gradients
        flow to the model's parameters when called outside `torch.no_grad()`.

    Raises:
        ValueError: on mismatched shapes or a completion length outside `1 .. P+T-1`.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and attention_mask must both be [N, P+T]; got {tuple(input_ids.shape)} and "
            f"{tuple(attention_mask.shape)}."
        )
    total_len = input_ids.shape[1]
    if not 1 <= completion_len < total_len:
        raise ValueError(
            f"completion_len must be in 1..{total_len - 1} (at least one prompt token precedes the "
            f"completion); got {completion_len}."
        )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}.")
    _check_options(temperature, chunk_size)

    # A training wrapper (DDP's, DeepSpeed's engine) passes its keyword arguments on to the
    # module it wraps: call the wrapper (DDP readies the averaging of the gradients there) with
    # the arguments the wrapped module's forward names (`logits_to_keep`: only the completion
    # positions' logits). A shared prompt's own pass runs on the wrapped module
    # (`_shared_prompt_forward`).
    wrapper = training_wrapper(model)
    inner = forward_module(model)
    keep_logits = _accepts(inner, "logits_to_keep")
    pass_positions = _accepts(inner, "position_ids")
    # Under a wrapper a shared forward needs a completion pass (T > 1) to go through it; so do
    # processes that agree on their calls: a shared slice of one completion token makes one
    # call, the prompt pass, where another process's shared slice makes two, and FSDP2 gathers
    # each layer around every call (two FSDP2 processes that differed so hung; bench/RESULTS.md).
    share = share_prompts and prompt_sharing_supported(inner)
    share = share and ((wrapper is None and agree is None) or completion_len > 1)
    model = wrapper if wrapper is not None else inner
    step = batch_size or input_ids.shape[0]
    logprob_slices, entropy_slices = [], []
    for start in range(0, input_ids.shape[0], step):
        ids = input_ids[start : start + step]  # [n, P+T]
        mask = attention_mask[start : start + step]  # [n, P+T]
        groups = shared_prompt_rows(ids, mask, completion_len) if share else None
        if agree is not None and not agree(groups is not None):
            groups = None  # another process's slice takes the plain path
        if groups is not None:
            shared: tuple[Tensor, Tensor | None] | None
            try:
                shared = _shared_prompt_forward(
                    inner,
                    ids,
                    mask,
                    completion_len,
                    groups,
                    temperature,
                    compute_entropy,
                    chunk_size,
                    completions=model,
                )
            except _CacheDropped:
                logger.warning(
                    "%s dropped the shared prompts' cache under gradient checkpointing; its "
                    "checkpointed forwards now pass every row's prompt.",
                    type(inner).__name__,
                )
                shared = None
            if shared is not None:
                logprobs, entropies = shared
                logprob_slices.append(logprobs)
                if entropies is not None:
                    entropy_slices.append(entropies)
                continue
        kwargs: dict[str, object] = {"input_ids": ids, "attention_mask": mask}
        if keep_logits:
            kwargs["logits_to_keep"] = completion_len + 1
        if pass_positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [n, P+T]
        logits = model(**kwargs).logits  # [n, T+1, V] when the model kept only those
        if logits.shape[1] != completion_len + 1:
            # Sliced only when needed: the gradient of a slice, even of every position, is a
            # zero-filled full-size tensor plus a copy ([n, T+1, V]).
            logits = logits[:, -(completion_len + 1) :, :]  # [n, T+1, V]
        completion_ids = ids[:, -completion_len:]  # [n, T]
        # Position t of the logits scores completion token t; the last position is unused. The
        # logits are passed whole (not sliced) so their gradient needs no extra full-size copy.
        logprobs, entropies = _selective(
            logits, completion_ids, temperature, compute_entropy, chunk_size, overwrite=True
        )
        logprob_slices.append(logprobs)
        if entropies is not None:
            entropy_slices.append(entropies)

    logprobs = torch.cat(logprob_slices)  # [N, T]
    entropies = torch.cat(entropy_slices) if compute_entropy else None
    return logprobs, entropies


def prompt_sharing_supported(model: torch.nn.Module) -> bool:
    """Whether `model` (the module `forward_module` returns) can forward a prompt once for
    several completions (`model_completion_logprobs(share_prompts=True)`).

    It needs a forward that takes `past_key_values`, `position_ids` and `logits_to_keep`, a
    cache whose every layer keeps all past positions (transformers' `DynamicLayer`: no sliding
    window, no recurrent state), and its decoder layers must not drop the cache: under
    transformers' gradient checkpointing in training mode, only layers that take a read-only
    cache through their checkpoint keep it (`_cache_passes_checkpoints`).
    """
    if not all(_accepts(model, name) for name in SHARED_FORWARD_ARGUMENTS):
        return False
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if not _cache_passes_checkpoints(model):
        return False
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = DynamicCache(config=config).layers
    except Exception:  # a config the cache cannot read: keep the plain forward
        return False
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _checkpointed_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose calls transformers checkpoints now: their `gradient_checkpointing`
    flag is set and the model is in training mode (none in eval mode)."""
    if not model.training:
        return []
    return [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]


def _reentrant(layer: torch.nn.Module) -> bool:
    """Whether `layer`'s checkpoint function may be torch's reentrant checkpoint: True unless
    it is, or wraps (`__wrapped__`), a `functools.partial` with `use_reentrant=False`. The
    reentrant checkpoint gives no gradient to a tensor the function reads without taking it as
    an argument, as a cached prompt's keys are."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    while function is not None:
        if isinstance(function, functools.partial):
            return function.keywords.get("use_reentrant", True) is not False
        function = getattr(function, "__wrapped__", None)
    return True


_drops_checkpointed_cache: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
"""Models whose forward dropped a shared prompt's cache under gradient checkpointing (a model
that checkpoints its layers in its own loop rather than in transformers'
`GradientCheckpointingLayer`): they no longer share prompts while checkpointed."""


def _cache_passes_checkpoints(model: torch.nn.Module) -> bool:
    """Whether a shared forward's completion pass can pass its prompts' cache through every
    call of `model` that transformers checkpoints now: none is checkpointed, or each is a
    decoder layer (`GradientCheckpointingLayer`, whose `_can_checkpoint_with_cache` lets a
    cache through) under torch's non-reentrant checkpoint, or a model whose own flag its
    forward does not read (checked after each shared prompt pass: a model that dropped the
    cache is remembered in `_drops_checkpointed_cache`)."""
    checkpointed = _checkpointed_modules(model)
    if not checkpointed:
        return True
    if model in _drops_checkpointed_cache:
        return False
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return False
    if "_can_checkpoint_with_cache" not in vars(GradientCheckpointingLayer):
        return False  # a transformers that drops the cache of every checkpointed layer
    for module in checkpointed:
        if isinstance(module, GradientCheckpointingLayer):
            if _reentrant(module):
                return False
        elif not isinstance(module, PreTrainedModel):
            return False
    return True


@functools.cache
def _shared_caches() -> tuple[type, type]:
    """transformers' `DynamicCache` for the two passes of a shared forward, made once (an import
    of transformers' cache module deferred to the first shared forward):

    - `PromptCache`, the prompt pass's: a layer stores the prompt's keys and values on its first
      update; a later update of a filled layer (a checkpointed layer's recomputation in the
      backward pass) returns its new states as the first returned them, storing nothing;
    - `ReadOnlyPast`, the completion pass's, on the prompt cache's layers once they hold the
      rows' prompts (`rows_of_prompts`): an update returns the prompt's keys and values followed
      by the new ones, as `DynamicLayer.update` does, without storing them, so a checkpointed
      layer's recomputation reads the past its forward read (a storing cache would hand it the
      completion's keys twice).
    """
    from transformers.cache_utils import DynamicCache

    class PromptCache(DynamicCache):
        def update(
            self,
            key_states: Tensor,
            value_states: Tensor,
            layer_idx: int,
            *args: Any,
            **kwargs: Any,
        ) -> tuple[Tensor, Tensor]:
            layers: list[Any] = self.layers
            if layer_idx < len(layers) and layers[layer_idx].is_initialized:
                return key_states, value_states
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    class ReadOnlyPast(DynamicCache):
        def __init__(self, layers: list[Any]) -> None:
            super().__init__()
            self.layers = layers

        def update(
            self,
            key_states: Tensor,
            value_states: Tensor,
            layer_idx: int,
            *args: Any,
            **kwargs: Any,
        ) -> tuple[Tensor, Tensor]:
            layer: Any = self.layers[layer_idx]
            keys = torch.cat([layer.keys, key_states], dim=-2)
            return keys, torch.cat([layer.values, value_states], dim=-2)

    return PromptCache, ReadOnlyPast


class _CacheDropped(Exception):
    """A shared forward's prompt pass left some layer of its cache empty."""


@contextlib.contextmanager
def _flags(modules: list[torch.nn.Module], name: str, value: bool) -> Iterator[None]:
    """Within the block, `modules` have attribute `name` set to `value` (on the instance);
    restored after."""
    before = [m.__dict__.get(name, _MISSING) for m in modules]
    for module in modules:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, old in zip(modules, before, strict=True):
            if old is _MISSING:
                delattr(module, name)
            else:
                setattr(module, name, old)


_MISSING = object()


SHARED_FORWARD_ARGUMENTS = ("past_key_values", "position_ids", "logits_to_keep")
"""The forward arguments `prompt_sharing_supported` requires."""


def rows_of_prompts(cache: Any, inverse: Tensor) -> None:
    """Index each layer of `cache` (transformers' `DynamicLayer`s, `prompt_sharing_supported`)
    from the distinct prompts' keys and values `[U, Hkv, P, D]` to the rows' `[n, Hkv, P, D]`,
    row `i` taking prompt `inverse[i]`, differentiably. By `index_select`, whose backward sums
    each prompt's rows with `index_add_`: the cache's own `batch_select_indices` indexes with
    `keys[indices]`, whose backward accumulates through `index_put_`, 3-5x slower on a CPU for
    these shapes (bench/RESULTS.md). The same gradients up to the order of the sum's rounding."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, inverse)
        layer.values = layer.values.index_select(0, inverse)


def prompt_numbers(prompt_ids: Tensor, prompt_mask: Tensor) -> Tensor:
    """`[n]` long: one number per distinct prompt row of `prompt_ids` `[n, P]` (its ids and its
    padding, `prompt_mask` `[n, P]` 1 = real token), the same for rows with the same prompt."""
    prompts = prompt_ids.masked_fill(prompt_mask == 0, -1)  # [n, P]
    return torch.unique(prompts, dim=0, return_inverse=True)[1]


def forward_tokens(
    input_ids: Tensor, attention_mask: Tensor, completion_len: int, *, share_prompts: bool
) -> int:
    """The tokens `model_completion_logprobs` forwards for `input_ids` `[n, P+T]` (with
    `attention_mask` `[n, P+T]`, `T` = `completion_len`) in one slice: `n * (P + T)`, or with
    `share_prompts` and rows that share their prompt (`shared_prompt_rows`) `U * P + n * T`
    for `U` distinct prompts (`n - U` more under gradient checkpointing, where each row's last
    prompt token goes with its completion)."""
    n, width = input_ids.shape
    if not share_prompts:
        return n * width
    groups = shared_prompt_rows(input_ids, attention_mask, completion_len)
    if groups is None:
        return n * width
    return len(groups[0]) * (width - completion_len) + n * completion_len


def shared_prompt_rows(
    input_ids: Tensor, attention_mask: Tensor, completion_len: int
) -> tuple[Tensor, Tensor] | None:
    """Which rows of `input_ids` `[n, P+T]` share their prompt (the first `P` columns, padding
    included, with `attention_mask` `[n, P+T]`).

    Returns:
        `(first, inverse)`: `first` `[U]` the first row of each distinct prompt, in row order,
        and `inverse` `[n]` the index into `first` of each row's prompt; None when every row's
        prompt differs (sharing would save nothing).
    """
    p = input_ids.shape[1] - completion_len
    inverse = prompt_numbers(input_ids[:, :p], attention_mask[:, :p])  # [n] sorted order
    n = inverse.shape[0]
    count = int(inverse.max()) + 1 if n else 0
    if count == n:
        return None
    rows = torch.arange(n, device=inverse.device)
    first = torch.full((count,), n, dtype=torch.long, device=inverse.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")  # [U] in sorted-prompt order
    order = torch.argsort(first)  # renumber the prompts by their first row
    rank = torch.empty_like(order)
    rank[order] = torch.arange(count, device=order.device)
    return first[order], rank[inverse]


def common_prefix_first(ids: Tensor, mask: Tensor, *, min_saved: int = 16) -> tuple[Tensor, int]:
    """The prompts laid out for a shared prefill of their common leading tokens.

    Left-padded prompts `[B, P]` put a prefix that all of them share (a system prompt, a chat
    template's header) at different columns. This moves each row's padding to just after the
    first c tokens, the longest run that every row begins with (at most the shortest prompt's
    length minus 1, so every row keeps a token of its own), which puts the shared tokens in
    the same columns of every row, where one forward can serve them all (the sampler's
    `engines.transformers_engine.prefill(common=c)`). Positions follow the mask (`cumsum - 1`),
    so every token keeps its position and attends to the same tokens; only the column order of
    the cache changes. Not used in training forwards: there the extra forward and backward of
    the head cost more than they saved (bench/RESULTS.md).

    Args:
        ids: `[B, P]` left-padded prompts. mask: `[B, P]` 1 = real token.
        min_saved: Do nothing (c = 0) unless the shared prefill saves at least this many token
            forwards, `(B - 1) * c`: it costs a forward call of its own.

    Returns:
        `(order, c)`: `order` `[B, P]` long, the column of `ids`/`mask` each new column takes
        (gather along dim 1), and c; `(arange, 0)` when nothing is shared.
    """
    b, p = ids.shape
    columns = torch.arange(p, device=ids.device).expand(b, p)
    lengths = mask.sum(1)  # [B]
    shortest = int(lengths.min()) if b else 0
    if b < 2 or shortest < 2:
        return columns, 0
    start = p - lengths  # [B] first real column of each row
    span = shortest - 1
    heads = ids.gather(1, start[:, None] + torch.arange(span, device=ids.device))  # [B, span]
    same = (heads == heads[:1]).all(0)  # [span]
    c = int(same.long().cumprod(0).sum())
    if (b - 1) * c < min_saved:
        return columns, 0
    # new column j < c: old column start + j; c <= j < start + c: padding (old column j - c);
    # the rest: old column j (the row's own tokens stay where they were)
    order = torch.where(columns < c, start[:, None] + columns, columns - c)
    order = torch.where(columns >= (start + c)[:, None], columns, order)
    return order, c


def _shared_prompt_forward(
    model: torch.nn.Module,
    ids: Tensor,
    mask: Tensor,
    completion_len: int,
    groups: tuple[Tensor, Tensor],
    temperature: float,
    compute_entropy: bool,
    chunk_size: int | None,
    *,
    completions: torch.nn.Module | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`model_completion_logprobs` of one slice with each distinct prompt forwarded once.

    The distinct prompts `[U, P]` go through `model` with a cache; the logits of their last
    position score each row's first completion token. The cache, indexed to the `n` rows, then
    serves as the past of the completions `[n, T]`, whose logits at positions `0..T-2` score
    tokens `1..T-1`. Under gradient checkpointing the prompt pass stops one token short, and
    that token goes with each row's completion `[n, 1+T]`, whose logits then score every
    completion token. Gradients reach the prompt's activations from every row through the
    indexing.

    Args:
        completions: The module the completion pass is called through: `model` (None), or the
            DDP wrapper around it. DDP readies its gradient averaging in its own forward, once
            per backward; the prompt pass's gradients reach the same parameters in that
            backward, each parameter's summed before its averaging hook runs.
    """
    from transformers.cache_utils import DynamicCache

    first, inverse = groups  # [U], [n]
    p = ids.shape[1] - completion_len
    columns = (mask[first, :p] > 0).any(0).nonzero()  # the distinct prompts' shared padding
    lead = int(columns[0]) if columns.numel() else 0
    ids, mask, p = ids[:, lead:], mask[:, lead:], p - lead  # [n, P'+T]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [n, P'+T]
    # Under transformers' gradient checkpointing both passes take their cache through the
    # layers' checkpoints: each update returns in a layer's recomputation what it returned in
    # its forward (`_shared_caches`). The prompt pass then recomputes in every decoder layer, and
    # each row's last prompt token goes with its completion, so that the prompt pass needs no
    # logits: a layer keeping its activations, and the output layer, would keep their bf16
    # weights (autocast keeps no cache of its casts where layers recompute,
    # `DeviceTraits.autocast`) once for each pass. Without checkpointing the prompts' last
    # logits score the first completion token: FSDP2 and ZeRO-3 gather a layer's weights for
    # its backward when the gradient reaches its outputs, so every prompt layer's must carry
    # one.
    checkpointed = _checkpointed_modules(model)
    layers = [m for m in checkpointed if hasattr(m, "_can_checkpoint_with_cache")]
    every = [  # the layers that can recompute: those kept in this forward too
        m
        for m in (model.modules() if layers else ())
        if hasattr(m, "_can_checkpoint_with_cache")
        and getattr(m, "_gradient_checkpointing_func", None) is not None
        and not _reentrant(m)
    ]
    carried = 1 if layers and p > 1 else 0  # prompt tokens forwarded with each completion
    # transformers' own cache where no layer is checkpointed, else the two `_shared_caches`
    prompt_cache, read_only_past = _shared_caches() if layers else (DynamicCache, None)
    cache = prompt_cache(config=model.config)
    with (
        _flags(every, "gradient_checkpointing", True),
        _flags(every, "_can_checkpoint_with_cache", True),
    ):
        prefix = model(
            input_ids=ids[first, : p - carried],  # [U, P'-carried]
            attention_mask=mask[first, : p - carried],
            position_ids=positions[first, : p - carried],
            past_key_values=cache,
            use_cache=not layers,  # (checkpointed layers would warn that they turn it off)
            logits_to_keep=1,
        )
    completion_ids = ids[:, p:]  # [n, T]
    logprobs, entropies = None, None
    if not carried:
        head = prefix.logits[:, -1:, :].index_select(0, inverse)  # [n, 1, V]
        logprobs, entropies = _selective(
            head, completion_ids[:, :1], temperature, compute_entropy, chunk_size, overwrite=True
        )  # [n, 1]
        if completion_len == 1:
            return logprobs, entropies
    del prefix
    # A layer that drops the cache when checkpointed (every one is in the prompt pass, with
    # the flags above) leaves its layer of the prompt cache empty.
    if not all(layer.is_initialized for layer in cache.layers):
        _drops_checkpointed_cache.add(model)
        raise _CacheDropped
    rows_of_prompts(cache, inverse)  # [U, ...] -> [n, ...] per layer, differentiable
    past = read_only_past(cache.layers) if read_only_past else cache
    with _flags(layers, "_can_checkpoint_with_cache", True):
        rest = (completions or model)(
            input_ids=ids[:, p - carried :],  # [n, carried+T]
            attention_mask=mask,  # [n, P'+T]
            position_ids=positions[:, p - carried :],
            past_key_values=past,
            use_cache=not layers,
            logits_to_keep=completion_len + carried,
        ).logits  # [n, carried+T, V]; position t scores completion token t + 1 - carried
    tail, tail_entropies = _selective(
        rest,
        completion_ids[:, 1 - carried :],
        temperature,
        compute_entropy,
        chunk_size,
        overwrite=True,
    )  # [n, T-1+carried]; the last position scores nothing
    if logprobs is None:
        return tail, tail_entropies
    logprobs = torch.cat([logprobs, tail], dim=1)  # [n, T]
    if entropies is not None and tail_entropies is not None:
        entropies = torch.cat([entropies, tail_entropies], dim=1)
    return logprobs, entropies
