"""Reward functions and reward models into one validated [N, K] tensor."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
from typing import Any

import numpy as np
import pytest
import torch

from grpokit.data.prompts import format_completions
from grpokit.rewards.scoring import (
    CallableReward,
    RewardFunctionError,
    RewardModel,
    RewardTimeoutError,
    build_reward_functions,
    compute_rewards,
)
from tests.tiny import make_reward_model, make_tokenizer

PROMPTS = ["1+1=", "What is 2+2? ", "3+3="]  # different lengths: padding matters
COMPLETIONS = ["2", "5", "6"]
IDS = [[10], [11], [12]]
COLUMNS = {"answer": ["2", "4", "6"]}


def exact(completions: list[str], answer: list[str], **kwargs: Any) -> list[float]:
    return [float(c == a) for c, a in zip(completions, answer, strict=True)]


async def async_length(completions: list[str], completion_ids: list[list[int]], **kwargs: Any):
    await asyncio.sleep(0)
    return [float(len(ids)) for ids in completion_ids]


def rewards_of(fns: Any, **overrides: Any) -> torch.Tensor:
    kwargs: dict[str, Any] = dict(
        prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, columns=COLUMNS
    )
    kwargs.update(overrides)
    return compute_rewards(build_reward_functions(fns), **kwargs)


def manual_scores(model: torch.nn.Module, tokenizer: Any, texts: list[str]) -> list[float]:
    """One unpadded forward per text: the reference the batched path must match."""
    scores = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            scores.append(model(**ids).logits[0, 0].item())
    return scores


def test_sync_async_and_reward_model_together() -> None:
    tok = make_tokenizer()
    model = make_reward_model(tok)
    fns = build_reward_functions(
        [exact, async_length, model], [None, None, tok], device="cpu", batch_size=2
    )
    assert [f.name for f in fns] == ["exact", "async_length", "LlamaForSequenceClassification"]
    seen: dict[str, Any] = {}

    def spy(**kwargs: Any) -> list[float]:
        seen.update(kwargs)
        return [0.0] * 3

    rewards = compute_rewards(
        [*fns, spy],
        prompts=PROMPTS,
        completions=COMPLETIONS,
        completion_ids=IDS,
        columns=COLUMNS,
        trainer_state="state",
    )
    assert rewards.shape == (3, 4) and rewards.dtype == torch.float32
    assert rewards[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert rewards[:, 1].tolist() == [1.0, 1.0, 1.0]
    # Batches of 2 with right padding equal one unpadded forward per prompt + completion.
    expected = manual_scores(model, tok, [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)])
    torch.testing.assert_close(rewards[:, 2], torch.tensor(expected), atol=1e-5, rtol=1e-5)
    # TRL's convention: keyword arguments, every column, trainer_state, log_metric, log_extra.
    assert set(seen) == {
        "prompts",
        "completions",
        "completion_ids",
        "trainer_state",
        "log_metric",
        "log_extra",
        "answer",
    }
    assert seen["trainer_state"] == "state"


def test_reward_model_conversational_uses_chat_template() -> None:
    tok = make_tokenizer()
    model = make_reward_model(tok)
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    prefilled = [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "o"}]
    completions = format_completions([prompts[0], prefilled], ["hello", "k"])
    reward = RewardModel(model, tok, batch_size=8)
    texts = reward.texts([prompts[0], prefilled], completions)
    assert texts == [
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
        # The prefill is part of the completion, so it is not repeated from the prompt.
        "<|im_start|>user\nyo<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n",
    ]
    got = reward([prompts[0], prefilled], completions, [[1], [2]])
    assert got == pytest.approx(manual_scores(model, tok, texts), abs=1e-5)


def test_reward_model_from_path_with_its_tokenizer(tmp_path: Any) -> None:
    tok = make_tokenizer()
    model = make_reward_model(tok)
    path = tmp_path / "my-rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    (fn,) = build_reward_functions(str(path))
    assert fn.name == "my-rm"
    got = compute_rewards([fn], prompts=["a"], completions=["b"], completion_ids=[[1]], columns={})
    assert got[0, 0].item() == pytest.approx(manual_scores(model, tok, ["ab"])[0], abs=1e-5)


def test_names_strings_and_alignment() -> None:
    fns = build_reward_functions([exact, exact, functools.partial(exact), "answer_format_reward"])
    assert [f.name for f in fns] == ["exact", "exact_2", "exact_3", "answer_format_reward"]
    with pytest.raises(ValueError, match="reward_processing_classes has 1 entries but"):
        build_reward_functions([exact, exact], [None])
    with pytest.raises(TypeError, match=r"reward_funcs\[0\] is a int"):
        build_reward_functions([3])
    with pytest.raises(ValueError, match="pass its tokenizer in reward_processing_classes"):
        build_reward_functions([make_reward_model(make_tokenizer())])


def test_none_is_nan_and_number_types() -> None:
    def mixed(completions: list[str], **kwargs: Any) -> list[Any]:
        return [None, True, np.float32(0.5)]

    def tensor_out(completions: list[str], **kwargs: Any) -> torch.Tensor:
        return torch.tensor([1.0, 2.0, 3.0])

    rewards = rewards_of([mixed, tensor_out])
    assert math.isnan(rewards[0, 0]) and rewards[1:, 0].tolist() == [1.0, 0.5]
    assert rewards[:, 1].tolist() == [1.0, 2.0, 3.0]


def test_async_functions_run_concurrently() -> None:
    # Each waits for the other to have started: only finishes if both run at the same time.
    started: list[str] = []

    def make(name: str) -> Any:
        async def fn(completions: list[str], **kwargs: Any) -> list[float]:
            started.append(name)
            for _ in range(100):
                if len(started) == 2:
                    return [1.0] * len(completions)
                await asyncio.sleep(0)
            raise RuntimeError("not concurrent")

        fn.__name__ = name
        return fn

    assert rewards_of([make("a"), make("b")]).sum().item() == 6.0


def test_works_inside_a_running_event_loop() -> None:
    async def main() -> torch.Tensor:
        return rewards_of([async_length])

    assert asyncio.run(main())[:, 0].tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------------------------
# Errors: each names the function and the problem
# ---------------------------------------------------------------------------------------------


def test_raising_function_names_sample_and_chains() -> None:
    def fragile(completions: list[str], **kwargs: Any) -> list[float]:
        return [1.0 / (int(c) - 5) for c in completions]  # sample 1 ("5") divides by zero

    with pytest.raises(RewardFunctionError) as info:
        rewards_of([exact, fragile])
    message = str(info.value)
    assert "'fragile' raised ZeroDivisionError" in message
    assert "sample 1 (prompt: 'What is 2+2? ', completion: '5')" in message
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert info.value.function_name == "fragile" and info.value.index == 1


def test_raising_async_function() -> None:
    async def broken(completions: list[str], **kwargs: Any) -> list[float]:
        if "6" in completions:
            raise KeyError("six")
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'broken' raised KeyError.*sample 2"):
        rewards_of([broken])


def test_missing_kwargs_gets_a_hint() -> None:
    def no_kwargs(completions: list[str]) -> list[float]:
        return [0.0] * len(completions)

    with pytest.raises(RewardFunctionError, match=r"'no_kwargs' raised TypeError.*add \*\*kwargs"):
        rewards_of([no_kwargs])


@pytest.mark.parametrize(
    ("output", "pattern"),
    [
        ([1.0, 2.0], r"'bad' returned 2 values for 3 completions"),
        (1.0, r"'bad' returned a float; it must return a list of 3"),
        ("abc", r"'bad' returned a str"),
        ([1.0, "x", 0.0], r"'bad' returned a non-number 'x' \(str\) for sample 1"),
        ([1.0, 2.0, [3.0]], r"'bad' returned a non-number \[3.0\] \(list\) for sample 2"),
        ([1.0, math.nan, 0.0], r"'bad' returned NaN for sample 1.*return None \(not NaN\)"),
        ([math.inf, 0.0, 0.0], r"'bad' returned inf for sample 0.*must be finite"),
    ],
)
def test_bad_outputs(output: Any, pattern: str) -> None:
    def bad(completions: list[str], **kwargs: Any) -> Any:
        return output

    with pytest.raises(RewardFunctionError, match=pattern):
        rewards_of([bad])


def test_input_length_and_column_clash_errors() -> None:
    with pytest.raises(ValueError, match="3 completions but 2 entries in column 'answer'"):
        rewards_of([exact], columns={"answer": ["1", "2"]})
    with pytest.raises(ValueError, match=r"columns \['completions'\] clash"):
        rewards_of([exact], columns={"completions": [1, 2, 3]})


def test_callable_reward_wraps_objects() -> None:
    class Scorer:
        def __call__(self, completions: list[str], **kwargs: Any) -> list[float]:
            return [0.0] * len(completions)

    assert CallableReward(Scorer()).name == "Scorer"


# ---------------------------------------------------------------------------------------------
# Timeouts and functions that never apply
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def release() -> Any:
    """An event that blocked reward functions wait on; set at teardown so their threads end."""
    event = threading.Event()
    yield event
    event.set()


def test_a_sync_call_past_the_timeout_is_an_error_naming_it(release: threading.Event) -> None:
    def stuck(completions: list[str], **kwargs: Any) -> list[float]:
        release.wait()
        return [0.0] * len(completions)

    with pytest.raises(RewardTimeoutError) as info:
        rewards_of([exact, stuck], timeout=0.2)
    message = str(info.value)
    assert "'stuck' did not return within reward_timeout=0.2 s on a batch of 3" in message
    assert "reward_timeout_policy='nan'" in message and "cannot be stopped" in message
    assert info.value.function_name == "stuck"
    assert isinstance(info.value, RewardFunctionError)


def test_timeout_policy_nan_scores_the_batch_as_not_applicable(
    release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled: list[bool] = []

    def stuck(completions: list[str], **kwargs: Any) -> list[float]:
        release.wait()
        return [0.0] * len(completions)

    async def stuck_async(completions: list[str], **kwargs: Any) -> list[float]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return [0.0] * len(completions)

    with caplog.at_level(logging.WARNING, logger="grpokit"):
        rewards = rewards_of(
            [exact, stuck, async_length, stuck_async], timeout=0.2, timeout_policy="nan"
        )
    assert rewards[:, 0].tolist() == [1.0, 0.0, 1.0]  # the others are scored as usual
    assert rewards[:, 2].tolist() == [1.0, 1.0, 1.0]
    assert torch.isnan(rewards[:, 1]).all() and torch.isnan(rewards[:, 3]).all()
    assert cancelled == [True]  # the async call was cancelled, not left running
    warned = [r.getMessage() for r in caplog.records]
    assert sum("did not return within reward_timeout=0.2 s" in m for m in warned) == 2
    assert not any("returned None for all" in m for m in warned)  # timed out, not None


def test_with_a_timeout_calls_run_in_a_worker_thread_and_keep_their_errors() -> None:
    threads: list[str] = []

    def where(completions: list[str], **kwargs: Any) -> list[float]:
        threads.append(threading.current_thread().name)
        return [1.0] * len(completions)

    def raises_timeout_itself(completions: list[str], **kwargs: Any) -> list[float]:
        raise TimeoutError("from an HTTP client")

    assert rewards_of([where], timeout=5.0).sum().item() == 3.0
    assert threads == ["reward where"]
    # The function's own TimeoutError is its error (with the failing sample), not our timeout.
    with pytest.raises(RewardFunctionError, match="raised TimeoutError: from an HTTP client") as e:
        rewards_of([raises_timeout_itself], timeout=5.0)
    assert not isinstance(e.value, RewardTimeoutError)
    assert rewards_of([where])[:, 0].tolist() == [1.0] * 3  # no timeout: the caller's thread
    assert threads[-1] == threading.main_thread().name
    with pytest.raises(ValueError, match="timeout_policy must be one of"):
        rewards_of([where], timeout=1.0, timeout_policy="skip")


def test_a_function_that_returns_none_for_a_whole_batch_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def never(completions: list[str], **kwargs: Any) -> list[float | None]:
        return [None] * len(completions)

    def sometimes(completions: list[str], **kwargs: Any) -> list[float | None]:
        return [None, 1.0, None]

    fns = build_reward_functions([never, sometimes])
    kwargs: dict[str, Any] = dict(
        prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS, columns=COLUMNS
    )
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        for _ in range(5):
            compute_rewards(fns, **kwargs)
    warned = [r.getMessage() for r in caplog.records]
    # Warned at its 1st, 2nd and 4th such batch, each time with the count; never for `sometimes`.
    assert [m.split("(")[1].split(" so far")[0] for m in warned] == [
        "1 such batch",
        "2 such batches",
        "4 such batches",
    ]
    assert all("'never' returned None for all 3 completions" in m for m in warned)
    assert fns[0].all_none_batches == 5 and fns[1].all_none_batches == 0
