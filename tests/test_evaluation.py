"""Held-out evaluation: pass@k against the combinatorial formula, metrics worked out by hand, and
`evaluate` end to end on a tiny model with hand-made reward functions."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset

from grpokit.app.evaluation import evaluate, pass_at_k, pass_at_k_values, summarize
from grpokit.engines.base import SamplingParams
from tests.tiny import make_causal_lm, make_tokenizer


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_matches_combinatorial_formula(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_hand_values():
    # n=4, c=1, k=2: 1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    # n=4, c=2, k=2: 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    # pass@1 is the fraction correct
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)


def test_pass_at_k_values():
    assert pass_at_k_values(1) == [1]
    assert pass_at_k_values(4) == [1, 2, 4]
    assert pass_at_k_values(6) == [1, 2, 4, 6]


def test_summarize_by_hand():
    nan = math.nan
    # 2 prompts x k=2 samples; columns: correctness, format (None on one sample).
    rewards = torch.tensor(
        [
            [1.0, 0.5],  # prompt 0: correct
            [0.0, nan],  # prompt 0: wrong, format n/a
            [0.0, 0.5],  # prompt 1: wrong
            [0.9, 1.0],  # prompt 1: partial credit, not >= 1.0 -> wrong
        ]
    )
    metrics = summarize(
        rewards,
        lengths=torch.tensor([3.0, 5.0, 7.0, 9.0]),
        is_truncated=torch.tensor([0.0, 0.0, 1.0, 0.0]),
        names=["acc", "fmt"],
        num_samples=2,
        weights=torch.tensor([1.0, 2.0]),
    )
    # weighted sums (NaN -> 0): 1+1=2, 0, 0+1=1, 0.9+2=2.9 -> mean 5.9/4
    assert metrics["reward"] == pytest.approx(5.9 / 4)
    totals = torch.tensor([2.0, 0.0, 1.0, 2.9])
    assert metrics["reward_std"] == pytest.approx(totals.std(unbiased=False).item())
    assert metrics["rewards/acc"] == pytest.approx(1.9 / 4)
    assert metrics["rewards/fmt"] == pytest.approx(2.0 / 3)  # NaN skipped
    assert metrics["accuracy"] == pytest.approx(0.25)
    assert metrics["pass@1"] == pytest.approx(0.25)  # (1/2 + 0/2) / 2
    assert metrics["pass@2"] == pytest.approx(0.5)  # prompt 0 solved, prompt 1 not
    assert metrics["completion_length"] == pytest.approx(6.0)
    assert metrics["clipped_ratio"] == pytest.approx(0.25)
    assert metrics["num_prompts"] == 2


def test_summarize_threshold_and_none_as_incorrect():
    rewards = torch.tensor([[0.9], [math.nan], [1.0]])
    ones = torch.ones(3)
    low = summarize(rewards, ones, ones * 0, names=["a"], num_samples=1, accuracy_threshold=0.5)
    assert low["accuracy"] == pytest.approx(2 / 3)
    strict = summarize(rewards, ones, ones * 0, names=["a"], num_samples=1)
    assert strict["accuracy"] == pytest.approx(1 / 3)


class Recorder:
    """A reward that is 1 when the completion contains `char`, recording what it was shown."""

    def __init__(self, char: str) -> None:
        self.char = char
        self.__name__ = f"has_{char}"
        self.calls: list[dict] = []

    def __call__(self, prompts, completions, completion_ids, target, **kwargs):
        self.calls.append(
            dict(prompts=prompts, completions=completions, ids=completion_ids, target=target)
        )
        return [float(self.char in c) for c in completions]


def _dataset(n: int = 5) -> Dataset:
    return Dataset.from_dict(
        {"prompt": [f"Q{i}: " for i in range(n)], "target": [str(i) for i in range(n)]}
    )


def test_evaluate_end_to_end_numbers_match_the_samples():
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    recorder = Recorder("e")

    def length_reward(completions, **kwargs):
        return [len(c) / 10 for c in completions]

    k = 4
    metrics = evaluate(
        model,
        tok,
        _dataset(5),
        [recorder, length_reward],
        num_samples=k,
        max_completion_length=12,
        sampling=SamplingParams(temperature=1.0),
        batch_size=8,  # 2 prompts per call -> 3 calls
    )
    assert len(recorder.calls) == 3
    completions = [c for call in recorder.calls for c in call["completions"]]
    prompts = [p for call in recorder.calls for p in call["prompts"]]
    targets = [t for call in recorder.calls for t in call["target"]]
    ids = [i for call in recorder.calls for i in call["ids"]]
    assert len(completions) == 5 * k
    # the k completions of a prompt are consecutive, and columns follow their prompt
    assert prompts == [f"Q{i}: " for i in range(5) for _ in range(k)]
    assert targets == [str(i) for i in range(5) for _ in range(k)]

    correct = [("e" in c) for c in completions]
    assert metrics["accuracy"] == pytest.approx(sum(correct) / len(correct))
    counts = [sum(correct[i * k : (i + 1) * k]) for i in range(5)]
    for j in (1, 2, 4):
        expected = sum(1 - math.comb(k - c, j) / math.comb(k, j) for c in counts) / 5
        assert metrics[f"pass@{j}"] == pytest.approx(expected)
    lengths = [len(c) / 10 for c in completions]
    assert metrics["reward"] == pytest.approx((sum(correct) + sum(lengths)) / len(correct))
    assert metrics["rewards/length_reward"] == pytest.approx(sum(lengths) / len(lengths))
    assert metrics["completion_length"] == pytest.approx(sum(map(len, ids)) / len(ids))
    eos = tok.eos_token_id
    truncated = [len(i) == 12 and i[-1] != eos for i in ids]
    assert metrics["clipped_ratio"] == pytest.approx(sum(truncated) / len(truncated))


def test_evaluate_is_seeded_and_leaves_global_rng_alone():
    tok = make_tokenizer()
    model = make_causal_lm(tok)

    def run():
        return evaluate(
            model, tok, _dataset(3), [Recorder("a")], num_samples=2, max_completion_length=8
        )

    torch.manual_seed(123)
    first = run()
    after_eval = torch.rand(1)
    second = run()
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after_eval)  # evaluate did not consume the caller's RNG
    assert first == second  # seeded: the same samples whatever the caller's RNG state


def test_evaluate_greedy_by_default_and_accuracy_reward_by_name():
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    calls = Recorder("e")

    def always(completions, **kwargs):
        return [1.0] * len(completions)

    a = evaluate(model, tok, _dataset(2), [calls, always], max_completion_length=6, seed=1)
    b = evaluate(model, tok, _dataset(2), [calls, always], max_completion_length=6, seed=2)
    assert calls.calls[0]["completions"] == calls.calls[1]["completions"]  # greedy: seed-free
    assert a["accuracy"] == b["accuracy"]
    by_name = evaluate(
        model, tok, _dataset(2), [calls, always], max_completion_length=6, accuracy_reward="always"
    )
    assert by_name["accuracy"] == 1.0
    with pytest.raises(ValueError, match="not one of the reward functions"):
        evaluate(model, tok, _dataset(2), [always], accuracy_reward="nope")
    with pytest.raises(ValueError, match="one weight per function"):
        evaluate(model, tok, _dataset(2), [always], reward_weights=[1.0, 2.0])


def test_evaluate_conversational_prompts():
    tok = make_tokenizer()
    model = make_causal_lm(tok)
    seen = Recorder("x")
    data = Dataset.from_dict({"prompt": [[{"role": "user", "content": "hi"}]], "target": ["1"]})
    metrics = evaluate(model, tok, data, [seen], max_completion_length=5)
    completion = seen.calls[0]["completions"][0]
    assert isinstance(completion, list) and completion[0]["role"] == "assistant"
    assert metrics["num_prompts"] == 1
