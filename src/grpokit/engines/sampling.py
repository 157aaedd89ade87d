"""Next-token sampling from logits: transformers' processors in its order, and exact draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from grpokit.engines.base import SamplingParams
from grpokit.errors import UserError

# generation_kwargs the lean decode loop implements itself (others need transformers' generate)
LEAN_GENERATION_KWARGS = frozenset({"min_new_tokens", "sequence_bias", "suppress_tokens"})


def sample_multinomial(probs: Tensor) -> Tensor:
    """One draw per row of `probs` `[N, V]` by `torch.multinomial`, as `model.generate`: `[N]`."""
    return torch.multinomial(probs, num_samples=1).squeeze(1)


CDF_BLOCK = 256  # tokens per block of the two-level inverse CDF


def sample_categorical(probs: Tensor) -> Tensor:
    """One exact draw per row of `probs` `[N, V]` (non-negative, any positive total) by inverting
    its cumulative distribution: `[N]` long.

    Needs one uniform number per row, where `torch.multinomial` draws V exponentials per row (a
    pass over the whole vocabulary per row and step; cost in bench/RESULTS.md). The CDF
    is inverted in two levels, both in float64 so that no token's interval is lost to rounding
    against a running sum near 1 (in float32 a token with p < ~6e-8 would vanish): first the
    block of `CDF_BLOCK` tokens, from the cumulative block masses `[N, V / CDF_BLOCK]`, then the
    token inside it, from that block's own cumulative sum `[N, CDF_BLOCK]`; this avoids a full
    `[N, V]` float64 cumulative sum. `u` is uniform in `[0, total)` and the drawn token is the
    first whose cumulative mass exceeds `u`, so a zero-probability token is never drawn.
    """
    n, v = probs.shape
    pad = -v % CDF_BLOCK
    padded = torch.nn.functional.pad(probs, (0, pad)) if pad else probs
    blocks = padded.reshape(n, -1, CDF_BLOCK)  # [N, nb, B]
    # Block masses by a float64 matrix-vector product, which on CPU is much faster than
    # `.sum(-1)` over the last dim of this shape.
    ones = torch.ones(CDF_BLOCK, dtype=torch.float64, device=probs.device)
    block_cdf = (blocks.double() @ ones).cumsum(-1)  # [N, nb]
    total = block_cdf[:, -1:]  # [N, 1]
    u = torch.rand(n, 1, dtype=torch.float64, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total
    block = torch.searchsorted(block_cdf, u, right=True)  # [N, 1], a block of positive mass
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp(min=0)), 0.0)
    flat = block.squeeze(1) + torch.arange(n, device=probs.device) * blocks.shape[1]  # [N]
    inner_cdf = blocks.reshape(-1, CDF_BLOCK).index_select(0, flat).cumsum(-1, dtype=torch.float64)
    rest = torch.minimum(u - before, torch.nextafter(inner_cdf[:, -1:], torch.zeros_like(u)))
    inner = torch.searchsorted(inner_cdf, rest, right=True)  # [N, 1]
    return (block * CDF_BLOCK + inner).squeeze(1)


DRAWS: dict[str, Callable[[Tensor], Tensor]] = {
    "multinomial": sample_multinomial,
    "inverse_cdf": sample_categorical,
}


class NonFiniteLogitsError(UserError, FloatingPointError):
    """The model's logits hold NaN/inf while sampling: there is no distribution to draw from
    (a `UserError`: diverged or corrupt weights, fixed by a lower `learning_rate` or a good
    checkpoint)."""


class TokenSampler:
    """Next-token sampling from raw logits, in transformers' processor order.

    Order (the same as `model.generate` with `do_sample=True`): sequence bias, repetition penalty,
    `min_new_tokens` (EOS forbidden), `suppress_tokens`, temperature, top-k, top-p, min-p; then
    one draw per row from the softmax of the processed scores (`draw`).

    The repetition penalty counts the real prompt tokens and the tokens sampled so far
    (transformers also counts left-padding tokens, which only differs for the pad token's logit).
    """

    def __init__(
        self,
        sampling: SamplingParams,
        *,
        eos_token_ids: Sequence[int],
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        vocab_size: int,
        draw: Callable[[Tensor], Tensor] = sample_multinomial,
    ) -> None:
        """Validate `sampling` for the lean decode loop and prepare its per-call state.

        Args:
            sampling: The sampling settings; `generation_kwargs` may hold only
                `LEAN_GENERATION_KWARGS`.
            eos_token_ids: Tokens that end a completion (forbidden before `min_new_tokens`).
            prompt_ids: `[N, P]` left-padded prompts, one row per completion.
            prompt_mask: `[N, P]` 1 = real prompt token.
            vocab_size: V, the width of the logits.
            draw: `[N, V]` probabilities -> `[N]` tokens (`sample_multinomial` or
                `sample_categorical`).

        Raises:
            ValueError: an unsupported `generation_kwargs` key or a malformed value.
        """
        unknown = sorted(set(sampling.generation_kwargs) - LEAN_GENERATION_KWARGS)
        if unknown:
            raise ValueError(
                f"generation_kwargs {unknown} are not supported by the lean decode loop "
                f"(supported: {sorted(LEAN_GENERATION_KWARGS)}); drop them or build the engine "
                f"with TransformersEngine(model, tokenizer, decode='hf') to sample with "
                f"model.generate."
            )
        self.sampling = sampling
        self.draw = draw
        self.eos = torch.as_tensor(list(eos_token_ids), dtype=torch.long, device=prompt_ids.device)
        self.min_new_tokens = int(sampling.generation_kwargs.get("min_new_tokens") or 0)
        self.bias = _dense_sequence_bias(
            sampling.generation_kwargs.get("sequence_bias"), vocab_size, prompt_ids.device
        )
        suppressed = sampling.generation_kwargs.get("suppress_tokens") or []
        self.suppressed = torch.as_tensor(list(suppressed), dtype=torch.long).to(prompt_ids.device)
        self.seen: Tensor | None = None  # [N, V] bool: token occurred (repetition penalty)
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.bool)
            seen = seen.to(prompt_ids.device)
            self.seen = seen.scatter_(1, prompt_ids, prompt_mask.bool())

    def scores(self, logits: Tensor, step: int, rows: Tensor | None = None) -> Tensor:
        """Processed scores `[n, V]` float32 from raw `logits` `[n, V]` at completion `step`, for
        all N rows (`rows` None) or for the rows `rows` (`[n]` indices) only."""
        s = self.sampling
        scores = logits.float()
        if self.bias is not None:
            scores = scores + self.bias
        if self.seen is not None:
            seen = self.seen if rows is None else self.seen[rows]
            scores = repetition_penalty(scores, seen, s.repetition_penalty)
        # Forbidden tokens are filled in place when `scores` is already a new tensor (a bf16
        # `logits` cast, or a processor's output): one [n, V] copy fewer, the same values.
        for forbidden in (self.eos if step < self.min_new_tokens else None, self.suppressed):
            if forbidden is not None and forbidden.numel():
                fill = scores.index_fill_ if scores is not logits else scores.index_fill
                scores = fill(1, forbidden, float("-inf"))
        if s.temperature != 1.0:
            scores = scores.div_(s.temperature) if scores is not logits else scores / s.temperature
        if s.top_k > 0:
            scores = top_k_filter(scores, s.top_k)
        if s.top_p < 1.0:
            scores = top_p_filter(scores, s.top_p)
        if s.min_p is not None:
            scores = min_p_filter(scores, s.min_p)
        return scores

    def sample(self, logits: Tensor, step: int, rows: Tensor | None = None) -> Tensor:
        """Draw one token per row: `[n]` long from raw `logits` `[n, V]`, for all N rows (`rows`
        None) or for the rows `rows` (`[n]` indices; the others' repetition state is untouched).

        A row is broken when its softmax holds a NaN, which is tested on the row's sum: a sum is
        NaN exactly when a term is NaN or the terms hold both +inf and -inf, and a softmax
        output is never infinite (each term `exp(x - max) / sum`, with `sum >= 1` from the
        maximum's own term, lies in [0, 1]; a NaN, +inf or all -inf row gives NaN throughout).
        So the sum is NaN exactly when the row holds a NaN, without a NaN test per element.

        Raises:
            NonFiniteLogitsError: a row's logits hold NaN or +inf (or every token was filtered
                out), so it has no distribution to draw from.
        """
        probs = torch.softmax(self.scores(logits, step, rows), dim=-1)  # [n, V]
        broken = torch.isnan(probs.sum(-1))  # [n]: the row holds a NaN (see below)
        if bool(broken.any()):
            raise NonFiniteLogitsError(
                f"sampling completion token {step}: the logits of {int(broken.sum())} of "
                f"{probs.shape[0]} rows are NaN or inf (or filter out every token), so no token "
                "can be drawn. The model's "
                "weights have probably diverged (learning_rate too high) or were loaded with "
                "NaN/inf values."
            )
        tokens = self.draw(probs)  # [n]
        self.observe(tokens, rows)
        return tokens

    def observe(self, tokens: Tensor, rows: Tensor | None = None) -> None:
        """Count `tokens` (`[n]`, one per row of `rows`, or of all N rows) as seen by the
        repetition penalty: sampled tokens, and tokens appended between turns."""
        if self.seen is None:
            return
        index = torch.arange(tokens.shape[0], device=tokens.device) if rows is None else rows
        self.seen[index, tokens] = True


def _dense_sequence_bias(bias: Any, vocab_size: int, device: torch.device) -> Tensor | None:
    """`{(token,): bias}` (single-token keys only) as a dense `[V]` float32 vector, or None."""
    if not bias:
        return None
    dense = torch.zeros(vocab_size, device=device)
    for key, value in dict(bias).items():
        tokens = (key,) if isinstance(key, int) else tuple(key)
        if len(tokens) != 1:
            raise ValueError(
                f"generation_kwargs['sequence_bias'] key {key!r}: the lean decode loop supports "
                f"single-token keys only; use TransformersEngine(..., decode='hf') for sequences."
            )
        dense[int(tokens[0])] += float(value)
    return dense


def repetition_penalty(scores: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, arXiv 1909.05858) on tokens already seen.

    A seen token's score is divided by `penalty` when positive and multiplied by it when negative,
    so `penalty > 1` always makes it less likely. `scores` `[N, V]`, `seen` `[N, V]` bool.
    """
    penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
    return torch.where(seen, penalized, scores)


def top_k_filter(scores: Tensor, k: int) -> Tensor:
    """Keep the `k` highest scores per row (ties with the k-th kept), the rest -inf. `[N, V]`."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]  # [N, 1]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2019, arXiv 1904.09751): keep the smallest set of tokens,
    by descending probability, whose mass reaches `p`; the most likely token always stays. `[N, V]`.

    Computed as transformers' `TopPLogitsWarper` does, so that both keep the same tokens, ties
    included: the scores are sorted ascending with `torch.sort` (not a stable sort), and a token is
    dropped when the mass of itself and every token sorted before it is `<= 1 - p`. Tokens with
    equal scores at the nucleus boundary (frequent with bf16 logits) are kept or dropped by their
    place in that sort, so a descending sort, a stable sort or another order of summation would
    keep a different subset; the float32 cumulative sum is also the same, so a boundary that
    falls on a rounding tie is decided the same way.
    """
    ascending, order = torch.sort(scores, dim=-1)  # [N, V] least likely first
    mass_up_to = torch.softmax(ascending, dim=-1).cumsum(dim=-1)  # [N, V] incl. the token itself
    drop_sorted = mass_up_to <= 1 - p
    drop_sorted[:, -1] = False  # the most likely token (last in the sort) always stays
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))


def min_p_filter(scores: Tensor, min_p: float) -> Tensor:
    """Min-p filter (Nguyen et al. 2024, arXiv 2407.01082): drop tokens whose probability is below
    `min_p` times the most likely token's. `[N, V]`."""
    probs = torch.softmax(scores, dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values  # [N, 1]
    return scores.masked_fill(probs < threshold, float("-inf"))
