"""Reward functions and reward models, turned into one validated `[N, K]` reward tensor.

Calling convention (TRL's): every reward function is called with keyword arguments only,
`f(prompts=..., completions=..., completion_ids=..., trainer_state=..., **columns)`, where
`columns` holds every other dataset column (one value per completion), and returns one value per
completion: a number, or `None` when the reward does not apply to that sample (stored as NaN and
ignored by the weighted sum downstream).

Accepted return values, decided here once: `int`, `float`, `bool` (True = 1.0; TRL accepts it, so
`[c == a for ...]` keeps working), numpy scalars, 0-d tensors/arrays, and `None`. Anything else
(strings, lists, NaN, inf, a wrong count) is a `RewardFunctionError` naming the function, the
sample and the fix. A function that returns None for every completion of a batch is warned about
(it adds nothing to the advantages; often a column it reads is missing).

Reward functions may also log, with TRL's keyword arguments (`RewardLog`): `log_metric(name,
value)` adds a scalar metric (averaged over the batch's calls, then over the logging window) and
`log_extra(column, values)` adds a column of one value per completion to the completions table.

Timeouts (`compute_rewards(timeout=...)`, `GRPOConfig.reward_timeout`): each call may take at most
`timeout` seconds. A sync function then runs in a daemon worker thread; when it times out, Python
cannot stop that thread, so it keeps running (and using CPU) in the background until it returns:
code that may never return, or that must not be trusted, belongs in a separate process (the
sandbox, docs/SECURITY.md). Signal-based timeouts (`signal.alarm`) do not work in that thread. An
async function is cancelled at its next `await`; one that blocks without awaiting cannot be timed
out. A timed-out call is a `RewardTimeoutError`, or with `timeout_policy="nan"` a warning and NaN
("does not apply") rewards from that function for the batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import numbers
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from grpokit.data.prompts import completion_text, is_conversational_prompt

logger = logging.getLogger("grpokit")

REWARD_TIMEOUT_POLICIES = ("error", "nan")


class RewardFunctionError(ValueError):
    """A reward function failed or returned something that is not one reward per completion."""

    def __init__(self, message: str, *, function_name: str, index: int | None = None) -> None:
        super().__init__(message)
        self.function_name = function_name
        self.index = index


class RewardTimeoutError(RewardFunctionError):
    """A reward function did not return within the timeout."""


_NOT_PER_COMPLETION = ("trainer_state", "log_metric", "log_extra")
"""Keyword arguments of reward functions that do not hold one value per completion."""

COMPLETION_TABLE_KEYS = ("step", "prompt", "completion", "rewards", "reward", "advantage")
"""Columns of the completions table that a `log_extra` column may not replace."""


class RewardLog:
    """What reward functions log through TRL's `log_metric` / `log_extra` keyword arguments
    during one batch; `compute_rewards` passes its two methods to every function.

    Attributes:
        metrics: Every value logged per metric name.
        extra: Per column, the values logged (one per completion once the batch is complete).
    """

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list[Any]] = {}

    def log_metric(self, name: str, value: float) -> None:
        """Add `value` to metric `name` (TRL's `log_metric`): the batch's values are averaged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_metric: the name must be a non-empty string, got {name!r}.")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"log_metric({name!r}, {_short(value)}): the value must be a number."
            ) from None
        self.metrics.setdefault(name, []).append(number)

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        """Add `values` (one per completion of the batch) to column `column` of the completions
        table (TRL's `log_extra`)."""
        if not isinstance(column, str) or not column or column in COMPLETION_TABLE_KEYS:
            raise ValueError(
                f"log_extra: column {column!r} must be a non-empty string other than "
                f"{list(COMPLETION_TABLE_KEYS)}."
            )
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise ValueError(
                f"log_extra({column!r}, ...): values must be a list (one per completion), got a "
                f"{type(values).__name__}."
            )
        self.extra.setdefault(column, []).extend(values)

    def batch_metrics(self) -> dict[str, float]:
        """Each metric's mean over the values logged for the batch (TRL's sum / count)."""
        return {name: sum(values) / len(values) for name, values in self.metrics.items()}

    def check_extra(self, n: int) -> None:
        """Raise a `ValueError` naming any column that does not hold exactly `n` values."""
        for column, values in self.extra.items():
            if len(values) != n:
                raise ValueError(
                    f"log_extra({column!r}, values) got {len(values)} values in all for a batch "
                    f"of {n} completions; log exactly one value per completion, once per batch."
                )


