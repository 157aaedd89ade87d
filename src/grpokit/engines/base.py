"""The generation interface: `GenerationEngine`, what it returns, and helpers every engine shares.

The training loop only sees `GenerationEngine.generate` (token ids in, padded tensors out) and
`update_weights` (called after each optimizer step), so engines (transformers, vLLM, an injected
fake in tests) can be swapped without touching the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
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
        sampling_logprobs: `[N, T]` float32 log-probs reported by the engine, or None (0 at
            tokens the model did not write).
        tool_mask: `[N, T]` long, 1 = the model wrote the token, 0 = it was appended for it (a
            tool's or environment's reply, the next turn's header); None = single-turn, every
            token is the model's. Multi-turn, `completion_mask` is 1 up to the end of the last
            turn (the EOS of the final turn, or `max_new_tokens`), tool tokens included.
        turns: The multi-turn handler's record of the batch (`tools.turns.ToolTurns`: the
            replies appended, tool calls and errors per row); None = single-turn.
        extra_fields: N values per key passed to the reward functions as keyword arguments
            (a `rollout_func`'s extra fields).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    is_truncated: Tensor
    sampling_logprobs: Tensor | None = None
    tool_mask: Tensor | None = None
    turns: Any = None
    extra_fields: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def model_mask(self) -> Tensor:
        """`[N, T]` 1 = a token the model wrote: `completion_mask * tool_mask` (the tokens the
        loss and the length metrics see)."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * self.tool_mask

    @property
    def model_turns(self) -> Tensor:
        """`[N]` the model's turns per completion: the runs of `model_mask` ones (1 = it
        answered without a tool; an empty completion has 0)."""
        model = self.model_mask  # [N, T]
        starts = (model[:, 1:] == 1) & (model[:, :-1] == 0)  # [N, T-1] a run begins after a gap
        return (model[:, :1] == 1).sum(dim=1) + starts.sum(dim=1)


class GenerationEngine(Protocol):
    """Anything that samples completions for token-id prompts.

    An engine may also define `discard_trainable_copies(model)`, which the trainer calls before
    each optimizer step: it may free its copies of `model`'s trainable weights, since
    `update_weights` follows the step (`TransformersEngine` frees its packed bf16 weights).
    """

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


class TurnHandler(Protocol):
    """What happens between the turns of a multi-turn rollout (tool calls, environments).

    An engine calls `end_turn` whenever a row's assistant turn ends with an EOS token. The handler
    answers with the tokens to append to that row before the model writes again (a tool's reply
    rendered by the chat template, ending with the header of the next assistant turn), or ends the
    rollout. The appended tokens are part of the completion but not the model's (`tool_mask` 0).
    """

    def end_turn(self, row: int, turn_ids: list[int], room: int) -> Future[list[int] | None] | None:
        """Row `row` (of the N = B*G) ended a turn.

        Args:
            row: The completion's row.
            turn_ids: The tokens the model wrote in this turn, its EOS included.
            room: Completion tokens left before `max_new_tokens`.

        Returns:
            None when the rollout is over; else a future of the tokens to append (fewer than
            `room`), or of None when the rollout ends after all (e.g. the reply does not fit).
        """
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


def completions_output(
    prompt_ids: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    logprobs: Sequence[Sequence[float]] | None,
    *,
    num_generations: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput:
    """Pad an engine's completions into a `GenerationOutput`.

    Args:
        prompt_ids: `B` unpadded prompts.
        completions: `N = B*G` token-id lists, the G completions of a prompt consecutive (anything
            may follow an EOS; it is masked).
        logprobs: The sampling log-prob of each completion token (same lengths), or None.
        num_generations: `G`.
        eos_token_ids: Tokens that end a completion.
        pad_token_id: Written into the padding.

    Returns:
        `GenerationOutput` with `prompt_ids`/`prompt_mask` `[N, P]` left-padded, `completion_ids`
        `[N, T]` (`T` the longest completion, at least 1), `completion_mask` `[N, T]` 1 up to and
        including the first EOS, `is_truncated` `[N]`, `sampling_logprobs` `[N, T]` float32 with
        0 where `completion_mask` is 0 (None when `logprobs` is None).

    Raises:
        ValueError: there are not `B*G` completions, or a log-prob list's length differs from its
            completion's.
    """
    n = len(prompt_ids) * num_generations
    if len(completions) != n:
        raise ValueError(
            f"Expected {len(prompt_ids)} prompts x {num_generations} = {n} completions, got "
            f"{len(completions)}."
        )
    ids, mask = left_pad(prompt_ids, pad_token_id)  # [B, P]
    width = max(1, max(len(c) for c in completions))
    raw = torch.full((n, width), pad_token_id, dtype=torch.long)  # [N, T]
    values = torch.zeros((n, width), dtype=torch.float32)  # [N, T]
    for row, tokens in enumerate(completions):
        raw[row, : len(tokens)] = torch.as_tensor(list(tokens), dtype=torch.long)
        if logprobs is not None:
            if len(logprobs[row]) != len(tokens):
                raise ValueError(
                    f"Completion {row} has {len(tokens)} tokens but {len(logprobs[row])} log-probs."
                )
            values[row, : len(tokens)] = torch.as_tensor(list(logprobs[row]), dtype=torch.float32)
    completion_ids, completion_mask, is_truncated = completion_mask_from_ids(
        raw, eos_token_ids, pad_token_id
    )
    return GenerationOutput(
        prompt_ids=ids.repeat_interleave(num_generations, dim=0),
        prompt_mask=mask.repeat_interleave(num_generations, dim=0),
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        is_truncated=is_truncated,
        sampling_logprobs=None if logprobs is None else values * completion_mask,
    )


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS token ids: those of the model's generation_config and the tokenizer's."""
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


def plain_forward(model: Any) -> Any:
    """The module whose forward takes `logits_to_keep`/`position_ids` (a PEFT model's base)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
