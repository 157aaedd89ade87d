"""Built-in reward functions, with TRL's calling convention.

Each reward is called as `f(prompts=..., completions=..., completion_ids=..., **columns)` and
returns one `float` (or `None`: does not apply) per completion. Completions may be plain strings
or conversational (`[{"role": "assistant", "content": ...}]`); empty, untagged or garbage output
scores like a wrong answer and never raises. A missing dataset column does raise, naming the
column and the columns that exist.

From YAML a reward is referenced by name (a key of `REWARD_FUNCTIONS`), optionally with
parameters (`{"name": "soft_overlong_punishment", "max_completion_len": 256,
"soft_punish_cache": 64}`), or as `"module:function"` for a user's own function.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import logging
import math
import re
import threading
import traceback
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

from grpokit.data.prompts import completion_text
from grpokit.rewards.code import make_code_tests
from grpokit.sandbox import SandboxLimits, SandboxPool

logger = logging.getLogger("grpokit")

RewardFn = Callable[..., Sequence[float | None]]

EXTRACT_MODES = ("tag", "last_number")

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_NUMERIC = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+|[-+]?\d+\s*/\s*\d+"
)
_THINK_ANSWER = re.compile(r"\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*", re.DOTALL)


# ---------------------------------------------------------------------------------------------
# Parsing helpers
# ---------------------------------------------------------------------------------------------


def extract_answer(text: str, mode: str = "tag") -> str | None:
    """The answer part of a completion's text.

    Args:
        text: The completion text.
        mode: `"tag"`: the content of the last `<answer>...</answer>` pair, stripped;
            `"last_number"`: the last number in the text (for models that answer in prose).

    Returns:
        The answer string, or `None` if there is none.
    """
    if mode == "tag":
        matches = _ANSWER_TAG.findall(text)
        return matches[-1].strip() if matches else None
    if mode == "last_number":
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    raise ValueError(f"Unknown answer extraction mode {mode!r}; use one of {list(EXTRACT_MODES)}.")


def parse_number(text: str) -> float | None:
    """A number written as `42`, `-3.5`, `1,234`, `$12`, `1e-3`, `2/3` or `7.`; else `None`."""
    s = text.strip().removeprefix("$").rstrip(".").strip()
    if not _NUMERIC.fullmatch(s):
        return None
    try:
        if "/" in s:
            num, den = (part.strip() for part in s.split("/"))
            return float(Fraction(int(num), int(den)))
        return float(s.replace(",", ""))
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def _normalize(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


def answers_match(
    prediction: str, reference: Any, *, rel_tol: float = 1e-6, abs_tol: float = 1e-6
) -> bool:
    """Numeric match within tolerance when both sides are numbers, else normalised exact match.

    Normalisation strips surrounding whitespace and a final period, collapses inner whitespace and
    ignores case.
    """
    ref = str(reference)
    pred_num, ref_num = parse_number(prediction), parse_number(ref)
    if pred_num is not None and ref_num is not None:
        return math.isclose(pred_num, ref_num, rel_tol=rel_tol, abs_tol=abs_tol)
    return _normalize(prediction) == _normalize(ref)


def _column(kwargs: dict[str, Any], column: str, reward: str, n: int) -> list[Any]:
    if column not in kwargs:
        available = sorted(
            k
            for k in kwargs
            if k not in {"prompts", "completions", "completion_ids", "trainer_state"}
        )
        raise ValueError(
            f"{reward} needs the dataset column {column!r} but it is not among the columns "
            f"passed to reward functions: {available}. Map a column to {column!r} in the task "
            f"config, or set the reward's column parameter."
        )
    values = list(kwargs[column])
    if len(values) != n:
        raise ValueError(
            f"{reward}: column {column!r} has {len(values)} values for {n} completions."
        )
    return values


def _completion_lengths(completion_ids: Any, reward: str, n: int) -> list[int]:
    if completion_ids is None:
        raise ValueError(f"{reward} needs completion_ids (the completions' token ids).")
    lengths = [len(ids) for ids in completion_ids]
    if len(lengths) != n:
        raise ValueError(f"{reward}: got {len(lengths)} completion_ids for {n} completions.")
    return lengths


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


class AccuracyReward:
    """1.0 if the completion's answer matches the reference answer, else 0.0.

    The answer is read with `extract_answer(text, extract)`; numbers are compared with
    `math.isclose(rel_tol, abs_tol)`, anything else by normalised exact match. A missing reference
    (`None`) gives `None` ("does not apply").
    """

    __name__ = "accuracy_reward"

    def __init__(
        self,
        answer_column: str = "answer",
        extract: str = "tag",
        rel_tol: float = 1e-6,
        abs_tol: float = 1e-6,
    ) -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(
                f"accuracy_reward: unknown extract {extract!r}; use one of {list(EXTRACT_MODES)}."
            )
        self.answer_column = answer_column
        self.extract = extract
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol

    def is_correct(self, completion: Any, reference: Any) -> bool:
        """Whether one completion's answer matches `reference`."""
        answer = extract_answer(completion_text(completion), self.extract)
        if answer is None:
            return False
        return answers_match(answer, reference, rel_tol=self.rel_tol, abs_tol=self.abs_tol)

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        references = _column(kwargs, self.answer_column, self.__name__, len(completions))
        return [
            None if ref is None else float(self.is_correct(c, ref))
            for c, ref in zip(completions, references, strict=True)
        ]


