"""Per-token log-probabilities and entropies of sampled tokens, computed without a full log-softmax.

A policy-gradient step needs `log pi(o_t | q, o_<t)` for each sampled token, not the whole
distribution. Materialising `log_softmax(logits)` in float32 costs `N * T * V * 4` bytes (about
2.4 GB for one 4k-token sequence with a 150k vocabulary), so both functions here work on chunks of
positions, upcast each chunk to float32 on its own, and keep only the `[N, T]` results. When
gradients are needed, each chunk is recomputed in the backward pass (activation checkpointing), so
no float32 copy of the logits is held for backward either.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_SIZE = 1024  # positions (rows of the flattened [N*T, V] logits) per chunk


def _chunk_logprobs_and_entropy(
    logits: Tensor, token_ids: Tensor, temperature: float, compute_entropy: bool
) -> tuple[Tensor, Tensor]:
    """Log-prob of `token_ids` and entropy for one chunk. logits [R, V] any float; ids [R]."""
    scaled = logits.float() / temperature  # [R, V] float32, one chunk only
    log_normalizer = torch.logsumexp(scaled, dim=-1)  # [R]
    logprobs = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1) - log_normalizer  # [R]
    if not compute_entropy:
        return logprobs, torch.empty(0, device=logits.device)
    # H = -sum p log p = logsumexp(z) - sum softmax(z) * z
    entropy = log_normalizer - (torch.softmax(scaled, dim=-1) * scaled).sum(-1)  # [R]
    return logprobs, entropy


def selective_logprobs_and_entropy(
    logits: Tensor,
    token_ids: Tensor,
    *,
    temperature: float = 1.0,
    compute_entropy: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Log-probabilities of the given tokens (and optionally entropies) from logits, chunk by chunk.

    Equivalent to `torch.log_softmax(logits.float() / temperature, -1).gather(-1, ids)` but never
    holds more than `chunk_size` rows of float32 log-softmax at once.

    Args:
        logits: `[N, T, V]` logits in any float dtype (bf16, fp16, fp32).
        token_ids: `[N, T]` integer ids whose log-probabilities are wanted.
        temperature: Sampling temperature; logits are divided by it (must be > 0). Use the
            temperature the completions were sampled with so the log-probs are those of the sampler.
        compute_entropy: Also return the entropy `-sum_v p_v log p_v` of each position's
            (temperature-scaled) distribution.
        chunk_size: Number of positions (rows of the flattened `[N*T, V]` logits) per chunk.

    Returns:
        `(logprobs, entropies)`: `logprobs` is `[N, T]` float32; `entropies` is `[N, T]` float32,
        or `None` when `compute_entropy` is False. Gradients flow to `logits` when it requires grad.

    Raises:
        ValueError: on mismatched shapes, a non-positive temperature or chunk size.
    """
    if logits.dim() != 3 or token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be [N, T, V] and token_ids [N, T]; got logits {tuple(logits.shape)} and "
            f"token_ids {tuple(token_ids.shape)}. Slice logits to the completion positions first."
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")

    n, t, v = logits.shape
    flat_logits = logits.reshape(n * t, v)  # [N*T, V]
    flat_ids = token_ids.reshape(n * t).long()  # [N*T]
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad

    logprob_chunks, entropy_chunks = [], []
    for start in range(0, n * t, chunk_size):
        chunk = flat_logits[start : start + chunk_size]
        ids = flat_ids[start : start + chunk_size]
        if use_checkpoint:
            # Recompute the float32 chunk in backward instead of keeping it alive.
            logprobs, entropy = checkpoint(
                _chunk_logprobs_and_entropy,
                chunk,
                ids,
                temperature,
                compute_entropy,
                use_reentrant=False,
            )
        else:
            logprobs, entropy = _chunk_logprobs_and_entropy(
                chunk, ids, temperature, compute_entropy
            )
        logprob_chunks.append(logprobs)
        entropy_chunks.append(entropy)

    logprobs = torch.cat(logprob_chunks).reshape(n, t)  # [N, T] float32
    entropies = torch.cat(entropy_chunks).reshape(n, t) if compute_entropy else None
    return logprobs, entropies


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose `forward` computes `model`'s logits with its full signature.

    A PEFT model's own `forward(*args, **kwargs)` hides the wrapped causal LM's arguments
    (`logits_to_keep`, `position_ids`). For adapters that live inside the base model's layers
    (LoRA and the other injected tuners) the base model computes exactly the same logits, adapters
    included and `disable_adapter()` respected, so it is called directly. Prompt-learning
    adapters (prompt / prefix / p-tuning) add virtual tokens in the wrapper's forward, so those
    keep the wrapper.
    """
    config = getattr(model, "active_peft_config", None)
    get_base_model = getattr(model, "get_base_model", None)
    if config is None or not callable(get_base_model):
        return model
    if getattr(config, "is_prompt_learning", False):
        return model
    base: torch.nn.Module = get_base_model()
    return base


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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
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
        chunk_size: Positions per chunk in `selective_logprobs_and_entropy`.

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

    model = forward_module(model)
    keep_logits = _accepts(model, "logits_to_keep")
    pass_positions = _accepts(model, "position_ids")
    step = batch_size or input_ids.shape[0]
    logprob_slices, entropy_slices = [], []
    for start in range(0, input_ids.shape[0], step):
        ids = input_ids[start : start + step]  # [n, P+T]
        mask = attention_mask[start : start + step]  # [n, P+T]
        kwargs: dict[str, object] = {"input_ids": ids, "attention_mask": mask}
        if keep_logits:
            kwargs["logits_to_keep"] = completion_len + 1
        if pass_positions:
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [n, P+T]
        logits = model(**kwargs).logits[:, -(completion_len + 1) : -1, :]  # [n, T, V]
        completion_ids = ids[:, -completion_len:]  # [n, T]
        logprobs, entropies = selective_logprobs_and_entropy(
            logits,
            completion_ids,
            temperature=temperature,
            compute_entropy=compute_entropy,
            chunk_size=chunk_size,
        )
        logprob_slices.append(logprobs)
        if entropies is not None:
            entropy_slices.append(entropies)

    logprobs = torch.cat(logprob_slices)  # [N, T]
    entropies = torch.cat(entropy_slices) if compute_entropy else None
    return logprobs, entropies
