"""Rollout generation behind a small interface: `GenerationEngine` and its transformers engine.

The training loop only sees `GenerationEngine.generate` (token ids in, padded tensors out) and
`update_weights` (called after each optimizer step), so another engine, e.g. vLLM, can be added
without touching the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class SamplingParams:
    """How completions are sampled (the generation half of `GRPOConfig`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float | None = None
    repetition_penalty: float = 1.0
    generation_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationOutput:
    """Completions of a batch of prompts. `N = B*G`; the G completions of a prompt are consecutive.

    Attributes:
        prompt_ids: `[N, P]` prompt tokens, left-padded.
        prompt_mask: `[N, P]` 1 = real prompt token, 0 = padding.
        completion_ids: `[N, T]` sampled tokens; the pad token after the first EOS.
        completion_mask: `[N, T]` 1 for every token up to and including the first EOS, 0 after it.
        is_truncated: `[N]` bool, True when no EOS was produced within `max_new_tokens`.
        sampling_logprobs: `[N, T]` float32 log-probs reported by the engine, or None.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    is_truncated: Tensor
    sampling_logprobs: Tensor | None = None


class GenerationEngine(Protocol):
    """Anything that samples completions for token-id prompts."""

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions for each prompt (unpadded token-id lists)."""
        ...

    def update_weights(self, model: Any) -> None:
        """Make the engine sample from `model`'s current weights (called after optimizer steps)."""
        ...


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token-id lists into `(ids [B, P], mask [B, P])`; mask 1 = real token."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: pass at least one prompt.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("A prompt has no tokens; every prompt needs at least one token.")
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, tokens in enumerate(prompt_ids):
        ids[row, width - len(tokens) :] = torch.as_tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def completion_mask_from_ids(
    completion_ids: Tensor, eos_token_ids: Sequence[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask each completion after its first EOS.

    Args:
        completion_ids: `[N, T]` sampled tokens (anything may follow an EOS).
        eos_token_ids: token ids that end a completion.
        pad_token_id: written over every position after the first EOS.

    Returns:
        `(completion_ids [N, T] with pad after the first EOS, completion_mask [N, T] long: 1 up to
        and including the first EOS, is_truncated [N] bool: no EOS at all)`.
    """
    n, t = completion_ids.shape
    is_eos = torch.isin(completion_ids, torch.as_tensor(list(eos_token_ids), dtype=torch.long))
    has_eos = is_eos.any(dim=1)  # [N]
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full((n,), t))  # [N]
    positions = torch.arange(t).expand(n, t)  # [N, T]
    completion_mask = (positions <= first_eos.unsqueeze(1)).long()  # [N, T]
    cleaned = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
    return cleaned, completion_mask, ~has_eos


def _eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError(
            "Neither the tokenizer nor the model's generation_config defines an EOS token; set "
            "tokenizer.eos_token so completions can end."
        )
    return sorted(ids)


class TransformersEngine:
    """Samples with the policy's own `model.generate` in this process."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])

    def generation_config(self, max_new_tokens: int, sampling: SamplingParams) -> Any:
        """The `GenerationConfig` for one call: always sampling, never early length stopping."""
        from transformers import GenerationConfig

        kwargs: dict[str, Any] = dict(
            do_sample=True,
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,  # 0 disables top-k in transformers
            min_p=sampling.min_p,
            repetition_penalty=sampling.repetition_penalty,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_ids,
            bos_token_id=getattr(self.model.generation_config, "bos_token_id", None),
            use_cache=True,
        )
        kwargs.update(sampling.generation_kwargs)
        return GenerationConfig(**kwargs)

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        num_generations: int,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> GenerationOutput:
        """Sample `num_generations` completions per prompt; see `GenerationOutput` for shapes."""
        ids, mask = left_pad(prompt_ids, self.pad_token_id)  # [B, P]
        ids = ids.repeat_interleave(num_generations, dim=0)  # [N, P]
        mask = mask.repeat_interleave(num_generations, dim=0)  # [N, P]
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            sequences = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=self.generation_config(max_new_tokens, sampling),
            )
        finally:
            self.model.train(was_training)
        raw = sequences[:, ids.shape[1] :].cpu()  # [N, T]
        completion_ids, completion_mask, is_truncated = completion_mask_from_ids(
            raw, self.eos_token_ids, self.pad_token_id
        )
        return GenerationOutput(ids, mask, completion_ids, completion_mask, is_truncated, None)

    def update_weights(self, model: Any) -> None:
        """No-op: this engine samples from the training model itself."""
        del model


@dataclass
class RolloutBatch:
    """One generation batch ready for the update. `N = B*G` rows; all tensors on the CPU.

    Attributes:
        prompt_ids: `[N, P]` left-padded. prompt_mask: `[N, P]` 1 = real token.
        completion_ids: `[N, T]`. completion_mask: `[N, T]` 1 up to and including the first EOS
            (the tokens the model attends to).
        loss_mask: `[N, T]` 1 = the token counts in the loss: `completion_mask`, with truncated
            completions zeroed when `mask_truncated_completions` is on.
        advantages: `[N]` float32.
        old_logprobs / ref_logprobs / sampling_logprobs: `[N, T]` float32 or None (0 at padding).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    loss_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    sampling_logprobs: Tensor | None = None

    @property
    def size(self) -> int:
        """N, the number of completions."""
        return int(self.completion_ids.shape[0])

    def trimmed(self, rows: slice) -> tuple[Tensor, Tensor, int]:
        """`(input_ids [n, P'+T'], attention_mask [n, P'+T'], T')` of `rows` without the padding
        columns every row shares: leading prompt padding and trailing completion padding."""
        prompt_mask = self.prompt_mask[rows]  # [n, P]
        completion_mask = self.completion_mask[rows]  # [n, T]
        first = int((prompt_mask.sum(0) > 0).nonzero()[0])  # first column with a real token
        t = max(1, int(completion_mask.sum(1).max()))
        input_ids = torch.cat([self.prompt_ids[rows, first:], self.completion_ids[rows, :t]], dim=1)
        attention_mask = torch.cat([prompt_mask[:, first:], completion_mask[:, :t]], dim=1)
        return input_ids, attention_mask, t

    def sliced(self, name: str, rows: slice, t: int, device: torch.device) -> Tensor | None:
        """`[n, t]` rows of the per-token tensor `name`, or None when it was not computed."""
        value: Tensor | None = getattr(self, name)
        return None if value is None else value[rows, :t].to(device)
