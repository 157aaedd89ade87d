"""Held-out evaluation: mean reward, accuracy, pass@k and completion length.

`evaluate` samples `k = num_samples` completions for every prompt of a dataset, scores them with the
same reward functions as training, and summarises. The metric definitions:

- `reward`: mean over all `N = B*k` completions of the weighted sum of the rewards (a reward that is
  `None`/NaN for a sample counts 0, as in training); `reward_std` its standard deviation.
- `rewards/<name>`: mean of one reward function over the samples where it applies (NaN skipped).
- `accuracy`: the fraction of the N completions that are *correct*, meaning the designated
  correctness reward (`accuracy_reward`, default: the first reward function) is
  `>= accuracy_threshold` (default 1.0, a full score; `None`/NaN counts as incorrect).
- `pass@j` for j in 1, 2, 4, ... up to k (and k itself): the unbiased estimator of Chen et al. 2021
  (https://arxiv.org/abs/2107.03374), averaged over prompts: with n = k samples of which c are
  correct, `pass@j = 1 - C(n - c, j) / C(n, j)`. `pass@1` equals `accuracy`.
- `completion_length`: mean number of completion tokens (up to and including EOS);
  `clipped_ratio`: fraction of completions that hit `max_completion_length` without EOS.
- `prompts/over_length`: prompts longer than `max_prompt_length`, truncated or skipped (a skipped
  prompt is in no other metric, and not in `num_prompts`).
- with tools (multi-turn rollouts): `tools/call_rate` (completions that made at least one tool
  call), `tools/call_frequency` (calls per completion) and `tools/failure_frequency` (failed
  calls / calls: unreadable, unknown tool, bad arguments, an exception or a timeout), as in
  training (`tools.turns.call_metrics`), and `tools/turns_mean` (the model's turns per
  completion, 1 = answered without a tool); `completion_length` counts the model's tokens only.

Prompts are tokenized, sampled, decoded and scored by the same path as in training
(`grpokit.train.rollout.RolloutPipeline`), with any `GenerationEngine`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from grpokit.core.advantages import check_reward_weights
from grpokit.engines.base import GenerationEngine, SamplingParams
from grpokit.engines.device import device_traits, fork_rng, model_device
from grpokit.engines.models import context_length
from grpokit.engines.transformers_engine import TransformersEngine
from grpokit.rewards.scoring import build_reward_functions
from grpokit.tools.environments import Environments
from grpokit.tools.turns import ToolCalling, call_metrics
from grpokit.train.rollout import RolloutPipeline

GREEDY = SamplingParams(top_k=1)
"""Greedy decoding (the default when one sample per prompt is drawn): sampling from the top-1 token
is the argmax, and works with every generation engine."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: `1 - C(n-c, k) / C(n, k)`.

    Computed as a running product (no large binomials): `1 - prod_{i=n-c+1}^{n} (1 - k/i)`.

    Args:
        n: samples drawn for the prompt.
        c: correct samples among them, `0 <= c <= n`.
        k: samples the metric allows, `1 <= k <= n`.

    Returns:
        The probability that at least one of k samples drawn without replacement is correct.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}.")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_values(k: int) -> list[int]:
    """The j reported as `pass@j` for k samples per prompt: powers of two below k, then k."""
    values = []
    j = 1
    while j < k:
        values.append(j)
        j *= 2
    return [*values, k]


def _reward_names(reward_fns: Sequence[Any]) -> list[str]:
    return [
        str(getattr(fn, "name", getattr(fn, "__name__", type(fn).__name__))) for fn in reward_fns
    ]


def _accuracy_index(names: list[str], accuracy_reward: str | int | None) -> int:
    if accuracy_reward is None:
        return 0
    if isinstance(accuracy_reward, int):
        if not 0 <= accuracy_reward < len(names):
            raise ValueError(
                f"accuracy_reward={accuracy_reward} is out of range: there are {len(names)} "
                f"reward functions ({names}); give an index below {len(names)} or a name."
            )
        return accuracy_reward
    if accuracy_reward not in names:
        raise ValueError(
            f"accuracy_reward={accuracy_reward!r} is not one of the reward functions {names}; "
            "give one of these names."
        )
    return names.index(accuracy_reward)


