"""Environments (TRL's `environment_factory`) and custom rollouts (TRL's `rollout_func`).

An environment is any object made by a zero-argument factory, with:

- `reset(**row)` (required): called at the start of each rollout with the dataset row; a string
  it returns is appended to the prompt's last message (None: the prompt is unchanged);
- public methods (names not starting with `_`, other than `reset` and `get_reward`): tools the
  model may call, with type hints and Google-style docstrings like any tool;
- `get_reward()` (optional): the rollout's reward, read after the rollout, so the environment
  owns the reward (a reward function named after the class, weight 1 by default).

Each rollout gets its own instance (instances are pooled and reset, never shared by two rollouts
of a batch). Reward functions receive the batch's instances as `environments`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpokit.engines.base import GenerationOutput, left_pad
from grpokit.errors import ConfigError
from grpokit.tools.registry import Tool, make_tools

RESERVED = ("reset", "get_reward")


def _public_methods(environment: Any) -> list[str]:
    """Names of the class's public functions (properties are not evaluated)."""
    return [
        name
        for name, _ in inspect.getmembers(type(environment), predicate=inspect.isfunction)
        if not name.startswith("_") and name not in RESERVED
    ]


class Environments:
    """A pool of environments made by `factory`, and the tools they expose.

    Args:
        factory: Makes one environment (called once here to check it).
        tools: The standalone tools (an environment's tool may not share a name with one).

    Raises:
        ConfigError: the environment has no callable `reset`, a method is not a valid tool, or
            a method's name clashes with a standalone tool.
    """

    def __init__(self, factory: Callable[[], Any], tools: dict[str, Tool] | None = None) -> None:
        if not callable(factory):
            raise ConfigError("environment_factory must be a callable returning an environment.")
        probe = factory()
        name = type(probe).__name__
        if not callable(getattr(probe, "reset", None)):
            raise ConfigError(
                f"environment_factory: {name} has no reset() method; define reset(self, **row) "
                "that starts a rollout and returns None or a string to append to the prompt."
            )
        self.factory = factory
        self.name = name
        self.methods = _public_methods(probe)
        env_tools = make_tools(
            [getattr(probe, m) for m in self.methods], where=f"environment {name}"
        )
        clashes = sorted(set(env_tools) & set(tools or {}))
        if clashes:
            raise ConfigError(
                f"environment {name}'s method(s) {clashes} have the name of a tool passed in "
                "tools=; rename one of them (the model calls tools by name)."
            )
        self.schemas = {m: env_tools[m].schema for m in self.methods}
        self.has_reward = callable(getattr(probe, "get_reward", None))
        self._pool: list[Any] = [probe]

    def take(self, n: int, start: int = 0) -> list[Any]:
        """`n` distinct instances after the first `start` (those taken earlier for the batch
        being built); the pool grows as needed."""
        while len(self._pool) < start + n:
            self._pool.append(self.factory())
        return self._pool[start : start + n]

    def tools_of(self, environment: Any) -> dict[str, Tool]:
        """The environment's methods as tools bound to this instance."""
        return {m: Tool(m, getattr(environment, m), self.schemas[m]) for m in self.methods}

    def reward_function(self) -> Callable[..., list[float | None]]:
        """A reward function that reads `get_reward()` of each rollout's environment."""

        def reward(environments: Sequence[Any], **kwargs: Any) -> list[float | None]:
            return [float(env.get_reward()) for env in environments]

        reward.__name__ = self.name
        return reward


def append_observation(prompt: Any, observation: Any) -> Any:
    """`prompt` with `observation` (the string `reset` returned) appended to its last message;
    unchanged for None. The prompt itself is not modified."""
    if observation is None:
        return prompt
    if not isinstance(observation, str):
        raise ConfigError(
            f"environment reset() returned {type(observation).__name__}; return None or a string."
        )
    if isinstance(prompt, str):
        return prompt + observation
    last = copy.copy(prompt[-1])
    last["content"] = str(last.get("content") or "") + observation
    return [*prompt[:-1], last]


REQUIRED_ROLLOUT_KEYS = ("prompt_ids", "completion_ids", "logprobs")


def rollout_output(
    output: Any,
    *,
    expected: int,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
) -> tuple[GenerationOutput, dict[str, list[Any]]]:
    """A `GenerationOutput` from a `rollout_func`'s dict, and its extra fields.

    Args:
        output: `{"prompt_ids": N lists, "completion_ids": N lists, "logprobs": N lists of
            floats (one per completion token) or None, "env_mask": optional N lists (1 = the
            model wrote the token, as `tool_mask`), **extra}`.
        expected: N = B*G, the completions the batch needs.
        pad_token_id: For padding. eos_token_ids: A completion ending in one is not truncated.

    Returns:
        `(gen, extra_fields)`: every token of a completion counts (`completion_mask` 1); extra
        fields (N values each) go to the reward functions.

    Raises:
        ValueError: not a dict, a missing key, or lists of the wrong number or length.
    """
    if not isinstance(output, dict):
        raise ValueError(f"rollout_func must return a dict, got {type(output).__name__}.")
    missing = [k for k in REQUIRED_ROLLOUT_KEYS if k not in output]
    if missing:
        raise ValueError(f"rollout_func must return the keys {missing} in its dict.")
    prompts, completions = output["prompt_ids"], output["completion_ids"]
    logprobs, env_mask = output["logprobs"], output.get("env_mask")
    for key in ("prompt_ids", "completion_ids", "logprobs", "env_mask"):
        value = output.get(key)
        if value is not None and len(value) != expected:
            raise ValueError(
                f"rollout_func returned {len(value)} {key} for a batch that needs {expected} "
                "completions (num_generations per prompt, the prompts' completions consecutive)."
            )
    for name, lists in (("logprobs", logprobs), ("env_mask", env_mask)):
        if lists is None:
            continue
        for i, (values, ids) in enumerate(zip(lists, completions, strict=True)):
            if len(values) != len(ids):
                raise ValueError(
                    f"rollout_func: completion {i} has {len(ids)} tokens but {len(values)} "
                    f"{name}; give one per completion token."
                )
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.full((expected, width), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros((expected, width), dtype=torch.long)
    tool_mask = None if env_mask is None else torch.ones((expected, width), dtype=torch.long)
    sampling = None if logprobs is None else torch.zeros((expected, width), dtype=torch.float32)
    for i, ids in enumerate(completions):
        completion_ids[i, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long)
        completion_mask[i, : len(ids)] = 1
        if tool_mask is not None and env_mask is not None:
            tool_mask[i, : len(ids)] = torch.as_tensor(list(env_mask[i]), dtype=torch.long)
        if sampling is not None:
            sampling[i, : len(ids)] = torch.as_tensor(list(logprobs[i]), dtype=torch.float32)
    eos = set(eos_token_ids)
    truncated = torch.as_tensor([not ids or ids[-1] not in eos for ids in completions])
    gen = GenerationOutput(
        prompt_ids, prompt_mask, completion_ids, completion_mask, truncated, sampling, tool_mask
    )
    extra = {k: list(v) for k, v in output.items() if k not in (*REQUIRED_ROLLOUT_KEYS, "env_mask")}
    return gen, extra
