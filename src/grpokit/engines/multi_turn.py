"""Multi-turn generation: the model writes, a `TurnHandler` answers, the model writes again.

`generate_with_turns` runs a multi-turn rollout on any `GenerationEngine`. An engine with its own
multi-turn path (`TransformersEngine.generate_turns`, which keeps each row's KV cache across
turns) is asked to use it; any other engine runs `reprefill_turns`, which calls
`engine.generate` once per turn on the rows still going, with the whole conversation so far as
the prompt (the history is prefilled again at every turn).

In the returned `GenerationOutput` the completion of a row is every token after its prompt: the
model's turns and the tokens appended between them (`tool_mask` 0), up to `max_new_tokens` in
all. A row is truncated when its last turn had no EOS within the budget; a row whose reply would
not fit ends after the EOS of its last turn (not truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from grpokit.engines.base import GenerationEngine, GenerationOutput, SamplingParams, TurnHandler


@dataclass
class RowRecord:
    """One completion being built: its tokens, who wrote each, and their sampling log-probs."""

    tokens: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)  # 1 = sampled by the model, 0 = appended
    logprobs: list[float] = field(default_factory=list)
    truncated: bool = False

    def add(self, ids: list[int], *, model: bool, logprobs: list[float] | None = None) -> None:
        """Append `ids`; appended (non-model) tokens get log-prob 0."""
        self.tokens += ids
        self.model += [int(model)] * len(ids)
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def assemble_output(
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    rows: list[RowRecord],
    pad_token_id: int,
    *,
    with_logprobs: bool,
) -> GenerationOutput:
    """Pad the N row records into a `GenerationOutput` with a `tool_mask`.

    Args:
        prompt_ids: `[N, P]` left-padded prompts. prompt_mask: `[N, P]` 1 = real token.
        rows: N records, in row order.
        pad_token_id: Written after each row's last token.
        with_logprobs: Fill `sampling_logprobs` from the records.
    """
    n = len(rows)
    t = max(1, max((len(r.tokens) for r in rows), default=1))
    completion_ids = torch.full((n, t), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((n, t), dtype=torch.long)
    tool_mask = torch.ones((n, t), dtype=torch.long)  # padding counts as "model" (masked anyway)
    logprobs = torch.zeros((n, t), dtype=torch.float32)
    for i, record in enumerate(rows):
        length = len(record.tokens)
        completion_ids[i, :length] = torch.as_tensor(record.tokens, dtype=torch.long)
        completion_mask[i, :length] = 1
        tool_mask[i, :length] = torch.as_tensor(record.model, dtype=torch.long)
        logprobs[i, :length] = torch.as_tensor(record.logprobs, dtype=torch.float32)
    is_truncated = torch.as_tensor([r.truncated for r in rows], dtype=torch.bool)
    return GenerationOutput(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        is_truncated,
        logprobs if with_logprobs else None,
        tool_mask,
    )


def generate_with_turns(
    engine: GenerationEngine,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    turns: TurnHandler,
) -> GenerationOutput:
    """Multi-turn rollouts of `num_generations` completions per prompt (module docstring).

    Uses the engine's own `generate_turns` when it has one, else `reprefill_turns`.
    """
    own = getattr(engine, "generate_turns", None)
    if callable(own):
        result: GenerationOutput = own(
            prompt_ids,
            num_generations=num_generations,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            turns=turns,
        )
        return result
    return reprefill_turns(
        engine,
        prompt_ids,
        num_generations=num_generations,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        turns=turns,
    )


def reprefill_turns(
    engine: GenerationEngine,
    prompt_ids: list[list[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    turns: TurnHandler,
) -> GenerationOutput:
    """Multi-turn rollouts by one `engine.generate` call per turn (works with any engine).

    The first call samples G completions per prompt; each later call continues only the rows
    whose handler appended a reply, one completion each, from prompt + completion so far, with
    `max_new_tokens` set to the largest budget left (each row is then cut to its own).
    """
    g = num_generations
    n = len(prompt_ids) * g
    prompts = [list(prompt_ids[row // g]) for row in range(n)]
    rows = [RowRecord() for _ in range(n)]
    out = engine.generate(
        prompt_ids, num_generations=g, max_new_tokens=max_new_tokens, sampling=sampling
    )
    first = out
    with_logprobs = out.sampling_logprobs is not None
    active = list(range(n))
    while active:
        waiting = {}
        for k, row in enumerate(active):
            record = rows[row]
            room = max_new_tokens - len(record.tokens)
            written = int(out.completion_mask[k].sum())
            length = min(written, room)
            ids = out.completion_ids[k, :length].tolist()
            logprobs = None
            if out.sampling_logprobs is not None:
                logprobs = out.sampling_logprobs[k, :length].tolist()
            record.add(ids, model=True, logprobs=logprobs)
            if bool(out.is_truncated[k]) or written > room:
                record.truncated = True
                continue
            reply = turns.end_turn(row, ids, room - length)
            if reply is not None:
                waiting[row] = reply
        active = []
        for row, reply in waiting.items():
            suffix = reply.result()
            if suffix is None:
                continue
            rows[row].add(list(suffix), model=False)
            active.append(row)
        if active:
            out = engine.generate(
                [prompts[row] + rows[row].tokens for row in active],
                num_generations=1,
                max_new_tokens=max(max_new_tokens - len(rows[row].tokens) for row in active),
                sampling=sampling,
            )
    pad = _pad_token_id(engine, first)
    return assemble_output(
        first.prompt_ids, first.prompt_mask, rows, pad, with_logprobs=with_logprobs
    )


def _pad_token_id(engine: Any, out: GenerationOutput) -> int:
    """The engine's pad token, else the one its prompts were padded with (else 0)."""
    pad = getattr(engine, "pad_token_id", None)
    if pad is not None:
        return int(pad)
    padding = out.prompt_ids[out.prompt_mask == 0]
    return int(padding[0]) if padding.numel() else 0
