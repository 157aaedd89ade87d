"""The text side of a rollout: prompt rows in, token ids out, completions decoded back.

Functions shared by training and evaluation in `GRPOTrainer`: tokenizing prompts under
`max_prompt_length`, repeating each prompt and its columns for its G completions, decoding the
completions into the prompts' format (plain text or chat messages), and the in-training
evaluation that generates on `eval_dataset` and scores it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from grpokit.core.advantages import group_advantages
from grpokit.data.prompts import apply_prompt_length_policy, format_completions, render_prompts
from grpokit.engines.base import GenerationEngine, GenerationOutput, SamplingParams
from grpokit.rewards.scoring import compute_rewards
from grpokit.train import checkpoint as ckpt
from grpokit.train.config import GRPOConfig
from grpokit.train.loggers import name_reward_metrics
from grpokit.train.prompt_sampler import PromptSampler

logger = logging.getLogger("grpokit")


def tokenize_prompts(
    rows: list[dict[str, Any]], tokenizer: Any, args: GRPOConfig
) -> tuple[list[dict[str, Any]], list[list[int]], int]:
    """Render (chat template for conversations) and tokenize prompts, enforcing `max_prompt_length`.

    Args:
        rows: Dataset rows, each with a `prompt`.
        tokenizer: The policy's tokenizer.
        args: The config (`chat_template_kwargs`, `max_prompt_length`, `prompt_length_policy`).

    Returns:
        `(kept_rows, kept_ids, over_length)`: the rows kept (all of them unless the policy is
        "skip"), their unpadded token ids, and how many prompts were skipped or truncated.

    Raises:
        KeyError: a row without a `prompt` column.
    """
    for row in rows:
        if "prompt" not in row:
            raise KeyError(
                f"The dataset has no 'prompt' column (columns: {sorted(row)}); rename the "
                "column holding the prompts to 'prompt'."
            )
    texts = render_prompts(
        [row["prompt"] for row in rows], tokenizer, chat_template_kwargs=args.chat_template_kwargs
    )
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kept_ids, kept = apply_prompt_length_policy(
        ids, args.max_prompt_length, args.prompt_length_policy
    )
    if args.prompt_length_policy == "skip":
        over_length = len(rows) - len(kept)
    else:
        over_length = sum(len(a) != len(b) for a, b in zip(ids, kept_ids, strict=True))
    return [rows[i] for i in kept], kept_ids, over_length


def warn_over_length(over_length: int, total_so_far: int, args: GRPOConfig) -> None:
    """Log a warning for prompts skipped or truncated by `max_prompt_length` (none: silent)."""
    if not over_length:
        return
    action = "skipped" if args.prompt_length_policy == "skip" else "truncated from the left"
    logger.warning(
        "%d prompt(s) longer than max_prompt_length=%d tokens %s (%d so far).",
        over_length,
        args.max_prompt_length,
        action,
        total_so_far,
    )


def repeat_per_completion(
    rows: list[dict[str, Any]], num_generations: int, *, with_columns: bool = True
) -> tuple[list[Any], dict[str, list[Any]]]:
    """`(prompts, columns)` with every row repeated `num_generations` times, aligned with the N =
    B*G completions; `columns` holds every column but `prompt` (none when `with_columns` is
    False)."""
    g = num_generations
    prompts = [row["prompt"] for row in rows for _ in range(g)]
    columns: dict[str, list[Any]] = {}
    if with_columns and rows:
        for key in rows[0]:
            if key != "prompt":
                columns[key] = [row.get(key) for row in rows for _ in range(g)]
    return prompts, columns


def decode_completions(
    tokenizer: Any, prompts: list[Any], gen: GenerationOutput
) -> tuple[list[Any], list[list[int]]]:
    """Decode completions into the prompts' format, and per-row token-id lists (up to EOS).

    Returns:
        `(completions, completion_ids)`: N strings (or assistant-message lists for chat prompts)
        and N token-id lists of each completion's `completion_mask` length.
    """
    lengths = gen.completion_mask.sum(1).tolist()  # [N]
    id_lists = [row[:n] for row, n in zip(gen.completion_ids.tolist(), lengths, strict=True)]
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    return format_completions(prompts, texts), id_lists


@torch.no_grad()
def evaluate_rewards(
    dataset: Any,
    *,
    engine: GenerationEngine,
    tokenizer: Any,
    reward_funcs: list[Any],
    sampling: SamplingParams,
    args: GRPOConfig,
    trainer_state: Any,
) -> dict[str, float]:
    """Sample `num_generations_eval` completions for every prompt of `dataset` and score them.

    Prompts are taken in the dataset's order, `per_device_eval_batch_size` completions per
    generation call. Every random generator is saved before and restored after, so evaluating
    does not change the training run. Prompts over `max_prompt_length` follow
    `prompt_length_policy` (with a warning) but are not added to the training counter.

    Returns:
        `eval_`-prefixed reward metrics (`eval_reward`, `eval_reward_std`,
        `eval_rewards/<name>/mean|std`, `eval_frac_reward_zero_std`) and
        `eval_completions/mean_length`.

    Raises:
        ValueError: the dataset yields no prompt (empty, or every prompt skipped by length).
    """
    g = args.num_generations_eval or args.num_generations
    per_call = max(1, args.per_device_eval_batch_size // g)
    rows = list(PromptSampler(dataset, seed=0, shuffle=False).iterate_once())
    rewards, lengths = [], []
    rng = ckpt.rng_state()
    try:
        for start in range(0, len(rows), per_call):
            chunk_rows, ids, over_length = tokenize_prompts(
                rows[start : start + per_call], tokenizer, args
            )
            warn_over_length(over_length, over_length, args)
            if not chunk_rows:
                continue
            gen = engine.generate(
                ids, num_generations=g, max_new_tokens=args.max_completion_length, sampling=sampling
            )
            prompts, columns = repeat_per_completion(chunk_rows, g)
            completions, id_lists = decode_completions(tokenizer, prompts, gen)
            rewards.append(
                compute_rewards(
                    reward_funcs,
                    prompts=prompts,
                    completions=completions,
                    completion_ids=id_lists,
                    columns=columns,
                    trainer_state=trainer_state,
                )
            )  # [n, K]
            lengths.append(gen.completion_mask.sum(1).float())  # [n]
    finally:
        ckpt.set_rng_state(rng)
    if not rewards:
        raise ValueError("eval_dataset produced no prompts (empty, or all skipped by length).")
    adv = group_advantages(
        torch.cat(rewards),
        g,
        reward_weights=args.reward_weights,
        scale_rewards=str(args.scale_rewards),
        multi_objective_aggregation=args.multi_objective_aggregation,
    )
    names = [fn.name for fn in reward_funcs]
    metrics = {f"eval_{k}": v for k, v in name_reward_metrics(adv.metrics, names).items()}
    metrics["eval_completions/mean_length"] = torch.cat(lengths).mean().item()
    return metrics


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