def get_accuracy_reward(
    answer_column: str = "answer",
    extract: str = "tag",
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-6,
) -> RewardFn:
    """An answer-accuracy reward; see `AccuracyReward` for the parameters."""
    return AccuracyReward(answer_column, extract, rel_tol, abs_tol)


def accuracy_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the `<answer>` tag matches the `answer` column (numbers within 1e-6), else 0.0."""
    return AccuracyReward()(completions, **kwargs)


def _import_math_verify() -> Any:
    try:
        import math_verify
    except ImportError as error:
        raise ImportError(
            "math_accuracy_reward needs the optional package math-verify; install it with "
            "`pip install 'grpokit[tasks]'` or `pip install math-verify`."
        ) from error
    return math_verify


class MathAccuracyReward:
    """1.0 if `math-verify` finds the completion's answer equivalent to the reference, else 0.0.

    `extract="auto"` parses the `<answer>` tag's content when present, else the whole completion
    (math-verify then looks for `\\boxed{}` or a final expression); `"tag"` requires the tag.
    An unparseable reference gives `None` ("does not apply"), like TRL's `accuracy_reward`.
    """

    __name__ = "math_accuracy_reward"

    def __init__(self, answer_column: str = "answer", extract: str = "auto") -> None:
        if extract not in ("auto", "tag"):
            raise ValueError(
                f"math_accuracy_reward: unknown extract {extract!r}; use 'auto' or 'tag'."
            )
        self.math_verify = _import_math_verify()
        self.answer_column = answer_column
        self.extract = extract

    def _score(self, completion: Any, reference: Any, timeout: int | None) -> float | None:
        mv = self.math_verify
        gold = mv.parse(str(reference), parsing_timeout=timeout)
        if not gold:
            return None
        text = completion_text(completion)
        tagged = extract_answer(text, "tag")
        if tagged is None and self.extract == "tag":
            return 0.0
        pred_text = text if tagged is None else tagged
        if not pred_text.strip():
            return 0.0
        pred = mv.parse(pred_text, parsing_timeout=timeout)
        return float(bool(pred) and mv.verify(gold, pred, timeout_seconds=timeout))

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        references = _column(kwargs, self.answer_column, self.__name__, len(completions))
        # math-verify's timeouts use signal.alarm, which only works in the main thread.
        timeout = 5 if threading.current_thread() is threading.main_thread() else None
        return [
            None if ref is None else self._score(c, ref, timeout)
            for c, ref in zip(completions, references, strict=True)
        ]


def get_math_accuracy_reward(answer_column: str = "answer", extract: str = "auto") -> RewardFn:
    """A math-expression accuracy reward using `math-verify`; see `MathAccuracyReward`."""
    return MathAccuracyReward(answer_column, extract)


def math_accuracy_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """`math-verify` equivalence of the completion's answer with the `answer` column (1.0 / 0.0)."""
    return MathAccuracyReward()(completions, **kwargs)


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def answer_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 if the completion holds exactly one non-empty `<answer>...</answer>` pair, else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        single = text.count("<answer>") == 1 and text.count("</answer>") == 1
        answer = extract_answer(text, "tag")
        rewards.append(float(single and bool(answer)))
    return rewards


