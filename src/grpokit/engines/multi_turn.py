"""Multi-turn generation: the model writes, a `TurnHandler` answers, the model writes again.

`generate_with_turns` runs a multi-turn rollout on any `GenerationEngine`. An engine with its own
multi-turn path is asked to use it: `TransformersEngine.generate_turns` keeps each row's KV cache
across turns; the vLLM engines (`VLLMEngine`, `VLLMServerEngine`) run `overlapped_turns`, one
request per turn continuing the row's conversation so far, which vLLM's prefix cache serves
without prefilling the history again, and no row waits for another's turn or tool call. Any
other engine runs `reprefill_turns`, which calls `engine.generate` once per turn on the rows
still going, with the whole conversation so far as the prompt (the history is prefilled again at
every turn).

In the returned `GenerationOutput` the completion of a row is every token after its prompt: the
model's turns and the tokens appended between them (`tool_mask` 0), up to `max_new_tokens` in
all. A row is truncated when its last turn had no EOS within the budget; a row whose reply would
not fit ends after the EOS of its last turn (not truncated).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Collection, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from grpokit.engines.base import (
    GenerationEngine,
    GenerationOutput,
    SamplingParams,
    TurnHandler,
    left_pad,
)


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


# ---- turns as separate requests to an engine with a prefix cache --------------------------------
@dataclass
class TurnRequest:
    """One model turn of row `row`: continue `prefix` (its prompt and completion so far).

    Attributes:
        row: The completion's row (of the N = B*G).
        prefix: Prompt + every completion token so far (model turns and appended replies).
        max_tokens: Most tokens to write (the row's completion budget left).
        min_tokens: Tokens to write before a stop token may end the turn.
        seed: The request's sampling seed; None = the engine's random stream.
    """

    row: int
    prefix: list[int]
    max_tokens: int
    min_tokens: int = 0
    seed: int | None = None


@dataclass
class Sampled:
    """What an engine wrote for one prompt request.

    Attributes:
        completions: The request's completions (n token-id lists, one for a turn), each ending
            with a stop token or cut at `max_tokens`.
        logprobs: The sampling log-prob of each token (same lengths), or None when the engine
            reports none.
        cached_tokens: Prompt tokens whose KV came from the engine's prefix cache (not prefilled).
    """

    completions: list[list[int]]
    logprobs: list[list[float]] | None
    cached_tokens: int = 0


class TurnSampler(Protocol):
    """An engine seen by `overlapped_turns`: takes turn requests at any time, finishes them in
    any order."""

    def submit(self, requests: list[TurnRequest]) -> list[Future[Sampled]]:
        """Start sampling `requests` (one completion each); a future per request, in order."""
        ...

    def advance(self, replies: Collection[Future[Any]]) -> None:
        """Make progress: run one engine step, or (nothing to run here) block until one of the
        submitted requests or of `replies` is done."""
        ...


@dataclass
class TurnStats:
    """The prefill work of the turns after the first in one `overlapped_turns` call.

    Attributes:
        requests: Continuation requests sent (one per model turn after a row's first).
        prefix_tokens: Tokens of their prefixes (prompt + completion so far).
        cached_tokens: Of those, tokens the prefix cache served (the rest were prefilled).
    """

    requests: int = 0
    prefix_tokens: int = 0
    cached_tokens: int = 0


def overlapped_turns(
    sampler: TurnSampler,
    prompt_ids: Sequence[Sequence[int]],
    *,
    num_generations: int,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    turns: TurnHandler,
    min_new_tokens: int = 0,
    seed: int | None = None,
) -> tuple[GenerationOutput, TurnStats]:
    """Multi-turn rollouts with one sampler request per model turn, rows never waiting for each
    other.

    Every row starts as its own request (completion g of prompt i is row `i*G + g`). When a
    row's turn ends with an EOS, `turns.end_turn` is asked for the reply; once it is ready, the
    row's next turn is submitted at once (all replies ready at that moment in one `submit`),
    continuing prompt + completion so far with the budget left, while the other rows go on.
    A turn cut by its budget ends the row (truncated); a finished row sends nothing more.

    Args:
        sampler: The engine (`TurnSampler`).
        prompt_ids: `B` unpadded prompts.
        num_generations: `G` completions per prompt.
        max_new_tokens: Completion budget of a row: model and appended tokens together.
        eos_token_ids: Tokens that end a turn (the sampler's stop tokens).
        pad_token_id: Written into the padding of the output.
        turns: Answers each ended turn (`engines.base.TurnHandler`).
        min_new_tokens: Tokens before an EOS may end the first turn (`min_new_tokens`).
        seed: With a seed, row r's k-th turn (k = 0, 1, ...) samples with seed `seed + r + k*N`
            (its first turn with `seed + i*G + g`, as `generate` seeds completion g of prompt i).

    Returns:
        `(output, stats)`: the `GenerationOutput` (`tool_mask` 1 = sampled by the model;
        `sampling_logprobs` 0 at appended tokens, None when the sampler reported none) and the
        continuation turns' prefill `TurnStats`.
    """
    g = num_generations
    n = len(prompt_ids) * g
    eos = set(eos_token_ids)
    rows = [RowRecord() for _ in range(n)]
    sent = [0] * n  # turns requested per row
    stats = TurnStats()
    with_logprobs = True
    sampling: dict[Future[Sampled], int] = {}  # a turn being sampled -> its row
    replies: dict[int, Future[list[int] | None]] = {}  # a row's pending reply

    def request(row: int) -> TurnRequest:
        record, k = rows[row], sent[row]
        sent[row] += 1
        return TurnRequest(
            row=row,
            prefix=[*prompt_ids[row // g], *record.tokens],
            max_tokens=max_new_tokens - len(record.tokens),
            min_tokens=min(min_new_tokens, max_new_tokens) if k == 0 else 0,
            seed=None if seed is None else int(seed) + row + k * n,
        )

    def submit(requests: list[TurnRequest]) -> None:
        futures = sampler.submit(requests)
        sampling.update(zip(futures, (r.row for r in requests), strict=True))

    submit([request(row) for row in range(n)])
    while sampling or replies:
        progressed = False
        for future in [f for f in sampling if f.done()]:
            row, progressed = sampling.pop(future), True
            out, record = future.result(), rows[row]
            tokens = out.completions[0]
            if sent[row] > 1:
                stats.requests += 1
                stats.prefix_tokens += len(prompt_ids[row // g]) + len(record.tokens)
                stats.cached_tokens += out.cached_tokens
            with_logprobs = with_logprobs and out.logprobs is not None
            record.add(
                tokens, model=True, logprobs=None if out.logprobs is None else out.logprobs[0]
            )
            if tokens and tokens[-1] in eos:
                reply = turns.end_turn(row, tokens, max_new_tokens - len(record.tokens))
                if reply is not None:
                    replies[row] = reply
            else:
                record.truncated = True
        ready = []
        for row in [r for r, reply in replies.items() if reply.done()]:
            suffix, progressed = replies.pop(row).result(), True
            if suffix is not None:
                rows[row].add(list(suffix), model=False)
                ready.append(request(row))
        if ready:
            submit(ready)
        if not progressed and (sampling or replies):
            sampler.advance(list(replies.values()))
    ids, mask = left_pad(prompt_ids, pad_token_id)  # [B, P]
    output = assemble_output(
        ids.repeat_interleave(g, dim=0),
        mask.repeat_interleave(g, dim=0),
        rows,
        pad_token_id,
        with_logprobs=with_logprobs,
    )
    return output, stats


def wait_for_any(futures: Collection[Future[Any]]) -> None:
    """Block until one of `futures` is done (at once when one is, or when there are none)."""
    if futures:
        concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
