"""Which rows of an optimizer step go into which micro-batch, and how each micro-batch's loss
enters the step's loss.

**The step's loss.** An optimizer step trains on `R` rows (`per_device_train_batch_size *
gradient_accumulation_steps`). Its loss is that of the plain path, which splits the rows into
consecutive micro-batches of `size = per_device_train_batch_size` rows, as TRL does. Every
micro-batch's `policy_loss` gets the same `num_items_in_batch`: the loss tokens of the step's `R`
rows, and the step's loss is

    step loss = sum over micro-batches m of  loss_weight_m * policy_loss(rows_m)

with one multiplier, `MicroBatch.loss_weight`, decided by what the loss type's aggregation divides
by (`LossSpec`, grpokit.core.losses):

- `sums_over_step` (dapo, cispo, vespo: divides by `num_items_in_batch`): the losses already sum
  to the step's loss; weight 1.
- `divides_by_rows` (grpo, sapo, luspo, dr_grpo: a mean over the n rows passed): the step's loss
  is the mean over the step's rows, so a micro-batch of n rows weighs `n / R` (`1 /
  gradient_accumulation_steps` for a full one, as TRL).
- `depends_on_grouping` (bnpo: divides by the micro-batch's own loss tokens): the mean of the
  plain micro-batches' losses, `size / R` each.

**The entropy bonus** (`entropy_coef`, grpokit.core.entropy) is a mean over each micro-batch's
tokens whatever the loss type, and TRL divides it by the number of micro-batches: each
micro-batch's bonus weighs `MicroBatch.entropy_weight = n / R` (`1 /
gradient_accumulation_steps`). It is a mean of per-micro-batch means, so it depends on which rows
share a micro-batch, and every row has a gradient through its entropies, so with the bonus on
neither speed-up below applies.

**Several processes.** With P processes the optimizer step is global: its rows are the P
processes' step rows, in rank order, and each process plans its own rows. The planner then needs
the loss tokens of the global step's plain micro-batches (`chunk_loss_tokens`, summed over the
processes by the caller): `num_items_in_batch` is the global step's loss tokens, a row-normalised
micro-batch weighs `n / (P * R)`, and a bnpo micro-batch divides by the tokens of the global plain
micro-batch (P * size rows) it belongs to. The weights (and the entropy bonus's, `n / (P * R)`)
are shares of the global step's loss; the trainer multiplies them by P because DDP averages the
processes' gradients.

TRL instead divides by the token count of the whole *generation* batch, counted before
`mask_truncated_completions`: the same when steps_per_generation == gradient_accumulation_steps
and nothing is masked, smaller steps otherwise. Counting the step's own tokens makes 1
micro-batch of 4 and 4 micro-batches of 1 give the same update.

**Two exact speed-ups.** They leave the update identical (up to float summation order) and save
forward/backward work:

1. **Skip rows whose advantage is exactly 0.** Every per-token objective is proportional to the
   advantage (PPO clip, CISPO, SAPO, VESPO), so such a row adds exactly 0 to the loss and its
   gradient, provided nothing else couples it to the loss: no KL term (`beta == 0`) and no
   top-entropy filter (its quantile is taken over the micro-batch's tokens, skipped rows
   included). The weights above keep the plain path's denominators: `num_items_in_batch` is
   unchanged; a row-normalised micro-batch of the n kept rows weighs `n / R`; bnpo's kept rows
   keep their plain micro-batch and weigh `size / R * kept tokens / micro-batch tokens`. A group
   whose G rewards are all equal has all-zero advantages (`frac_reward_zero_std`), so this skips
   whole groups.
2. **Bucket rows by completion length.** The micro-batch is trimmed to its longest row, so
   grouping rows of similar length removes padding columns. Allowed when the update does not
   depend on which rows share a micro-batch: every aggregation but bnpo's, and no top-entropy
   filter.

**Forwards that keep their activations** (`share_up_to`, `ActivationBound.keep_up_to`): a
micro-batch whose forward (each prompt counted once) is larger is split, under the same
condition, into forwards of whole prompts that each fit, weighted as above, so that it does not
recompute; where one prompt's rows alone do not fit, it stays one forward that recomputes
(sharing its prompts where the policy's checkpointed layers take the cache).

**A bound on the tokens of one forward pass** (`max_tokens`, `GRPOConfig.max_forward_tokens`).
Autograd keeps a forward's activations until its backward, so their memory grows with the rows x
tokens of one forward. Under the same condition as bucketing, a micro-batch larger than the bound
is split into near-equal parts, each forwarded and backpropagated on its own, with the weights
above (a part of n rows weighs `n / R` when the loss divides by rows): the same update, the
activations of one part at a time.

Logged per-micro-batch metrics (entropy, clip ratios) are then averaged over different groupings
and exclude skipped rows; the update is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from grpokit.core.losses import LossOptions
from grpokit.train.rollout import RolloutBatch


@dataclass(frozen=True)
class MicroBatch:
    """Rows of the rollout batch trained together, and how their loss enters the step's loss.

    Attributes:
        rows: `[n]` long indices into the rollout batch.
        num_items_in_batch: Loss tokens of the whole optimizer step (0-dim float, >= 1), the
            `num_items_in_batch` of this micro-batch's `policy_loss`.
        loss_weight: Multiply this micro-batch's `policy_loss` by it; the weighted losses sum to
            the step's loss (module docstring).
        entropy_weight: Multiply this micro-batch's entropy bonus by it: its share of the
            (global) step's rows (`1 / gradient_accumulation_steps` for a full micro-batch on one
            process), as TRL.
        padding: A zero-weight micro-batch that only keeps the processes in step (`pad_plan`).
    """

    rows: Tensor
    num_items_in_batch: Tensor
    loss_weight: float
    entropy_weight: float = 0.0
    padding: bool = False


def pad_plan(plan: list[MicroBatch], rows: range, count: int) -> list[MicroBatch]:
    """`plan` followed by zero-weight micro-batches of one row until it holds `count`.

    With several processes every one must run as many forward/backward passes as the others
    (their gradient synchronisation, and FSDP's weight gathering, are collective). A padding
    micro-batch adds exactly 0 to the gradient; its metrics are not logged.
    """
    if len(plan) >= count:
        return plan
    num_items = plan[0].num_items_in_batch if plan else torch.ones(())
    pad = MicroBatch(torch.arange(rows.start, rows.start + 1), num_items, 0.0, 0.0, padding=True)
    return plan + [pad] * (count - len(plan))


def chunk_loss_tokens(
    loss_mask: Tensor,
    rows: range,
    size: int,
    *,
    num_processes: int = 1,
    process_index: int = 0,
) -> Tensor:
    """Loss tokens of this process's rows in each plain micro-batch of the global step.

    The global step is the P processes' `rows` in rank order, split into C = `len(rows) / size`
    plain micro-batches of `P * size` rows; this process's local micro-batch j falls in global
    micro-batch `(process_index * C + j) // P`. Summed over the processes, the result is each
    global micro-batch's loss tokens (`plan_micro_batches(chunk_tokens=...)`).

    Args:
        loss_mask: `[N, T]` 1 = the token counts in the loss.
        rows: The optimizer step's rows on this process (a multiple of `size` long).
        size: `per_device_train_batch_size`.
        num_processes: P.
        process_index: This process's rank.

    Returns:
        `[C]` float64 token counts (0 for global micro-batches this process has no rows in).
    """
    index = torch.arange(rows.start, rows.stop)  # [R]
    num_chunks = len(index) // size
    out = torch.zeros(num_chunks, dtype=torch.float64)
    per_chunk = loss_mask[index].reshape(num_chunks, -1).sum(-1).double()  # [C] local chunks
    target = (process_index * num_chunks + torch.arange(num_chunks)) // num_processes
    return out.index_add_(0, target, per_chunk)


def plan_micro_batches(
    advantages: Tensor,
    completion_mask: Tensor,
    loss_mask: Tensor,
    rows: range,
    size: int,
    options: LossOptions,
    *,
    skip_zero_advantage: bool = True,
    bucket_by_length: bool = True,
    entropy_bonus: bool = False,
    chunk_tokens: Tensor | None = None,
    num_processes: int = 1,
    process_index: int = 0,
    max_tokens: int | None = None,
    prompt_mask: Tensor | None = None,
    prompt_groups: Tensor | None = None,
    share_up_to: int | None = None,
) -> list[MicroBatch]:
    """Split an optimizer step's `rows` into micro-batches, skipping and bucketing when exact.

    Args:
        advantages: `[N]` (or `[N, T]`) advantages of the whole rollout batch.
        completion_mask: `[N, T]` 1 up to and including EOS (the length a row is trimmed to).
        loss_mask: `[N, T]` 1 = the token counts in the loss.
        rows: The optimizer step's rows (a multiple of `size` long).
        size: `per_device_train_batch_size`.
        options: The loss options: the loss type's aggregation decides the weights; rows with
            zero advantage are skipped only when `beta == 0`; a top-entropy filter
            (`top_entropy_quantile < 1`) couples rows, so then nothing is skipped or moved.
        skip_zero_advantage: Allow speed-up 1 (module docstring).
        bucket_by_length: Allow speed-up 2.
        entropy_bonus: The loss has TRL's entropy bonus: every row counts and the plain
            micro-batches are kept (module docstring).
        chunk_tokens: `[C]` loss tokens of each plain micro-batch of the global step
            (`chunk_loss_tokens` summed over the processes); None = this process alone.
        num_processes: P, processes sharing the optimizer step.
        process_index: This process's rank.
        max_tokens: Split a micro-batch whose trimmed size (rows x (longest prompt + longest
            completion)) exceeds it into as few near-equal parts as fit, when the plain
            micro-batches need not be kept (module docstring). None = no limit.
        prompt_mask: `[N, P]` 1 = real prompt token (the prompt widths `max_tokens` counts);
            None = count completions only.
        prompt_groups: `[N]` the prompt of each row (`RolloutBatch.prompt_groups`) when the
            forward passes a prompt once for the rows sharing it
            (`model_completion_logprobs(share_prompts=True)`): `max_tokens` then counts each
            distinct prompt of a part once. None = every row forwards its own prompt.
        share_up_to: With `prompt_groups`, a micro-batch of more tokens (its prompts counted
            once; `ActivationBound.keep_up_to`: larger forwards recompute) is split into
            forwards of whole prompts that each fit (`_prompt_parts`), when each of its
            prompts' rows fit alone; otherwise it stays one forward, which bucketing counts
            with every row's prompt (it shares them only where the policy's checkpointed layers
            take the cache). None = no split.

    Returns:
        Micro-batches in training order; empty when every row of the step has zero advantage
        and may be skipped. Their weights are shares of the global step's loss.
    """
    spec = options.spec
    index = torch.arange(rows.start, rows.stop)  # [R]
    if chunk_tokens is None:
        chunk_tokens = chunk_loss_tokens(loss_mask, rows, size)
    num_items = chunk_tokens.sum().clamp(min=1).float()  # the global step's loss tokens
    global_rows = num_processes * len(index)
    coupled = options.top_entropy_quantile < 1.0 or entropy_bonus
    skip = skip_zero_advantage and options.beta == 0 and not coupled
    nonzero = (advantages[index] != 0).reshape(len(index), -1).any(-1)  # [R]
    if spec.depends_on_grouping or coupled:  # keep the plain micro-batches
        plan = []
        num_chunks = len(index) // size
        for j, start in enumerate(range(0, len(index), size)):
            chunk = index[start : start + size]
            kept = chunk[nonzero[start : start + size]] if skip else chunk
            if len(kept) == 0:
                continue
            weight = 1.0 if spec.sums_over_step else len(chunk) / global_rows * num_processes
            if spec.depends_on_grouping:  # the kept rows' share of the global chunk's tokens
                tokens = chunk_tokens[(process_index * num_chunks + j) // num_processes]
                if skip or num_processes > 1:
                    kept_tokens = loss_mask[kept].sum().clamp(min=1).float()
                    weight *= float(kept_tokens / tokens.clamp(min=1).float())
            elif not spec.sums_over_step:
                weight /= num_processes
            plan.append(MicroBatch(kept, num_items, weight, len(kept) / global_rows))
        return plan
    kept = index[nonzero] if skip else index
    completion_lengths = completion_mask.sum(-1)  # [N]
    prompt_lengths = None if prompt_mask is None else prompt_mask.sum(-1)  # [N]
    if bucket_by_length:
        kept = _bucketed(kept, size, completion_lengths, prompt_lengths, prompt_groups, share_up_to)
    plan = []
    for start in range(0, len(kept), size):
        chunk = kept[start : start + size]
        parts = split_by_tokens(
            chunk, max_tokens, completion_lengths, prompt_lengths, prompt_groups
        )
        if share_up_to is not None and prompt_groups is not None and prompt_lengths is not None:
            lengths = (completion_lengths, prompt_lengths, prompt_groups)
            parts = [p for part in parts for p in _prompt_parts(part, share_up_to, *lengths)]
        for part in parts:
            weight = len(part) / global_rows if spec.divides_by_rows else 1.0
            plan.append(MicroBatch(part, num_items, weight, len(part) / global_rows))
    return plan


def split_by_tokens(
    rows: Tensor,
    max_tokens: int | None,
    completion_lengths: Tensor,
    prompt_lengths: Tensor | None = None,
    prompt_groups: Tensor | None = None,
) -> list[Tensor]:
    """`rows` (`[n]` indices) in the fewest near-equal consecutive parts of at most `max_tokens`
    tokens each, counting a part as the trimmed forward holds it: its rows x (the longest prompt
    + the longest completion among `rows`). A row longer than `max_tokens` forms a part alone.

    With `prompt_groups` a part's prompts are forwarded once each, so a part counts its distinct
    prompts x its longest prompt + its rows x its longest completion.

    Args:
        rows: `[n]` indices into the rollout batch.
        max_tokens: The limit; None = no limit (`[rows]`).
        completion_lengths: `[N]` completion tokens of each row.
        prompt_lengths: `[N]` prompt tokens of each row; None = count completions only.
        prompt_groups: `[N]` the prompt of each row (rows sharing a prompt share the number);
            None = every row forwards its own prompt.
    """
    if max_tokens is None or len(rows) <= 1:
        return [rows]
    if prompt_groups is not None and prompt_lengths is not None:
        return _split_shared_prompts(
            rows, max_tokens, completion_lengths, prompt_lengths, prompt_groups
        )
    width = int(completion_lengths[rows].max())
    if prompt_lengths is not None:
        width += int(prompt_lengths[rows].max())
    rows_per_part = max(1, max_tokens // max(1, width))
    parts = -(-len(rows) // rows_per_part)  # ceil
    return list(torch.tensor_split(rows, parts))


def _bucketed(
    rows: Tensor,
    size: int,
    completion_lengths: Tensor,
    prompt_lengths: Tensor | None,
    prompt_groups: Tensor | None,
    share_up_to: int | None = None,
) -> Tensor:
    """`rows` sorted by completion length (speed-up 2). When prompts are forwarded once per
    micro-batch (`prompt_groups`), sorting by length splits a prompt's rows over micro-batches,
    so the rows may instead stay with their prompt (sorted by length within it): whichever
    order forwards fewer tokens in micro-batches of `size` rows (`_forward_tokens`; a
    micro-batch above `share_up_to` counted with every row's prompt)."""
    by_length = rows[torch.argsort(completion_lengths[rows], stable=True)]
    if prompt_groups is None or prompt_lengths is None:
        return by_length
    by_prompt = by_length[torch.argsort(prompt_groups[by_length], stable=True)]

    def tokens(order: Tensor) -> int:
        chunks = (order[start : start + size] for start in range(0, len(order), size))
        return sum(
            _forward_tokens(chunk, completion_lengths, prompt_lengths, prompt_groups, share_up_to)
            for chunk in chunks
        )

    return by_prompt if tokens(by_prompt) < tokens(by_length) else by_length


def _forward_tokens(
    part: Tensor,
    completion_lengths: Tensor,
    prompt_lengths: Tensor,
    prompt_groups: Tensor,
    share_up_to: int | None = None,
) -> int:
    """Tokens one forward of `part` holds with each distinct prompt forwarded once: distinct
    prompts x the longest prompt + rows x the longest completion. Above `share_up_to`, those of
    the forwards of whole prompts it is split into (`_prompt_parts`), or, where a prompt's rows
    do not fit alone, of one forward counted with every row's prompt: rows x (the longest
    prompt + the longest completion), an upper bound (whether that forward shares its prompts
    depends on the policy and the engine: `GRPOTrainer.micro_batch_loss`)."""
    prompts = int(prompt_groups[part].unique().numel())
    longest_prompt = int(prompt_lengths[part].max())
    longest_completion = int(completion_lengths[part].max())
    shared = prompts * longest_prompt + len(part) * longest_completion
    if share_up_to is not None and shared > share_up_to:
        lengths = (completion_lengths, prompt_lengths, prompt_groups)
        pieces = _prompt_parts(part, share_up_to, *lengths)
        if len(pieces) > 1:
            return sum(_forward_tokens(piece, *lengths) for piece in pieces)
        return len(part) * (longest_prompt + longest_completion)
    return shared


def _prompt_parts(
    part: Tensor,
    limit: int,
    completion_lengths: Tensor,
    prompt_lengths: Tensor,
    prompt_groups: Tensor,
) -> list[Tensor]:
    """`part` as forwards of whole prompts (each prompt's rows together, prompts in order of
    their first row, packed greedily) of at most `limit` tokens each, counting each prompt
    once (`_forward_tokens`): each keeps its activations and shares its prompts. `[part]` when
    it fits whole, or when some prompt's rows alone exceed `limit` (it then recomputes)."""
    lengths = (completion_lengths, prompt_lengths, prompt_groups)
    if _forward_tokens(part, *lengths) <= limit:
        return [part]
    groups = prompt_groups[part]
    first = {int(g): None for g in groups.tolist()}  # each prompt once, in order of first row
    pieces: list[Tensor] = []
    current = part[:0]
    for group in first:
        rows = part[groups == group]
        if _forward_tokens(rows, *lengths) > limit:
            return [part]
        joined = torch.cat([current, rows])
        if len(current) and _forward_tokens(joined, *lengths) > limit:
            pieces.append(current)
            current = rows
        else:
            current = joined
    return [*pieces, current]


def _split_shared_prompts(
    rows: Tensor,
    max_tokens: int,
    completion_lengths: Tensor,
    prompt_lengths: Tensor,
    prompt_groups: Tensor,
) -> list[Tensor]:
    """`split_by_tokens` counting each distinct prompt of a part once: the fewest near-equal
    consecutive parts that all fit, down to one row per part."""

    for count in range(1, len(rows) + 1):
        parts = list(torch.tensor_split(rows, count))
        if all(
            _forward_tokens(part, completion_lengths, prompt_lengths, prompt_groups) <= max_tokens
            for part in parts
        ):
            return parts
    return parts


def select_rows(batch: RolloutBatch, rows: Tensor) -> RolloutBatch:
    """The rollout batch restricted to `rows` (`[n]` long indices), in that order."""

    def take(value: Tensor | None) -> Tensor | None:
        return None if value is None else value[rows]

    return RolloutBatch(
        prompt_ids=batch.prompt_ids[rows],
        prompt_mask=batch.prompt_mask[rows],
        completion_ids=batch.completion_ids[rows],
        completion_mask=batch.completion_mask[rows],
        loss_mask=batch.loss_mask[rows],
        advantages=batch.advantages[rows],
        old_logprobs=take(batch.old_logprobs),
        ref_logprobs=take(batch.ref_logprobs),
        sampling_logprobs=take(batch.sampling_logprobs),
    )