def think_format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """1.0 for exactly `<think>...</think>` then `<answer>...</answer>` (nothing else), else 0.0."""
    rewards = []
    for completion in completions:
        text = completion_text(completion)
        once = all(text.count(tag) == 1 for tag in ("<think>", "</think>", "<answer>", "</answer>"))
        rewards.append(float(once and _THINK_ANSWER.fullmatch(text) is not None))
    return rewards


# ---------------------------------------------------------------------------------------------
# Length and repetition
# ---------------------------------------------------------------------------------------------


class SoftOverlongPunishment:
    """DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, §3.4, Eq. 13).

    With L = `max_completion_len`, C = `soft_punish_cache` and |y| the completion's token count:
    0 if |y| <= L - C; ((L - C) - |y|) / C if L - C < |y| <= L; -1 if |y| > L.
    """

    __name__ = "soft_overlong_punishment"

    def __init__(self, max_completion_len: int, soft_punish_cache: int) -> None:
        if max_completion_len < 1 or not 0 <= soft_punish_cache <= max_completion_len:
            raise ValueError(
                "soft_overlong_punishment needs max_completion_len >= 1 and "
                f"0 <= soft_punish_cache <= max_completion_len; got {max_completion_len} and "
                f"{soft_punish_cache}."
            )
        self.max_completion_len = max_completion_len
        self.soft_punish_cache = soft_punish_cache

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        lengths = _completion_lengths(kwargs.get("completion_ids"), self.__name__, len(completions))
        limit, cache = self.max_completion_len, self.soft_punish_cache
        rewards = []
        for length in lengths:
            if length <= limit - cache:
                rewards.append(0.0)
            elif length <= limit:  # only reachable when cache > 0
                rewards.append(((limit - cache) - length) / cache)
            else:
                rewards.append(-1.0)
        return rewards


def soft_overlong_punishment(max_completion_len: int, soft_punish_cache: int) -> RewardFn:
    """DAPO Eq. 13 as a reward function; `(100, 20)` gives -0.5 for a 90-token completion."""
    return SoftOverlongPunishment(max_completion_len, soft_punish_cache)


class RepetitionPenalty:
    """Penalty for repeated n-grams: `(1 - unique / total) * max_penalty`, in [max_penalty, 0].

    After "Demystifying Long Chain-of-Thought Reasoning" (Yeo et al., 2025, arXiv 2502.03373,
    App. C.2). `unit="tokens"` counts n-grams of completion token ids; `"words"` of
    whitespace-separated words of the text. Fewer than `ngram_size` units scores 0.
    """

    __name__ = "repetition_penalty"

    def __init__(
        self, ngram_size: int = 3, max_penalty: float = -1.0, unit: str = "tokens"
    ) -> None:
        if ngram_size < 1 or max_penalty > 0 or unit not in ("tokens", "words"):
            raise ValueError(
                "repetition_penalty needs ngram_size >= 1, max_penalty <= 0 and unit 'tokens' or "
                f"'words'; got {ngram_size}, {max_penalty}, {unit!r}."
            )
        self.ngram_size = ngram_size
        self.max_penalty = max_penalty
        self.unit = unit

    def penalty(self, units: Sequence[Any]) -> float:
        """The penalty of one sequence of tokens or words."""
        n = self.ngram_size
        if len(units) < n:
            return 0.0
        ngrams = [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]
        repeated = 1.0 - len(set(ngrams)) / len(ngrams)
        return repeated * self.max_penalty if repeated else 0.0

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        if self.unit == "words":
            return [self.penalty(completion_text(c).split()) for c in completions]
        ids = kwargs.get("completion_ids")
        _completion_lengths(ids, self.__name__, len(completions))
        return [self.penalty(list(x)) for x in ids or []]


def get_repetition_penalty_reward(
    ngram_size: int = 3, max_penalty: float = -1.0, unit: str = "tokens"
) -> RewardFn:
    """An n-gram repetition penalty; see `RepetitionPenalty`."""
    return RepetitionPenalty(ngram_size, max_penalty, unit)