def evaluate(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    reward_fns: Sequence[Any] | Any,
    *,
    engine: GenerationEngine | None = None,
    num_samples: int = 1,
    max_completion_length: int = 256,
    sampling: SamplingParams | None = None,
    batch_size: int = 32,
    accuracy_reward: str | int | None = None,
    accuracy_threshold: float = 1.0,
    reward_weights: Sequence[float] | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    max_prompt_length: int | None = None,
    prompt_length_policy: str = "truncate_left",
    seed: int | None = 0,
    bf16: bool = False,
    progress: Callable[[int, int], None] | None = None,
    tool_calling: ToolCalling | None = None,
    environments: Environments | None = None,
) -> dict[str, float]:
    """Sample k completions per held-out prompt and summarise rewards, accuracy and pass@k.

    See the module docstring for the exact definition of each metric.

    Args:
        model: the causal LM to evaluate (left in the train/eval mode it had); sampled with a
            `TransformersEngine` unless `engine` is given (then it may be None).
        tokenizer: its tokenizer (chat template used for conversational prompts).
        dataset: rows with a `prompt` column (plain or conversational) and the columns the reward
            functions read; any iterable of dicts or a `datasets.Dataset`.
        reward_fns: reward functions, reward names or `"module:function"` strings (anything
            `grpokit.rewards.scoring.build_reward_functions` accepts).
        engine: the `GenerationEngine` that samples (e.g. the `VLLMEngine` a training config
            asks for, see `grpokit.train.build.make_generation_engine`); default
            `TransformersEngine(model, tokenizer)`.
        num_samples: k, completions per prompt.
        max_completion_length: new tokens per completion.
        sampling: sampling parameters; default greedy when `num_samples == 1`, otherwise plain
            sampling at temperature 1.
        batch_size: completions per `generate` call (rounded down to whole prompts, at least one).
        accuracy_reward: which reward decides correctness: its name or index; default the first.
        accuracy_threshold: a completion is correct when that reward is `>=` this value.
        reward_weights: weights of the rewards in `reward`; default all 1.
        chat_template_kwargs: extra arguments for the chat template.
        max_prompt_length: longest prompt in tokens; None = no limit. A prompt is also limited
            to what `model`'s context leaves beside `max_completion_length`.
        prompt_length_policy: what to do with a longer prompt: "truncate_left" keeps its last
            tokens, "skip" leaves it out of every metric (both are counted in
            `prompts/over_length`, with a warning).
        seed: seeds sampling inside a forked RNG (the caller's RNG state is untouched); None = do
            not seed.
        bf16: run generation under bf16 autocast on the model's device (for `grpokit eval`,
            `train.build.resolve_precision` decides, as in training).
        progress: called as `progress(done_prompts, total_prompts)` after each batch.
        tool_calling: tools the model may call (multi-turn rollouts, as in training;
            `train.build.make_tool_calling`); None = single-turn.
        environments: one environment per rollout (`tools.environments`), as in training.

    Returns:
        `{"reward", "reward_std", "rewards/<name>", "accuracy", "pass@j", "completion_length",
        "clipped_ratio", "num_prompts", "num_samples", "prompts/over_length"}` as floats, plus
        `tools/*` with tools.

    Raises:
        ValueError: `num_samples < 1`, an empty dataset or one without `prompt`, an unknown
            `accuracy_reward`, `reward_weights` of the wrong length, neither `model` nor
            `engine`, or every prompt skipped by length.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError("evaluate got an empty dataset; give at least one row with a 'prompt'.")
    if "prompt" not in rows[0]:
        raise ValueError(f"evaluation dataset has no 'prompt' column; columns: {sorted(rows[0])}.")
    fns = build_reward_functions(reward_fns)
    names = _reward_names(fns)
    acc_index = _accuracy_index(names, accuracy_reward)
    check_reward_weights(reward_weights, len(fns), names)
    weights = torch.ones(len(fns)) if reward_weights is None else torch.tensor(reward_weights)
    if sampling is None:
        sampling = GREEDY if num_samples == 1 else SamplingParams()
    if engine is None:
        if model is None:
            raise ValueError("evaluate needs a model or an engine; pass one of them.")
        engine = TransformersEngine(model, tokenizer)
    pipeline = RolloutPipeline(
        engine=engine,
        tokenizer=tokenizer,
        reward_funcs=fns,
        sampling=sampling,
        num_generations=num_samples,
        max_new_tokens=max_completion_length,
        max_prompt_length=max_prompt_length,
        prompt_length_policy=prompt_length_policy,
        chat_template_kwargs=chat_template_kwargs,
        context_length=None if model is None else context_length(model),
        tool_calling=tool_calling,
        environments=environments,
    )
    per_call = max(1, batch_size // num_samples)

    rollouts = []
    device = torch.device("cpu") if model is None else model_device(model)
    rng = fork_rng() if seed is not None else contextlib.nullcontext()  # CPU and CUDA generators
    with rng, device_traits(device).autocast(bf16):
        if seed is not None:
            torch.manual_seed(seed)
        for start in range(0, len(rows), per_call):
            rollouts.append(pipeline.run(rows[start : start + per_call]))
            if progress is not None:
                progress(min(start + per_call, len(rows)), len(rows))
    over_length = sum(r.over_length for r in rollouts)
    pipeline.warn_over_length(over_length, over_length)
    rewards = torch.cat([r.rewards for r in rollouts])  # [N, K]
    if not len(rewards):
        raise pipeline.all_skipped_error()
    metrics = summarize(
        rewards,
        torch.cat([r.lengths for r in rollouts]),
        torch.cat([r.gen.is_truncated for r in rollouts]),
        names=names,
        num_samples=num_samples,
        weights=weights,
        accuracy_index=acc_index,
        accuracy_threshold=accuracy_threshold,
    )
    metrics["prompts/over_length"] = float(over_length)
    turns = [r.gen.turns for r in rollouts if r.gen.turns is not None]
    if turns:
        calls = [c for t in turns for c in t.calls]
        metrics.update(call_metrics(calls, [e for t in turns for e in t.errors]))
        model_turns = sum(int(r.gen.model_turns.sum()) for r in rollouts)
        metrics["tools/turns_mean"] = model_turns / max(1, len(calls))
    return metrics


def summarize(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    is_truncated: torch.Tensor,
    *,
    names: list[str],
    num_samples: int,
    weights: torch.Tensor | None = None,
    accuracy_index: int = 0,
    accuracy_threshold: float = 1.0,
) -> dict[str, float]:
    """Turn per-completion rewards into the evaluation metrics (pure; see the module docstring).

    Args:
        rewards: `[N, K]` rewards, NaN = does not apply; the `num_samples` completions of a
            prompt in consecutive rows.
        lengths: `[N]` completion lengths in tokens.
        is_truncated: `[N]` 1 = no EOS within the length limit.
        names: K reward names.
        num_samples: k, completions per prompt (N must be a multiple of it).
        weights: `[K]` reward weights; default ones.
        accuracy_index: the column of the correctness reward.
        accuracy_threshold: correct when that column is `>=` this value.
    """
    n, num_rewards = rewards.shape
    if n % num_samples:
        raise ValueError(f"{n} completions are not a whole number of groups of {num_samples}.")
    weights = torch.ones(num_rewards) if weights is None else weights.float()
    total = (torch.nan_to_num(rewards, nan=0.0) * weights).sum(dim=1)  # [N]
    correct = torch.nan_to_num(rewards[:, accuracy_index], nan=-math.inf) >= accuracy_threshold
    per_prompt = correct.view(-1, num_samples).sum(dim=1).tolist()  # [B] correct counts
    metrics: dict[str, float] = {
        "reward": total.mean().item(),
        "reward_std": total.std(unbiased=False).item(),
    }
    for k, name in enumerate(names):
        column = rewards[:, k]
        valid = ~torch.isnan(column)
        metrics[f"rewards/{name}"] = column[valid].mean().item() if valid.any() else math.nan
    metrics["accuracy"] = correct.float().mean().item()
    for j in pass_at_k_values(num_samples):
        values = [pass_at_k(num_samples, int(c), j) for c in per_prompt]
        metrics[f"pass@{j}"] = sum(values) / len(values)
    metrics["completion_length"] = lengths.float().mean().item()
    metrics["clipped_ratio"] = is_truncated.float().mean().item()
    metrics["num_prompts"] = float(n // num_samples)
    metrics["num_samples"] = float(num_samples)
    return metrics
