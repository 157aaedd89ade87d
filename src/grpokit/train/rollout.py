"""One generate-and-score path, shared by training and evaluation.

`RolloutPipeline` turns dataset rows into scored completions in four steps, each also callable on
its own (the trainer calls them one by one, to time them and to draw more prompts when some are
skipped by length):

1. `tokenize`: render the prompts (chat template for conversations), tokenize them and apply
   `prompt_length_policy` to prompts over `max_prompt_length` or over what the model's context
   leaves beside the completion;
2. `generate`: sample G completions per prompt with any `GenerationEngine`;
3. `decode`: repeat each prompt and its columns G times and decode the completions into the
   prompts' format (plain text or assistant messages);
4. `score`: call every reward function, `[N, K]` rewards.

`RolloutPipeline.run` chains the four steps: the trainer's in-training evaluation
(`evaluate_rewards`) and held-out evaluation (`grpokit.app.evaluation.evaluate`) use it. This
module also holds `RolloutBatch`, the training batch built from a rollout.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from grpokit.core.advantages import group_advantages
from grpokit.core.logprobs import prompt_numbers
from grpokit.data.prompts import (
    apply_prompt_length_policy,
    format_completions,
    prompt_token_limit,
    render_prompts,
)
from grpokit.engines.base import GenerationEngine, GenerationOutput, SamplingParams
from grpokit.engines.multi_turn import generate_with_turns
from grpokit.errors import DataError, MissingColumnError
from grpokit.rewards.scoring import RewardLog, compute_rewards
from grpokit.tools.environments import Environments, append_observation, rollout_output
from grpokit.tools.turns import ToolCalling
from grpokit.train import checkpoint as ckpt
from grpokit.train.config import GRPOConfig
from grpokit.train.distributed import World
from grpokit.train.loggers import name_reward_metrics
from grpokit.train.prompt_sampler import PromptSampler

logger = logging.getLogger("grpokit")


@dataclass
class PromptBatch:
    """B prompts ready for the engine.

    Attributes:
        rows: The B dataset rows kept (all the rows given, unless the length policy is "skip").
        prompt_ids: B unpadded token-id lists, after the length policy; with environments N =
            B*G lists (each rollout's prompt holds its environment's `reset` text).
        over_length: How many of the rows given were skipped or truncated by `max_prompt_length`.
        environments: With environments, the N rollouts' instances (reset); else empty.
        prompts: With environments, the N prompts as the model sees them (each with its
            environment's `reset` text appended), which the reward functions receive as
            `prompts`, as in TRL; else empty (the rows' prompts, repeated G times, are used).
    """

    rows: list[dict[str, Any]]
    prompt_ids: list[list[int]]
    over_length: int = 0
    environments: list[Any] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)


@dataclass
class ScoredRollout:
    """The `N = B*G` completions of B prompts, decoded and scored; the G completions of a prompt
    are consecutive rows. Empty (N = 0) when every prompt was skipped by length.

    Attributes:
        prompts: N prompts (each row's `prompt` repeated G times), plain or conversational.
        columns: Every other column of the rows, N values each (empty without `keep_columns`).
        completions: N completions in the prompts' format.
        completion_ids: N token-id lists, up to and including EOS (no padding).
        rewards: `[N, K]` float32, NaN = the reward function does not apply.
        gen: The engine's output (`[N, P]` prompt and `[N, T]` completion tensors).
        over_length: Prompts skipped or truncated by `max_prompt_length`.
        extra: The columns reward functions logged with `log_extra`, N values each.
    """

    prompts: list[Any]
    columns: dict[str, list[Any]]
    completions: list[Any]
    completion_ids: list[list[int]]
    rewards: Tensor
    gen: GenerationOutput
    over_length: int = 0
    extra: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def lengths(self) -> Tensor:
        """`[N]` float32 completion lengths in tokens the model wrote (up to and including
        EOS; tool replies not counted)."""
        return self.gen.model_mask.sum(1).float()

    def select_groups(self, groups: Tensor, num_generations: int) -> ScoredRollout:
        """The rollout restricted to the prompt groups `groups` (`[b]` long indices), in that
        order: `b * G` rows."""
        g = num_generations
        rows = (groups[:, None] * g + torch.arange(g)).reshape(-1)  # [b*G]
        index = rows.tolist()
        gen = self.gen

        def take(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[rows]

        return ScoredRollout(
            prompts=[self.prompts[i] for i in index],
            columns={k: [v[i] for i in index] for k, v in self.columns.items()},
            completions=[self.completions[i] for i in index],
            completion_ids=[self.completion_ids[i] for i in index],
            rewards=self.rewards[rows],
            gen=GenerationOutput(
                prompt_ids=gen.prompt_ids[rows],
                prompt_mask=gen.prompt_mask[rows],
                completion_ids=gen.completion_ids[rows],
                completion_mask=gen.completion_mask[rows],
                is_truncated=gen.is_truncated[rows],
                sampling_logprobs=take(gen.sampling_logprobs),
                tool_mask=take(gen.tool_mask),
                turns=_join_turns([(gen.turns, index)]),
                extra_fields={k: [v[i] for i in index] for k, v in gen.extra_fields.items()},
            ),
            over_length=self.over_length,
            extra={k: [v[i] for i in index] for k, v in self.extra.items()},
        )


# The per-row records of a multi-turn batch (`tools.turns.ToolTurns`) that decoding and the tool
# metrics read after generation.
_TURN_ROWS = ("row_tools", "replies", "calls", "errors", "dropped")


def _join_turns(parts: list[tuple[Any, Sequence[int]]]) -> Any:
    """The multi-turn record of the rows `(turns, rows)` of each part, in order (None when the
    rollouts are single-turn)."""
    if any(turns is None for turns, _ in parts):
        return None
    joined = copy.copy(parts[0][0])
    for name in _TURN_ROWS:
        setattr(joined, name, [getattr(turns, name)[i] for turns, rows in parts for i in rows])
    return joined


def concatenate_rollouts(parts: Sequence[ScoredRollout], pad_token_id: int) -> ScoredRollout:
    """One rollout holding the rows of `parts` in order: prompts re-left-padded and completions
    re-right-padded with `pad_token_id` to the widest part (masks 0 there); `over_length` summed.

    Raises:
        ValueError: no parts, or parts whose reward columns differ.
    """
    if not parts:
        raise ValueError("concatenate_rollouts needs at least one rollout.")
    gens = [p.gen for p in parts]
    p_width = max(g.prompt_ids.shape[1] for g in gens)
    t_width = max(g.completion_ids.shape[1] for g in gens)

    def pad(t: Tensor, width: int, value: float, *, left: bool) -> Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        fill = torch.full((t.shape[0], extra), value, dtype=t.dtype)
        return torch.cat([fill, t] if left else [t, fill], dim=1)

    def joined(values: list[Tensor | None], width: int) -> Tensor | None:
        if any(v is None for v in values):
            return None
        return torch.cat([pad(v, width, 0, left=False) for v in values if v is not None])

    gen = GenerationOutput(
        prompt_ids=torch.cat([pad(g.prompt_ids, p_width, pad_token_id, left=True) for g in gens]),
        prompt_mask=torch.cat([pad(g.prompt_mask, p_width, 0, left=True) for g in gens]),
        completion_ids=torch.cat(
            [pad(g.completion_ids, t_width, pad_token_id, left=False) for g in gens]
        ),
        completion_mask=torch.cat([pad(g.completion_mask, t_width, 0, left=False) for g in gens]),
        is_truncated=torch.cat([g.is_truncated for g in gens]),
        sampling_logprobs=joined([g.sampling_logprobs for g in gens], t_width),
        tool_mask=joined([g.tool_mask for g in gens], t_width),
        turns=_join_turns([(g.turns, range(g.completion_ids.shape[0])) for g in gens]),
        extra_fields={
            k: [x for g in gens for x in g.extra_fields[k]] for k in gens[0].extra_fields
        },
    )
    if len({p.rewards.shape[1] for p in parts}) != 1:
        raise ValueError("rollouts to concatenate must have the same reward functions.")
    return ScoredRollout(
        prompts=[x for p in parts for x in p.prompts],
        columns={k: [x for p in parts for x in p.columns[k]] for k in parts[0].columns},
        completions=[x for p in parts for x in p.completions],
        completion_ids=[x for p in parts for x in p.completion_ids],
        rewards=torch.cat([p.rewards for p in parts]),
        gen=gen,
        over_length=sum(p.over_length for p in parts),
        extra={  # a column some part did not log is None there (as TRL fills it)
            k: [x for p in parts for x in p.extra.get(k, [None] * len(p.prompts))]
            for k in dict.fromkeys(k for p in parts for k in p.extra)
        },
    )


@dataclass
class RolloutPipeline:
    """How prompts become scored completions: the settings both training and evaluation share.

    Attributes:
        engine: Samples the completions (`TransformersEngine`, `VLLMEngine`, or any other).
        tokenizer: The policy's tokenizer (chat template, decoding).
        reward_funcs: K reward functions (from `rewards.scoring.build_reward_functions`).
        sampling: Sampling parameters passed to the engine.
        num_generations: G, completions per prompt.
        max_new_tokens: Longest completion in tokens.
        max_prompt_length: Longest prompt in tokens; None = no limit.
        prompt_length_policy: "truncate_left" (keep a long prompt's last tokens) or "skip".
        chat_template_kwargs: Extra arguments for the chat template.
        keep_columns: Pass the rows' other columns to the reward functions.
        context_length: The model's longest sequence, prompt plus completion
            (`engines.models.context_length`); a prompt may then have at most
            `context_length - max_new_tokens` tokens. None = unknown, no limit from the model.
        reward_timeout: Seconds one reward-function call may take; None = no limit.
        reward_timeout_policy: A timed-out call is an error ("error") or NaN rewards ("nan").
        tool_calling: Tools the model may call between turns (`tools.turns.ToolCalling`): their
            schemas go into the chat template and rollouts are multi-turn
            (`engines.multi_turn`); None = single-turn.
        environments: One environment per rollout (`tools.environments`): reset with the row,
            its text appended to the prompt, its methods tools (needs `tool_calling`).
        rollout_func: Replaces generation: B raw prompts in, TRL's dict out
            (`tools.environments.rollout_output`).

    Raises:
        ConfigError: `max_new_tokens` leaves no room for a prompt in `context_length`.
    """

    engine: GenerationEngine
    tokenizer: Any
    reward_funcs: Sequence[Any]
    sampling: SamplingParams
    num_generations: int
    max_new_tokens: int
    max_prompt_length: int | None = None
    prompt_length_policy: str = "truncate_left"
    chat_template_kwargs: dict[str, Any] | None = None
    keep_columns: bool = True
    context_length: int | None = None
    reward_timeout: float | None = None
    reward_timeout_policy: str = "error"
    tool_calling: ToolCalling | None = None
    environments: Environments | None = None
    rollout_func: Callable[[list[Any]], Any] | None = None

    def __post_init__(self) -> None:
        self.prompt_limit = prompt_token_limit(
            self.max_prompt_length, self.context_length, self.max_new_tokens
        )
        """Longest prompt in tokens (`data.prompts.prompt_token_limit`); None = no limit."""

    @classmethod
    def from_config(
        cls,
        args: GRPOConfig,
        *,
        evaluation: bool = False,
        engine: GenerationEngine,
        tokenizer: Any,
        reward_funcs: Sequence[Any],
        sampling: SamplingParams,
        context_length: int | None = None,
        tool_calling: ToolCalling | None = None,
        environments: Environments | None = None,
        rollout_func: Callable[[list[Any]], Any] | None = None,
    ) -> RolloutPipeline:
        """The pipeline of a `GRPOConfig`, for training or for evaluation.

        From `args`: G (`num_generations`, or `resolved_num_generations_eval` in evaluation),
        whether the rows' other columns reach the reward functions (not under
        `remove_unused_columns` in training; always in evaluation), `max_completion_length`, the
        prompt-length policy, the chat-template arguments and the reward timeout.
        `context_length` is the policy's; `tool_calling`, `environments` and `rollout_func` are
        the trainer's (see the attributes).
        """
        if evaluation:
            num_generations, keep_columns = args.resolved_num_generations_eval, True
        else:
            num_generations, keep_columns = args.num_generations, not args.remove_unused_columns
        return cls(
            engine=engine,
            tokenizer=tokenizer,
            reward_funcs=reward_funcs,
            sampling=sampling,
            num_generations=num_generations,
            max_new_tokens=args.max_completion_length,
            max_prompt_length=args.max_prompt_length,
            prompt_length_policy=args.prompt_length_policy,
            chat_template_kwargs=args.chat_template_kwargs,
            keep_columns=keep_columns,
            context_length=context_length,
            reward_timeout=args.reward_timeout,
            reward_timeout_policy=args.reward_timeout_policy,
            tool_calling=tool_calling,
            environments=environments,
            rollout_func=rollout_func,
        )

    # ---- the four steps -------------------------------------------------------------------------
    def tokenize(self, rows: list[dict[str, Any]], *, environments_taken: int = 0) -> PromptBatch:
        """Render and tokenize the rows' prompts, applying the prompt-length policy to prompts
        longer than `prompt_limit`.

        Args:
            rows: Dataset rows.
            environments_taken: With environments, how many of the pool's instances earlier
                calls for the same batch took (`len(rows) * G` each, skipped rows included);
                these rows' rollouts get the next ones, so no instance serves two rollouts of a
                batch.

        Raises:
            MissingColumnError: a row without a `prompt` column (a `KeyError`).
        """
        for row in rows:
            if "prompt" not in row:
                raise MissingColumnError(
                    f"The dataset has no 'prompt' column (columns: {sorted(row)}); rename the "
                    "column holding the prompts to 'prompt'."
                )
        if self.environments is not None:
            return self._tokenize_with_environments(rows, environments_taken)
        texts = render_prompts(
            [row["prompt"] for row in rows],
            self.tokenizer,
            chat_template_kwargs=self.chat_template_kwargs,
            tools=self.tool_calling.schemas() if self.tool_calling else None,
        )
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        kept_ids, kept = apply_prompt_length_policy(
            ids, self.prompt_limit, self.prompt_length_policy
        )
        if self.prompt_length_policy == "skip":
            over_length = len(rows) - len(kept)
        else:
            over_length = sum(len(a) != len(b) for a, b in zip(ids, kept_ids, strict=True))
        return PromptBatch([rows[i] for i in kept], kept_ids, over_length)

    def _tokenize_with_environments(self, rows: list[dict[str, Any]], taken: int) -> PromptBatch:
        """One environment per rollout, reset with its row; N prompts, each with its
        environment's text. A row is skipped (policy "skip") when any of its G prompts is long."""
        assert self.environments is not None
        g = self.num_generations
        envs = self.environments.take(len(rows) * g, start=taken)
        prompts = [
            append_observation(row["prompt"], envs[i * g + k].reset(**row))
            for i, row in enumerate(rows)
            for k in range(g)
        ]
        tools = self.tool_calling.schemas() if self.tool_calling else []
        texts = render_prompts(
            prompts,
            self.tokenizer,
            chat_template_kwargs=self.chat_template_kwargs,
            tools=tools + list(self.environments.schemas.values()) or None,
        )
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        kept_ids, kept = apply_prompt_length_policy(
            ids, self.prompt_limit, self.prompt_length_policy
        )
        by_index = dict(zip(kept, kept_ids, strict=True))
        keep = [i for i in range(len(rows)) if all(i * g + k in by_index for k in range(g))]
        over_length = sum(len(ids[j]) != len(by_index.get(j, [])) for j in range(len(ids)))
        kept_rollouts = [i * g + k for i in keep for k in range(g)]
        return PromptBatch(
            [rows[i] for i in keep],
            [by_index[j] for j in kept_rollouts],
            over_length,
            [envs[j] for j in kept_rollouts],
            [prompts[j] for j in kept_rollouts],
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        *,
        rows: list[dict[str, Any]] | None = None,
        environments: list[Any] | None = None,
    ) -> GenerationOutput:
        """Sample G completions for each of the B prompts: `N = B*G` rows, prompt-major.

        With `tool_calling`, multi-turn: the output has a `tool_mask` and its `turns` record.
        With environments, `prompt_ids` and `environments` hold one entry per rollout (N). With
        a `rollout_func`, it is called on the B `rows`' prompts instead of the engine.
        """
        if self.rollout_func is not None:
            return self._custom_rollout(rows)
        g = 1 if environments else self.num_generations
        if self.tool_calling is None:
            return self.engine.generate(
                prompt_ids,
                num_generations=g,
                max_new_tokens=self.max_new_tokens,
                sampling=self.sampling,
            )
        n = len(prompt_ids) * g
        row_tools = [self.tool_calling.tools] * n
        if environments and self.environments is not None:
            row_tools = [
                {**self.tool_calling.tools, **self.environments.tools_of(env)}
                for env in environments
            ]
        turns = self.tool_calling.turns(self.tokenizer, row_tools, self.chat_template_kwargs)
        try:
            gen = generate_with_turns(
                self.engine,
                prompt_ids,
                num_generations=g,
                max_new_tokens=self.max_new_tokens,
                sampling=self.sampling,
                turns=turns,
            )
        finally:
            turns.close()
        gen.turns = turns
        return gen

    def _custom_rollout(self, rows: list[dict[str, Any]] | None) -> GenerationOutput:
        if rows is None or self.rollout_func is None:
            raise ValueError("a rollout_func needs the batch's rows: generate(..., rows=rows).")
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        gen, extra = rollout_output(
            self.rollout_func([row["prompt"] for row in rows]),
            expected=len(rows) * self.num_generations,
            pad_token_id=int(pad),
            eos_token_ids=[tok.eos_token_id] if tok.eos_token_id is not None else [],
        )
        gen.extra_fields = extra
        return gen

    def repeat(self, rows: list[dict[str, Any]]) -> tuple[list[Any], dict[str, list[Any]]]:
        """`(prompts, columns)`: every row repeated G times, aligned with the N completions;
        `columns` holds every column but `prompt` (none without `keep_columns`)."""
        return repeat_per_completion(rows, self.num_generations, with_columns=self.keep_columns)

    def decode(
        self, prompts: list[Any], gen: GenerationOutput
    ) -> tuple[list[Any], list[list[int]]]:
        """`(completions, completion_ids)`: N completions in the format of the N `prompts`, and N
        token-id lists of each completion's `completion_mask` length."""
        return decode_completions(self.tokenizer, prompts, gen)

    def score(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        columns: dict[str, list[Any]],
        *,
        trainer_state: Any = None,
        reward_log: RewardLog | None = None,
    ) -> Tensor:
        """`[N, K]` rewards from every reward function (NaN = does not apply); what they log
        with `log_metric` / `log_extra` goes to `reward_log`."""
        return compute_rewards(
            self.reward_funcs,
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            columns=columns,
            trainer_state=trainer_state,
            reward_log=reward_log,
            timeout=self.reward_timeout,
            timeout_policy=self.reward_timeout_policy,
        )

    # ---- the whole path -------------------------------------------------------------------------
    def run(
        self,
        rows: list[dict[str, Any]],
        *,
        trainer_state: Any = None,
        reward_log: RewardLog | None = None,
    ) -> ScoredRollout:
        """Tokenize, generate, decode and score: G scored completions for each row kept.

        Args:
            rows: B dataset rows, each with a `prompt`.
            trainer_state: Passed to the reward functions as `trainer_state`.
            reward_log: Receives what the reward functions log (`log_metric`, `log_extra`).

        Returns:
            The scored rollout; with no row kept (all skipped by length) an empty one (N = 0),
            whose `over_length` still counts them.
        """
        batch = self.tokenize(rows)
        if not batch.rows:
            return self.empty(batch.over_length)
        gen = self.generate(batch.prompt_ids, rows=batch.rows, environments=batch.environments)
        prompts, columns = self.repeat(batch.rows)
        prompts = batch.prompts or prompts  # with environments, as the model saw them
        columns = reward_columns(columns, gen, batch.environments)
        completions, completion_ids = self.decode(prompts, gen)
        rewards = self.score(
            prompts,
            completions,
            completion_ids,
            columns,
            trainer_state=trainer_state,
            reward_log=reward_log,
        )  # [N, K]
        extra = dict(reward_log.extra) if reward_log is not None else {}
        return ScoredRollout(
            prompts, columns, completions, completion_ids, rewards, gen, batch.over_length, extra
        )

    def warn_over_length(self, over_length: int, total_so_far: int) -> None:
        """Log a warning for prompts skipped or truncated by the prompt limit (none: silent)."""
        if not over_length:
            return
        action = "skipped" if self.prompt_length_policy == "skip" else "truncated from the left"
        logger.warning(
            "%d prompt(s) longer than %s %s (%d so far).",
            over_length,
            self.describe_prompt_limit(),
            action,
            total_so_far,
        )

    def describe_prompt_limit(self) -> str:
        """The prompt limit in words: `"max_prompt_length=64 tokens"`, or how the context sets
        it."""
        if self.prompt_limit == self.max_prompt_length:
            return f"max_prompt_length={self.max_prompt_length} tokens"
        return (
            f"{self.prompt_limit} tokens (the model's context of {self.context_length} tokens "
            f"minus max_completion_length={self.max_new_tokens})"
        )

    def all_skipped_error(self) -> DataError:
        """The error for a dataset whose every prompt the "skip" policy dropped."""
        return DataError(
            f"every prompt is longer than {self.describe_prompt_limit()} and "
            "prompt_length_policy='skip' drops them all; raise the limit or use "
            "prompt_length_policy='truncate_left'."
        )

    def empty(self, over_length: int = 0) -> ScoredRollout:
        """A rollout of no rows (N = 0), counting `over_length` prompts over the limit."""
        none = torch.zeros((0, 0), dtype=torch.long)
        gen = GenerationOutput(none, none, none, none, torch.zeros(0, dtype=torch.bool))
        rewards = torch.zeros((0, len(self.reward_funcs)), dtype=torch.float32)
        return ScoredRollout([], {}, [], [], rewards, gen, over_length)


def reward_columns(
    columns: dict[str, list[Any]], gen: GenerationOutput, environments: list[Any]
) -> dict[str, list[Any]]:
    """The reward functions' columns: the dataset's, a `rollout_func`'s extra fields and, with
    environments, the N rollouts' instances as `environments` (TRL's keyword)."""
    out = {**columns, **gen.extra_fields}
    if environments:
        out["environments"] = list(environments)
    return out


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
        `(completions, completion_ids)`: N strings (or assistant-message lists for chat prompts;
        multi-turn, the assistant turns with their `tool_calls` and the tool messages between
        them, as TRL gives them) and N token-id lists of each completion's `completion_mask`
        length (tool tokens included).
    """
    lengths = gen.completion_mask.sum(1).tolist()  # [N]
    id_lists = [row[:n] for row, n in zip(gen.completion_ids.tolist(), lengths, strict=True)]
    if gen.turns is not None and gen.tool_mask is not None:  # multi-turn: one message per turn
        model = gen.tool_mask.tolist()
        return [gen.turns.transcript(i, ids, model[i]) for i, ids in enumerate(id_lists)], id_lists
    texts = tokenizer.batch_decode(id_lists, skip_special_tokens=True)
    return format_completions(prompts, texts), id_lists


@torch.no_grad()
def evaluate_rewards(
    dataset: Any,
    pipeline: RolloutPipeline,
    *,
    args: GRPOConfig,
    trainer_state: Any,
    world: World | None = None,
) -> dict[str, float]:
    """Sample `pipeline.num_generations` completions for every prompt of `dataset` and score them.

    Prompts are taken in the dataset's order, `per_device_eval_batch_size` completions per
    generation call. With several processes (`world`) each takes a contiguous share of the prompts
    (`World.split`) and the rewards and lengths are gathered in rank order, so every process
    returns the metrics of the whole set, as one process would compute them. Every random
    generator is saved before and restored after, so evaluating does not change the training
    run. Prompts over the pipeline's prompt limit follow
    `prompt_length_policy` (with a warning) but are not added to the training counter.

    Returns:
        `eval_`-prefixed reward metrics (`eval_reward`, `eval_reward_std`,
        `eval_rewards/<name>/mean|std`, `eval_frac_reward_zero_std`),
        `eval_completions/mean_length`, and `eval_<name>` for each metric the reward functions
        log with `log_metric` (the mean over generation calls of each call's mean, as TRL).

    Raises:
        DataError: the dataset yields no prompt (empty, or every prompt skipped by length).
    """
    world = world or World()
    g = pipeline.num_generations
    per_call = max(1, args.per_device_eval_batch_size // g)
    rows = list(PromptSampler(dataset, seed=0, shuffle=False).iterate_once())
    own = rows[world.split(len(rows))]
    rollouts = []
    logged: dict[str, list[float]] = {}  # log_metric values: one mean per generation call
    rng = ckpt.rng_state()
    try:
        for start in range(0, len(own), per_call):
            reward_log = RewardLog()
            rollouts.append(
                pipeline.run(
                    own[start : start + per_call],
                    trainer_state=trainer_state,
                    reward_log=reward_log,
                )
            )
            for name, value in reward_log.batch_metrics().items():
                logged.setdefault(name, []).append(value)
    finally:
        ckpt.set_rng_state(rng)
    k = len(pipeline.reward_funcs)
    parts = world.gather_objects(
        (
            sum(r.over_length for r in rollouts),
            [r.rewards for r in rollouts],  # [n, K] each
            [r.lengths for r in rollouts],  # [n] each
            logged,
        )
    )
    over_length = sum(part[0] for part in parts)
    pipeline.warn_over_length(over_length, over_length)
    reward_parts = [t for part in parts for t in part[1]]
    lengths = [t for part in parts for t in part[2]]
    rewards = torch.cat(reward_parts) if reward_parts else torch.zeros(0, k)  # [N, K]
    if not len(rewards):
        if not rows:
            raise DataError("eval_dataset is empty; give it at least one row with a 'prompt'.")
        raise pipeline.all_skipped_error()
    adv = group_advantages(
        rewards,
        g,
        reward_weights=args.reward_weights,
        scale_rewards=args.resolved_scale_rewards,
        multi_objective_aggregation=args.multi_objective_aggregation,
    )
    names = [fn.name for fn in pipeline.reward_funcs]
    metrics = {f"eval_{k}": v for k, v in name_reward_metrics(adv.metrics, names).items()}
    metrics["eval_completions/mean_length"] = torch.cat(lengths).mean().item()
    pooled: dict[str, list[float]] = {}
    for part in parts:
        for name, values in part[3].items():
            pooled.setdefault(name, []).extend(values)
    metrics.update({f"eval_{name}": sum(v) / len(v) for name, v in pooled.items()})
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

    def prompt_groups(self) -> Tensor:
        """`[N]` long: rows with the same prompt (ids and padding) get the same number."""
        return prompt_numbers(self.prompt_ids, self.prompt_mask)

    def sliced(self, name: str, rows: slice, t: int, device: torch.device) -> Tensor | None:
        """`[n, t]` rows of the per-token tensor `name`, or None when it was not computed."""
        value: Tensor | None = getattr(self, name)
        return None if value is None else value[rows, :t].to(device)