class CosineScaledReward:
    """Correctness scaled by length on a cosine schedule (Yeo et al., 2025, arXiv 2502.03373, C.1).

    With progress p = min(|y| / max_len, 1): reward = lo + (hi - lo) * (1 + cos(pi * p)) / 2, where
    (lo, hi) = (min_value_correct, max_value_correct) for a correct answer (short correct answers
    earn most) and (max_value_wrong, min_value_wrong) for a wrong one (short wrong answers are
    punished most, so exploring longer is cheaper). Correctness comes from `accuracy_reward`
    (`correctness="accuracy"`) or `math_accuracy_reward` (`"math"`).
    """

    __name__ = "cosine_scaled_reward"

    def __init__(
        self,
        max_len: int,
        min_value_wrong: float = -1.0,
        max_value_wrong: float = -0.5,
        min_value_correct: float = 0.5,
        max_value_correct: float = 1.0,
        correctness: str = "accuracy",
        answer_column: str = "answer",
        extract: str = "tag",
    ) -> None:
        if max_len < 1:
            raise ValueError(f"cosine_scaled_reward needs max_len >= 1, got {max_len}.")
        self.checker: RewardFn
        if correctness == "accuracy":
            self.checker = AccuracyReward(answer_column, extract)
        elif correctness == "math":
            self.checker = MathAccuracyReward(answer_column)
        else:
            raise ValueError(
                f"cosine_scaled_reward: unknown correctness {correctness!r}; use 'accuracy' or "
                "'math'."
            )
        self.max_len = max_len
        self.wrong = (max_value_wrong, min_value_wrong)
        self.correct = (min_value_correct, max_value_correct)

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        lengths = _completion_lengths(kwargs.get("completion_ids"), self.__name__, len(completions))
        rewards: list[float | None] = []
        for correct, length in zip(self.checker(completions, **kwargs), lengths, strict=True):
            if correct is None:
                rewards.append(None)
                continue
            lo, hi = self.correct if correct else self.wrong
            progress = min(length / self.max_len, 1.0)  # cos is periodic: clamp past max_len
            rewards.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))
        return rewards


def get_cosine_scaled_reward(
    max_len: int,
    min_value_wrong: float = -1.0,
    max_value_wrong: float = -0.5,
    min_value_correct: float = 0.5,
    max_value_correct: float = 1.0,
    correctness: str = "accuracy",
    answer_column: str = "answer",
    extract: str = "tag",
) -> RewardFn:
    """A cosine length-scaled correctness reward; see `CosineScaledReward` for the parameters."""
    return CosineScaledReward(
        max_len,
        min_value_wrong,
        max_value_wrong,
        min_value_correct,
        max_value_correct,
        correctness,
        answer_column,
        extract,
    )


# ---------------------------------------------------------------------------------------------
# reasoning-gym verifiers
# ---------------------------------------------------------------------------------------------


_VERIFIER_MODULE = "reasoning_gym_verifier"  # grpokit/rewards/sandboxed/reasoning_gym_verifier.py
_SANDBOXED_MODULES = Path(__file__).parent / "sandboxed"
_pools: dict[tuple[Any, ...], SandboxPool] = {}
_pools_lock = threading.Lock()


def _verifier_pool(workers: int | None, limits: SandboxLimits) -> SandboxPool:
    """One warm pool per process (and settings), shared by every `ReasoningGymScore`."""
    key = (workers, limits)
    with _pools_lock:
        if key not in _pools:
            _pools[key] = SandboxPool(
                workers,
                limits=limits,
                packages=["reasoning_gym"],
                paths=[_SANDBOXED_MODULES],
                preload=[_VERIFIER_MODULE],
            )
        return _pools[key]


def _require_reasoning_gym() -> None:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ImportError(
            "reasoning_gym_score needs the optional package reasoning-gym; install it with "
            "`pip install 'grpokit[tasks]'`."
        )


