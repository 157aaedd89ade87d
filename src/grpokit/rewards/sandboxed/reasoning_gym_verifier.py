"""reasoning-gym's verifiers, called inside the sandbox on the model's answers.

Imported inside the sandbox as `reasoning_gym_verifier` (see `grpokit.rewards.sandboxed`);
`grpokit.rewards.builtin.ReasoningGymScore` calls `score` through a `SandboxPool`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import reasoning_gym


@cache
def _score_answer_fn(dataset_name: str) -> Callable[..., float]:
    fn: Callable[..., float] = reasoning_gym.get_score_answer_fn(dataset_name)
    return fn


def warm(dataset_names: Sequence[str]) -> None:
    """Build the verifiers of `dataset_names` ahead of the calls (run in the worker itself)."""
    for name in dataset_names:
        _score_answer_fn(name)


def score(answer: str, entry: dict[str, Any]) -> float:
    """`score_answer(answer, entry)` of the entry's own reasoning-gym dataset."""
    return float(_score_answer_fn(entry["metadata"]["source_dataset"])(answer, entry))
