"""`PromptDrawer`: this process's prompts for a generation batch, tokenized, with environments.

Every process reads the same prompt order (`PromptSampler` is seeded alike everywhere), so the
sampler's position, which the main process checkpoints, is every process's, and an epoch ends at
the same row for all. A draw is given as every process's share, known to all: `sum(shares)` rows
are read and process p keeps rows `[sum(shares[:p]), sum(shares[:p + 1]))`. When the length
policy (`prompt_length_policy="skip"`) drops some, the processes' shortfalls are drawn together
and handed out in rank order again, until each holds its share; the rows drawn are then the ones a
single process would draw (their order across the processes differs once a row was skipped).
Each process tokenizes only its own rows, so with `environment_factory` it makes and resets only
its own rollouts' environments. Dynamic sampling's extra draws for a batch (`draw_shares`) give
their rollouts instances after those the batch's earlier rollouts hold.

Without environments, a draw of an even split (`draw`) is made whole by every process instead:
each tokenizes the global batch, refills it as one process would and keeps its contiguous share,
so the global batch is exactly one process's, in its order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from grpokit.train.build import as_list
from grpokit.train.distributed import World
from grpokit.train.prompt_sampler import PromptSampler
from grpokit.train.rollout import PromptBatch, RolloutPipeline


class PromptDrawer:
    """Draws prompts from the shared `PromptSampler` for this process of `world`.

    Args:
        sampler: The run's prompt order (the same on every process).
        world: The processes training together.
    """

    def __init__(self, sampler: PromptSampler, world: World) -> None:
        self.sampler = sampler
        self.world = world
        # Environment instances the current batch's rollouts hold (this process's): a further
        # draw for the same batch takes the next ones, so no instance serves two of its rollouts.
        self.environments_taken = 0

    def draw(self, pipeline: RolloutPipeline, state: Any, num_prompts: int) -> PromptBatch:
        """This process's share of `num_prompts` prompts (a global count split evenly).

        Args:
            pipeline: Tokenizes the rows and applies the length policy (and environments).
            state: The `TrainerState` whose `prompts_over_length` counts prompts over the limit
                (over all processes).
            num_prompts: Prompts over all processes; each process gets `num_prompts / P`.

        Returns:
            The rows kept, their token-id lists and, with environments, each rollout's
            instance and prompt (N = rows * G of each).
        """
        world = self.world
        share = num_prompts // world.num_processes
        self.environments_taken = 0  # a new batch
        if world.is_distributed and pipeline.environments is not None:
            return self._fill(pipeline, state, [share] * world.num_processes, sharing=world)
        whole = self._fill(pipeline, state, [num_prompts], sharing=None)
        if not world.is_distributed:
            return whole
        own = world.own_rows(share)  # every process drew and tokenized the global batch
        return PromptBatch(whole.rows[own], whole.prompt_ids[own], whole.over_length)

    def draw_shares(
        self, pipeline: RolloutPipeline, state: Any, shares: Sequence[int]
    ) -> PromptBatch:
        """More prompts for the batch the last `draw` began (dynamic sampling's extra draws):
        this process's `shares[rank]` of a draw of `sum(shares)`, rank by rank. A collective:
        every process calls it with the same `shares`; a share may be 0. With environments, its
        rollouts take instances after those the batch's earlier rollouts hold. See `draw`."""
        return self._fill(pipeline, state, shares, sharing=self.world)

    def _fill(
        self,
        pipeline: RolloutPipeline,
        state: Any,
        shares: Sequence[int],
        sharing: World | None,
    ) -> PromptBatch:
        """Draw until this process holds its share of rows the length policy keeps.

        `sharing` is the world whose processes split each draw in rank order and count their
        kept and over-length rows together (one `gather_objects` per draw); None = this process
        draws alone (`shares` has one entry).
        """
        index = sharing.process_index if sharing is not None else 0
        missing = list(shares)  # every process's shortfall, known to all
        parts: list[PromptBatch] = []
        held = attempts = 0
        while sum(missing):
            drawn = [self.sampler.next() for _ in range(sum(missing))]
            start = sum(missing[:index])
            mine = drawn[start : start + missing[index]]
            batch = PromptBatch([], [])
            if mine:
                batch = pipeline.tokenize(mine, environments_taken=self.environments_taken)
                self.environments_taken += len(mine) * pipeline.num_generations
            parts.append(batch)
            held += len(batch.rows)
            counts = [(held, batch.over_length)]  # [(kept, over length), ...] per process
            if sharing is not None:
                counts = sharing.gather_objects(counts[0])
            over_length = sum(over for _, over in counts)
            state.prompts_over_length += over_length
            if sharing is None or sharing.is_main_process:
                pipeline.warn_over_length(over_length, state.prompts_over_length)
            missing = [share - kept for share, (kept, _) in zip(shares, counts, strict=True)]
            attempts += len(drawn)
            limit = max(1, self.sampler.size or 0) + len(drawn)
            if not sum(kept for kept, _ in counts) and attempts > limit:
                raise pipeline.all_skipped_error()
        return PromptBatch(
            rows=[row for part in parts for row in part.rows],
            prompt_ids=[ids for part in parts for ids in part.prompt_ids],
            over_length=sum(part.over_length for part in parts),
            environments=[env for part in parts for env in part.environments],
            prompts=[prompt for part in parts for prompt in part.prompts],
        )


def with_environment_reward(reward_funcs: Any, environments: Any) -> Any:
    """`reward_funcs` with the environments' `get_reward()` as one more reward function when the
    environment class has one (`tools.environments.Environments.reward_function`), else as
    given."""
    if environments is None or not environments.has_reward:
        return reward_funcs
    return [*as_list(reward_funcs), environments.reward_function()]