class ReasoningGymScore:
    """The reasoning-gym dataset's own verifier (`score_answer`), usually in [0, 1].

    Reads the entry (question, answer, metadata) from `entry_column` (a JSON string or a dict, as
    written by `grpokit.data.tasks`), extracts the answer from the completion (`<answer>` tag by
    default) and returns `score_answer(answer, entry)`. No answer, or a verifier that cannot
    parse the answer (it raises), scores 0.0: an answer that cannot be checked is wrong.

    Several verifiers `eval` or `sympy`-parse the answer, so they run in a `grpokit.sandbox` pool
    (one per process, started on first use), never in the trainer. A call that times out or
    crashes the sandbox scores 0.0 and is logged with its task's name. Completions of the same
    prompt never share a sandbox process, so that none can change how its group-mates are scored.

    Args:
        entry_column: The column holding the reasoning-gym entry.
        extract: How to read the answer (see `extract_answer`).
        timeout: Wall-clock seconds per verifier call.
        workers: Sandbox worker processes (default: CPU count, at most 4).
        chunk_size: Answers verified one after the other in one sandbox process (1: a process
            each; larger saves a fork per answer).
    """

    __name__ = "reasoning_gym_score"

    def __init__(
        self,
        entry_column: str = "reasoning_gym_entry",
        extract: str = "tag",
        timeout: float = 10.0,
        workers: int | None = None,
        chunk_size: int = 8,
    ) -> None:
        if extract not in EXTRACT_MODES:
            raise ValueError(
                f"reasoning_gym_score: unknown extract {extract!r}; "
                f"use one of {list(EXTRACT_MODES)}."
            )
        if not timeout > 0 or chunk_size < 1 or (workers is not None and workers < 1):
            raise ValueError(
                "reasoning_gym_score needs timeout > 0, chunk_size >= 1 and workers >= 1; got "
                f"{timeout}, {chunk_size}, {workers}."
            )
        _require_reasoning_gym()
        self.entry_column = entry_column
        self.extract = extract
        self.workers = workers
        self.chunk_size = chunk_size
        self.limits = SandboxLimits(timeout=timeout, cpu_seconds=max(1, math.ceil(timeout)))
        self._warmed: set[str] = set()

    def _pool(self, datasets: set[str]) -> SandboxPool:
        pool = _verifier_pool(self.workers, self.limits)
        new = sorted(datasets - self._warmed)
        if new:  # build the verifiers once in each worker, not in every call's child
            pool.warm(_VERIFIER_MODULE, "warm", [new])
            self._warmed.update(new)
        return pool

    def __call__(self, completions: Sequence[Any], **kwargs: Any) -> list[float]:
        raws = _column(kwargs, self.entry_column, self.__name__, len(completions))
        rewards = [0.0] * len(completions)
        rows: list[int] = []
        tasks: list[str] = []
        calls: list[tuple[str, str, list[Any]]] = []
        keys: list[str] = []
        for row, (completion, raw) in enumerate(zip(completions, raws, strict=True)):
            answer = extract_answer(completion_text(completion), self.extract)
            if answer is None:
                continue
            entry = json.loads(raw) if isinstance(raw, str) else dict(raw)
            rows.append(row)
            tasks.append(entry["metadata"]["source_dataset"])
            calls.append((_VERIFIER_MODULE, "score", [answer, entry]))
            keys.append(raw if isinstance(raw, str) else json.dumps(entry, sort_keys=True))
        if not calls:
            return rewards
        results = self._pool(set(tasks)).map_calls(calls, chunk_size=self.chunk_size, keys=keys)
        failed: dict[str, list[str]] = {}
        for row, task, result in zip(rows, tasks, results, strict=True):
            if result.ok and isinstance(result.value, (int, float)):
                rewards[row] = float(result.value)
            elif result.crashed:  # an exception from the verifier is just a wrong answer
                failed.setdefault(task, []).append(result.error or "failed")
        for task, errors in failed.items():
            logger.warning(
                "reasoning_gym_score: %d verifier call(s) for task %r failed in the sandbox (%s); "
                "scored 0.0",
                len(errors),
                task,
                "; ".join(sorted(set(errors))),
            )
        return rewards


def get_reasoning_gym_score(
    entry_column: str = "reasoning_gym_entry",
    extract: str = "tag",
    timeout: float = 10.0,
    workers: int | None = None,
    chunk_size: int = 8,
) -> RewardFn:
    """The reasoning-gym verifier, run in the sandbox, as a reward; see `ReasoningGymScore`."""
    return ReasoningGymScore(entry_column, extract, timeout, workers, chunk_size)