class _TimedOut(Exception):
    """Internal: our own timeout fired (distinct from a TimeoutError the function raises)."""


@runtime_checkable
class RewardFunction(Protocol):
    """One reward: a name (used in metric keys) and TRL's keyword-only calling convention."""

    name: str

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> Any:
        """Return N rewards (`float | None`), or an awaitable of them for async functions."""
        ...


class CallableReward:
    """A user's Python function (sync or `async def`) with a name."""

    def __init__(self, fn: Callable[..., Any], name: str | None = None) -> None:
        if not callable(fn):
            raise TypeError(f"reward function {fn!r} is not callable.")
        self.fn = fn
        self.name = name or callable_name(fn)
        self.all_none_batches = 0
        """Batches for which the function returned None for every completion."""

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> Any:
        return self.fn(
            prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs
        )

    def __repr__(self) -> str:
        return f"CallableReward({self.name!r})"


class RewardModel:
    """A sequence-classification model scoring `prompt + completion`; reward = logit 0.

    Conversations are rendered with the reward tokenizer's chat template over the prompt messages
    followed by the completion message (a pre-filled final assistant message of the prompt is
    dropped, since the completion already starts with it); plain prompts are concatenated with
    their completion. Texts are tokenized without extra special tokens, right-padded, and scored
    in batches of `batch_size` under `torch.inference_mode`.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        name: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"reward model batch_size must be >= 1, got {batch_size}.")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.name = name or model_name(model)
        self.all_none_batches = 0  # never grows: a reward model scores every completion
        if getattr(tokenizer, "pad_token", None) is None:
            # Same fallback as TRL: batching needs a pad token, and the classifier pools the last
            # non-pad token, so the model's config must agree with the tokenizer.
            tokenizer.pad_token = tokenizer.eos_token
        config = getattr(model, "config", None)
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id

    def texts(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
        """The strings the reward model scores, one per completion."""
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if is_conversational_prompt(prompt):
                if getattr(self.tokenizer, "chat_template", None) is None:
                    raise ValueError(
                        f"reward model {self.name!r}: its tokenizer has no chat template, so it "
                        "cannot score conversational prompts. Pass a reward_processing_class "
                        "with a chat template or use plain prompts."
                    )
                messages = list(prompt[:-1] if prompt[-1]["role"] == "assistant" else prompt)
                if isinstance(completion, list):
                    messages += completion
                else:
                    messages.append({"role": "assistant", "content": completion_text(completion)})
                texts.append(self.tokenizer.apply_chat_template(messages, tokenize=False))
            else:
                texts.append(str(prompt) + completion_text(completion))
        return texts

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        **kwargs: Any,
    ) -> list[float]:
        texts = self.texts(prompts, completions)
        rewards: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    padding_side="right",
                    add_special_tokens=False,
                ).to(self.device)
                logits = self.model(**batch).logits  # [b, num_labels]
                rewards.extend(logits[:, 0].float().cpu().tolist())
        return rewards

    def __repr__(self) -> str:
        return f"RewardModel({self.name!r})"


def callable_name(fn: Callable[..., Any]) -> str:
    """`fn.__name__`, or the wrapped function's / class's name for partials and callable objects."""
    name = getattr(fn, "__name__", None)
    if isinstance(name, str):
        return name
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None and isinstance(getattr(inner, "__name__", None), str):
        return str(inner.__name__)
    return type(fn).__name__


def model_name(model: torch.nn.Module) -> str:
    """Basename of `config._name_or_path`, or the class name for a model built from a config."""
    path = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    return os.path.basename(path.rstrip("/\\")) or type(model).__name__


def _load_reward_model(
    path: str, tokenizer: Any, device: str | torch.device, load_kwargs: dict[str, Any]
) -> RewardModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **load_kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
    return RewardModel(model, tokenizer, device=device)


def build_reward_functions(
    reward_funcs: Any,
    reward_processing_classes: Any = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    trust_remote_code: bool = False,
) -> list[RewardFunction]:
    """Normalise TRL's `reward_funcs` argument into named reward functions.

    Args:
        reward_funcs: One or a list of: Python callables (sync or `async def`); sequence
            classification model instances (`torch.nn.Module` with `.config`); strings. A string
            that is an existing path is loaded as a reward model with its tokenizer; a built-in
            reward name (see `grpokit.rewards.builtin.REWARD_FUNCTIONS`) or `"module:function"` is
            resolved to that function; any other string is a Hugging Face model id.
        reward_processing_classes: One or a list aligned with `reward_funcs`: the tokenizer of each
            reward model (`None` entries, or entries for callables, are ignored / loaded with
            `AutoTokenizer` from the model's path).
        device: Where reward models run.
        batch_size: Reward-model forward batch size.
        trust_remote_code: Passed to `from_pretrained` of reward models and tokenizers loaded
            from a path or id (`GRPOConfig.trust_remote_code`).

    Returns:
        K reward functions, each with a `name`. Duplicate names get a `_2`, `_3`, ... suffix so
        per-function metrics stay distinct.

    Raises:
        ValueError: `reward_processing_classes` does not align with `reward_funcs`.
        TypeError: An entry is none of the accepted kinds.
    """
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError("reward_funcs is empty; give at least one reward function or model.")
    if reward_processing_classes is None:
        classes: list[Any] = [None] * len(funcs)
    elif isinstance(reward_processing_classes, (list, tuple)):
        classes = list(reward_processing_classes)
    else:
        classes = [reward_processing_classes]
    if len(classes) != len(funcs):
        raise ValueError(
            f"reward_processing_classes has {len(classes)} entries but reward_funcs has "
            f"{len(funcs)}; give one per reward function (None for callables)."
        )
    built: list[RewardFunction] = []
    load_kwargs = {"trust_remote_code": True} if trust_remote_code else {}
    for i, (fn, tokenizer) in enumerate(zip(funcs, classes, strict=True)):
        built.append(_build_one(fn, tokenizer, i, device, batch_size, load_kwargs))
    seen: dict[str, int] = {}
    for reward in built:
        count = seen.get(reward.name, 0) + 1
        seen[reward.name] = count
        if count > 1:
            reward.name = f"{reward.name}_{count}"
    return built


def _build_one(
    fn: Any,
    tokenizer: Any,
    index: int,
    device: str | torch.device,
    batch_size: int,
    load_kwargs: dict[str, Any],
) -> RewardFunction:
    if isinstance(fn, (CallableReward, RewardModel)):
        return fn
    if isinstance(fn, str):
        from grpokit.rewards.builtin import REWARD_FUNCTIONS, get_reward_function

        if not os.path.exists(fn) and (fn in REWARD_FUNCTIONS or ":" in fn):
            return CallableReward(get_reward_function(fn))
        reward = _load_reward_model(fn, tokenizer, device, load_kwargs)
        reward.batch_size = batch_size
        return reward
    if isinstance(fn, torch.nn.Module) and hasattr(fn, "config"):
        if tokenizer is None:
            from transformers import AutoTokenizer

            path = getattr(fn.config, "_name_or_path", "")
            if not path:
                raise ValueError(
                    f"reward_funcs[{index}] is a model built in memory ({type(fn).__name__}) "
                    "with no path to load its tokenizer from; pass its tokenizer in "
                    f"reward_processing_classes[{index}]."
                )
            tokenizer = AutoTokenizer.from_pretrained(path, **load_kwargs)
        return RewardModel(fn, tokenizer, device=device, batch_size=batch_size)
    if callable(fn):
        return CallableReward(fn)
    raise TypeError(
        f"reward_funcs[{index}] is a {type(fn).__name__}; expected a callable, a sequence "
        "classification model, a model id/path, a built-in reward name or 'module:function'."
    )


# ---------------------------------------------------------------------------------------------
# Calling and validating
# ---------------------------------------------------------------------------------------------


def _run_coroutines(coroutines: list[Any], timeout: float | None = None) -> list[Any]:
    """Await coroutines concurrently; results or exceptions (`_TimedOut` for those still running
    after `timeout` seconds, which are cancelled), in order."""

    async def bounded(coroutine: Any) -> Any:
        if timeout is None:
            return await coroutine
        # asyncio.wait, not wait_for: a TimeoutError raised by the function itself must stay
        # that function's error, not pass for our timeout.
        task = asyncio.ensure_future(coroutine)
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if not done:
            task.cancel()
            raise _TimedOut
        return task.result()

    async def gather() -> list[Any]:
        return list(await asyncio.gather(*(bounded(c) for c in coroutines), return_exceptions=True))

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    # Already inside an event loop (e.g. a notebook): run ours in a worker thread.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, gather()).result()


def _call(fn: RewardFunction, kwargs: dict[str, Any], timeout: float | None) -> Any:
    """`fn(**kwargs)`; with a timeout, in a daemon worker thread, raising `_TimedOut` when it has
    not returned after `timeout` seconds (the thread is left running: it cannot be stopped)."""
    if timeout is None:
        return fn(**kwargs)
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn(**kwargs)
        except BaseException as error:  # handed to the caller's thread below
            box["error"] = error

    worker = threading.Thread(target=target, name=f"reward {fn.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise _TimedOut
    if "error" in box:
        raise box["error"]
    return box["value"]


def _timed_out(fn: RewardFunction, timeout: float | None, n: int, policy: str) -> list[None]:
    """Rewards of a timed-out call under `policy` ("nan": all None, warned), else the error."""
    still = (
        " The call keeps running in its worker thread (a thread cannot be stopped); run code "
        "that may not return in a separate process (the sandbox, docs/SECURITY.md)."
    )
    if policy == "nan":
        logger.warning(
            "reward function %r did not return within reward_timeout=%s s on %d completions; its "
            "rewards for this batch are NaN (does not apply), as reward_timeout_policy='nan' "
            "says.%s",
            fn.name,
            timeout,
            n,
            still,
        )
        return [None] * n
    raise RewardTimeoutError(
        f"reward function {fn.name!r} did not return within reward_timeout={timeout} s on a "
        f"batch of {n} completions. Make it faster, raise reward_timeout, or set "
        "reward_timeout_policy='nan' to score such a batch as not applicable." + still,
        function_name=fn.name,
    )


def _warn_all_none(fn: CallableReward | RewardModel, n: int) -> None:
    """Count a batch the function returned None for entirely; warn at the 1st, 2nd, 4th, ...."""
    fn.all_none_batches += 1
    count = fn.all_none_batches
    if count & (count - 1) == 0:
        logger.warning(
            "reward function %r returned None for all %d completions of a batch (%d such "
            "batch%s so far): it adds nothing to the advantages. If it should apply, check the "
            "dataset columns it reads and how it parses the completions.",
            fn.name,
            n,
            count,
            "" if count == 1 else "es",
        )


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _locate_failure(
    fn: RewardFunction, kwargs: dict[str, Any], n: int, list_keys: list[str]
) -> int | None:
    """Call `fn` one sample at a time to find the first sample that raises (None if none does)."""
    scratch = RewardLog()  # what the single-sample calls log is not the batch's
    for i in range(n):
        single = {**kwargs, "log_metric": scratch.log_metric, "log_extra": scratch.log_extra}
        for key in list_keys:
            single[key] = kwargs[key][i : i + 1]
        try:
            out = fn(**single)
            # _run_coroutines returns exceptions instead of raising them.
            if inspect.isawaitable(out) and isinstance(_run_coroutines([out])[0], BaseException):
                return i
        except Exception:
            return i
    return None


def _raised_error(
    fn: RewardFunction,
    error: BaseException,
    kwargs: dict[str, Any],
    n: int,
    list_keys: list[str],
) -> RewardFunctionError:
    problem = f"{type(error).__name__}: {error}"
    if isinstance(error, TypeError) and "unexpected keyword argument" in str(error):
        return RewardFunctionError(
            f"reward function {fn.name!r} raised {problem}. Reward functions are called with "
            "keyword arguments prompts, completions, completion_ids, trainer_state, log_metric, "
            "log_extra and every dataset column; add **kwargs to its signature.",
            function_name=fn.name,
        )
    index = _locate_failure(fn, kwargs, n, list_keys)
    where = ""
    if index is not None:
        where = (
            f" on sample {index} (prompt: {_short(kwargs['prompts'][index])}, completion: "
            f"{_short(kwargs['completions'][index])})"
        )
    return RewardFunctionError(
        f"reward function {fn.name!r} raised {problem}{where}. Fix the function, or return None "
        "for samples it does not apply to.",
        function_name=fn.name,
        index=index,
    )


def _to_float(value: Any) -> float | None:
    """A reward value as a float; None for None; raises TypeError for non-numbers."""
    if value is None:
        return None
    if isinstance(value, (torch.Tensor,)) and value.numel() == 1 and value.dim() == 0:
        value = value.item()
    elif hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy 0-d arrays and scalars
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(type(value).__name__)


def _validate(fn: RewardFunction, output: Any, completions: list[Any]) -> list[float]:
    n = len(completions)
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise RewardFunctionError(
            f"reward function {fn.name!r} returned a {type(output).__name__}; it must return a "
            f"list of {n} rewards (one float or None per completion).",
            function_name=fn.name,
        )
    values = list(output)
    if len(values) != n:
        raise RewardFunctionError(
            f"reward function {fn.name!r} returned {len(values)} values for {n} completions; it "
            "must return exactly one reward (float or None) per completion.",
            function_name=fn.name,
        )
    rewards: list[float] = []
    for i, value in enumerate(values):
        sample = f"sample {i} (completion: {_short(completions[i])})"
        try:
            reward = _to_float(value)
        except TypeError:
            raise RewardFunctionError(
                f"reward function {fn.name!r} returned a non-number {_short(value)} "
                f"({type(value).__name__}) for {sample}; return a float, or None if the reward "
                "does not apply.",
                function_name=fn.name,
                index=i,
            ) from None
        if reward is None:
            rewards.append(math.nan)
        elif math.isnan(reward):
            raise RewardFunctionError(
                f"reward function {fn.name!r} returned NaN for {sample}; return None (not NaN) "
                "for samples the reward does not apply to.",
                function_name=fn.name,
                index=i,
            )
        elif math.isinf(reward):
            raise RewardFunctionError(
                f"reward function {fn.name!r} returned {reward} for {sample}; rewards must be "
                "finite (clip it, or return None if it does not apply).",
                function_name=fn.name,
                index=i,
            )
        else:
            rewards.append(reward)
    return rewards


def _check_inputs(
    n: int, prompts: list[Any], completion_ids: list[list[int]], columns: dict[str, list[Any]]
) -> None:
    lengths = {"prompts": len(prompts), "completion_ids": len(completion_ids)}
    lengths.update({f"column {key!r}": len(values) for key, values in columns.items()})
    for what, length in lengths.items():
        if length != n:
            raise ValueError(
                f"compute_rewards got {n} completions but {length} entries in {what}; every "
                "input needs one entry per completion."
            )
    reserved = {"prompts", "completions", "completion_ids", *_NOT_PER_COMPLETION} & set(columns)
    if reserved:
        raise ValueError(
            f"dataset columns {sorted(reserved)} clash with reward-function arguments; rename them."
        )


def _call_all(
    fns: Sequence[RewardFunction],
    kwargs: dict[str, Any],
    n: int,
    timeout: float | None,
    timeout_policy: str,
) -> tuple[list[Any], set[int]]:
    """Every function's raw output (sync ones in turn, then the async ones together), and the
    indices of the functions that timed out (their output: N Nones, under policy "nan")."""
    list_keys = [key for key in kwargs if key not in _NOT_PER_COMPLETION]
    outputs: list[Any] = [None] * len(fns)
    pending: dict[int, Any] = {}
    timed_out: set[int] = set()
    for k, fn in enumerate(fns):
        try:
            out = _call(fn, kwargs, timeout)
        except _TimedOut:
            outputs[k] = _timed_out(fn, timeout, n, timeout_policy)
            timed_out.add(k)
            continue
        except Exception as error:
            raise _raised_error(fn, error, kwargs, n, list_keys) from error
        if inspect.isawaitable(out):
            pending[k] = out
        else:
            outputs[k] = out
    results = _run_coroutines(list(pending.values()), timeout) if pending else []
    for k, result in zip(pending, results, strict=True):
        if isinstance(result, _TimedOut):
            outputs[k] = _timed_out(fns[k], timeout, n, timeout_policy)
            timed_out.add(k)
        elif isinstance(result, BaseException):
            raise _raised_error(fns[k], result, kwargs, n, list_keys) from result
        else:
            outputs[k] = result
    return outputs, timed_out


def compute_rewards(
    reward_fns: Sequence[RewardFunction | Callable[..., Any]],
    *,
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
    columns: dict[str, list[Any]],
    trainer_state: Any = None,
    reward_log: RewardLog | None = None,
    timeout: float | None = None,
    timeout_policy: str = "error",
) -> torch.Tensor:
    """Call every reward function on N completions and stack the validated results.

    Sync functions run one after another; async ones run concurrently (`asyncio.gather`). When a
    function raises, it is called again one sample at a time to name the first sample that fails
    on its own (only on this error path, which stops training anyway). A function that returns
    None for all N completions is warned about, at its 1st, 2nd, 4th, 8th, ... such batch.

    Args:
        reward_fns: K reward functions (from `build_reward_functions`; bare callables are wrapped).
        prompts: N prompts (each repeated G times), plain or conversational.
        completions: N completions in the prompts' format (see `data.prompts.format_completions`).
        completion_ids: N completion token-id lists (up to and including EOS; no padding).
        columns: Every other dataset column, N values each, passed as keyword arguments.
        trainer_state: Passed through as `trainer_state`.
        reward_log: Receives what the functions log through their `log_metric` / `log_extra`
            keyword arguments; None = a fresh one, discarded afterwards.
        timeout: Seconds each function call may take (module docstring); None = no limit.
        timeout_policy: A timed-out call is an error ("error") or NaN rewards for the batch
            from that function ("nan", warned about).

    Returns:
        `[N, K]` float32 rewards on CPU; NaN where a function returned None ("does not apply").

    Raises:
        RewardFunctionError: A function raised (chained from the original error, naming the first
            sample that fails alone), returned the wrong number of values, a non-number, NaN or
            inf. `RewardTimeoutError` (a subclass): a call timed out under policy "error".
        ValueError: Inputs of different lengths, an unknown `timeout_policy`, or a `log_extra`
            column without one value per completion.
    """
    if timeout_policy not in REWARD_TIMEOUT_POLICIES:
        raise ValueError(
            f"timeout_policy must be one of {REWARD_TIMEOUT_POLICIES}, got {timeout_policy!r}."
        )
    n = len(completions)
    _check_inputs(n, prompts, completion_ids, columns)
    fns: list[CallableReward | RewardModel] = [
        f if isinstance(f, (CallableReward, RewardModel)) else CallableReward(f) for f in reward_fns
    ]
    kwargs: dict[str, Any] = dict(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids,
        trainer_state=trainer_state,
        **columns,
    )
    log = reward_log if reward_log is not None else RewardLog()
    kwargs.update(log_metric=log.log_metric, log_extra=log.log_extra)
    outputs, timed_out = _call_all(fns, kwargs, n, timeout, timeout_policy)
    columns_k = [_validate(fn, out, completions) for fn, out in zip(fns, outputs, strict=True)]
    log.check_extra(n)
    for k, (fn, column) in enumerate(zip(fns, columns_k, strict=True)):
        if n and k not in timed_out and all(math.isnan(v) for v in column):
            _warn_all_none(fn, n)
    if not columns_k:
        return torch.empty(n, 0, dtype=torch.float32)
    return torch.tensor(columns_k, dtype=torch.float32).T.contiguous()  # [K, N] -> [N, K]