def reasoning_gym_score(completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Score `<answer>` with the reasoning-gym verifier of each row's `reasoning_gym_entry`."""
    return ReasoningGymScore()(completions, **kwargs)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _without_parameters(fn: RewardFn) -> Callable[[], RewardFn]:
    def factory() -> RewardFn:
        return fn

    factory.__doc__ = fn.__doc__
    return factory


REWARD_FUNCTIONS: dict[str, Callable[..., RewardFn]] = {
    "accuracy_reward": get_accuracy_reward,
    "math_accuracy_reward": get_math_accuracy_reward,
    "answer_format_reward": _without_parameters(answer_format_reward),
    "think_format_reward": _without_parameters(think_format_reward),
    "soft_overlong_punishment": soft_overlong_punishment,
    "repetition_penalty": get_repetition_penalty_reward,
    "cosine_scaled_reward": get_cosine_scaled_reward,
    "reasoning_gym_score": get_reasoning_gym_score,
    "code_tests": make_code_tests,
}
"""Built-in rewards by name: each value is a factory taking the reward's parameters."""


def _where(error: BaseException) -> str:
    """`" at FILE:LINE"` of the innermost frame of `error`'s traceback (or of a SyntaxError)."""
    if isinstance(error, SyntaxError) and error.filename:
        return f" at {error.filename}:{error.lineno}"
    frames = traceback.extract_tb(error.__traceback__)
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def import_user_callable(ref: str, what: str = "reward") -> Any:
    """The callable a `"module:function"` reference names (`function` may be dotted).

    Args:
        ref: `"package.module:function"`.
        what: What the callable is for, named in the messages ("reward", "tool", ...).

    Raises:
        ValueError: a malformed reference, a module that is not on the import path or fails to
            import (with where it failed and the fix), a missing attribute, or not a callable.
    """
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {ref!r}: a user function is written 'module:function'.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is not None and f"{module_name}.".startswith(f"{error.name}."):
            raise ValueError(
                f"{what} {ref!r}: no module {module_name!r} on the import path. The grpokit "
                "command looks in the current folder and the config file's folder; otherwise "
                "add its folder to PYTHONPATH or install it."
            ) from error
        raise ValueError(
            f"{what} {ref!r}: importing module {module_name!r} failed: {error} (install the "
            "missing package or fix the import)."
        ) from error
    except Exception as error:  # the user's module raised while it was imported
        raise ValueError(
            f"{what} {ref!r}: importing module {module_name!r} failed: "
            f"{type(error).__name__}: {error}{_where(error)} (fix the module)."
        ) from error
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {ref!r}: module {module_name!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {ref!r} is a {type(obj).__name__}, not a callable.")
    return obj


def get_reward_function(spec: str | dict[str, Any]) -> RewardFn:
    """Resolve a reward given by name, by name with parameters, or as `"module:function"`.

    Args:
        spec: `"accuracy_reward"`, `"my_pkg.rewards:my_reward"`, or a dict with `"name"` plus the
            factory's parameters, e.g. `{"name": "soft_overlong_punishment",
            "max_completion_len": 256, "soft_punish_cache": 64}`. Parameters given with a
            `module:function` name are passed to that function, which must then return the
            reward function.

    Returns:
        A callable with TRL's reward-function calling convention.

    Raises:
        ValueError: Unknown name (the valid names are listed), unimportable user function, or
            parameters the factory does not accept.
    """
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        params = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise ValueError(
            f"reward spec {spec!r} must be a name or a dict with a 'name' key and parameters."
        )
    if ":" in name:
        obj = import_user_callable(name)
        return obj(**params) if params else obj
    if name not in REWARD_FUNCTIONS:
        raise ValueError(
            f"Unknown reward function {name!r}. Built-in rewards: {sorted(REWARD_FUNCTIONS)}; "
            "a function of your own is written 'module:function'."
        )
    factory = REWARD_FUNCTIONS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(**params)
    except TypeError as error:
        raise ValueError(
            f"reward {name!r}: bad parameters {sorted(params)} ({error}). It accepts: "
            f"{list(signature.parameters) or 'no parameters'}."
        ) from error
    return factory(**params)
