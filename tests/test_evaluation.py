"""Held-out evaluation: pass@k against the combinatorial formula, metrics worked out by hand, and
`evaluate` end to end on a tiny model with hand-made reward functions."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from datasets import Dataset

from grpokit.app.evaluation import evaluate, pass_at_k, pass_at_k_values, summarize
from grpokit.engines.base import SamplingParams
from grpokit.train.config import GRPOConfig
from grpokit.train.rollout import RolloutPipeline
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
    with pytest.raises(ValueError, match="reward_weights has 2 entries but there are 1 reward"):
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


# ---- any GenerationEngine, and the prompt-length policy ----------------------------------------
class ScriptedEngine:
    """A deterministic `GenerationEngine`: the completions of each prompt are fixed texts (looked
    up by the prompt's decoded text, `default` for any other prompt), encoded with the tokenizer,
    ended by EOS, and cut at `max_new_tokens` (then without EOS: truncated). Records each call."""

    def __init__(self, tokenizer, script: dict[str, list[str]], default: list[str] | None = None):
        self.tokenizer = tokenizer
        self.script = script
        self.default = default
        self.calls: list[dict] = []

    def generate(self, prompt_ids, *, num_generations, max_new_tokens, sampling):
        from grpokit.engines.base import GenerationOutput, completion_mask_from_ids, left_pad

        tok = self.tokenizer
        texts = [tok.decode(ids) for ids in prompt_ids]
        self.calls.append(dict(prompts=texts, g=num_generations, max_new_tokens=max_new_tokens))
        rows = []
        for text in texts:
            completions = self.script.get(text, self.default)
            assert completions is not None and len(completions) == num_generations, text
            for completion in completions:
                ids = tok(completion, add_special_tokens=False)["input_ids"]
                rows.append([*ids, tok.eos_token_id][:max_new_tokens])
        width = max(map(len, rows))
        raw = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        for i, ids in enumerate(rows):
            raw[i, : len(ids)] = torch.tensor(ids)
        completion_ids, completion_mask, is_truncated = completion_mask_from_ids(
            raw, [tok.eos_token_id], tok.pad_token_id
        )
        prompt, prompt_mask = left_pad(prompt_ids, tok.pad_token_id)
        return GenerationOutput(
            prompt.repeat_interleave(num_generations, 0),
            prompt_mask.repeat_interleave(num_generations, 0),
            completion_ids,
            completion_mask,
            is_truncated,
        )

    def update_weights(self, model) -> None:
        pass


def exact_match(completions, target, **kwargs):
    return [float(c == t) for c, t in zip(completions, target, strict=True)]


def digit(completions, **kwargs):
    """0.5 for an all-digit answer; None (does not apply) otherwise."""
    return [0.5 if c.isdigit() else None for c in completions]


SUMS = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3="], "target": ["2", "4", "6"]})
SUM_SCRIPT = {
    "1+1=": ["2", "2", "3", "2"],  # 3 of 4 correct
    "2+2=": ["5", "6", "4", "77"],  # 1 of 4 correct; "77" + EOS does not fit in 2 tokens
    "3+3=": ["0", "1", "x", "3"],  # none correct; "x" is not a digit
}


def test_evaluate_with_an_injected_engine_by_hand():
    tok = make_tokenizer()
    engine = ScriptedEngine(tok, SUM_SCRIPT)
    metrics = evaluate(
        None,
        tok,
        SUMS,
        [exact_match, digit],
        engine=engine,
        num_samples=4,
        max_completion_length=2,
        batch_size=8,  # 2 prompts per generate call
    )
    assert [c["prompts"] for c in engine.calls] == [["1+1=", "2+2="], ["3+3="]]
    assert all(c["g"] == 4 and c["max_new_tokens"] == 2 for c in engine.calls)
    # correct per prompt c = 3, 1, 0 of n = 4: accuracy = 4/12
    assert metrics["accuracy"] == pytest.approx(4 / 12)
    # pass@1 = mean(3/4, 1/4, 0) = 1/3
    assert metrics["pass@1"] == pytest.approx(1 / 3)
    # pass@2 = 1 - C(4-c, 2)/C(4, 2): c=3 -> 1 - 0/6 = 1; c=1 -> 1 - 3/6 = 0.5; c=0 -> 0
    assert metrics["pass@2"] == pytest.approx((1 + 0.5 + 0) / 3)
    # pass@4: c=3 -> 1; c=1 -> 1 - C(3, 4)/1 = 1; c=0 -> 0
    assert metrics["pass@4"] == pytest.approx(2 / 3)
    # digit: 0.5 on the 11 all-digit answers (the cut "77" is two tokens '7', '7', no EOS), None
    # on "x": the mean over the 11 it applies to is 0.5
    assert metrics["rewards/digit"] == pytest.approx(0.5)
    assert metrics["rewards/exact_match"] == pytest.approx(4 / 12)
    # reward = (4 correct + 11 * 0.5 + 0 for "x") / 12
    assert metrics["reward"] == pytest.approx((4 + 5.5) / 12)
    assert metrics["completion_length"] == pytest.approx(2.0)  # every answer: 1 char + EOS, or 2
    assert metrics["clipped_ratio"] == pytest.approx(1 / 12)  # "77" ended without EOS
    assert metrics["num_prompts"] == 3 and metrics["prompts/over_length"] == 0


@pytest.mark.parametrize("policy", ["truncate_left", "skip"])
def test_evaluate_applies_the_prompt_length_policy(policy, caplog):
    tok = make_tokenizer()
    data = Dataset.from_dict(
        {"prompt": ["1+1=", "what is 2+2=", "3+3="], "target": ["2", "4", "6"]}
    )
    # The long prompt (12 tokens) becomes its last 4 tokens "2+2=" when truncated.
    engine = ScriptedEngine(tok, SUM_SCRIPT)
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        metrics = evaluate(
            None,
            tok,
            data,
            [exact_match],
            engine=engine,
            num_samples=4,
            max_completion_length=2,
            batch_size=12,
            max_prompt_length=4,
            prompt_length_policy=policy,
        )
    assert metrics["prompts/over_length"] == 1
    assert "1 prompt(s) longer than max_prompt_length=4" in caplog.text
    if policy == "truncate_left":
        assert engine.calls[0]["prompts"] == ["1+1=", "2+2=", "3+3="]
        # the same samples as SUMS: c = 3, 1, 0
        assert metrics["num_prompts"] == 3
        assert metrics["accuracy"] == pytest.approx(4 / 12)
    else:
        assert engine.calls[0]["prompts"] == ["1+1=", "3+3="]
        # only prompts 0 and 2: c = 3, 0 -> accuracy 3/8, pass@2 = (1 + 0) / 2
        assert metrics["num_prompts"] == 2
        assert metrics["accuracy"] == pytest.approx(3 / 8)
        assert metrics["pass@2"] == pytest.approx(0.5)


def test_evaluate_every_prompt_skipped_is_an_error():
    tok = make_tokenizer()
    engine = ScriptedEngine(tok, SUM_SCRIPT)
    with pytest.raises(ValueError, match="max_prompt_length=2"):
        evaluate(
            None,
            tok,
            SUMS,
            [exact_match],
            engine=engine,
            max_prompt_length=2,
            prompt_length_policy="skip",
        )
    assert engine.calls == []  # nothing reached the engine
    with pytest.raises(ValueError, match="a model or an engine"):
        evaluate(None, tok, SUMS, [exact_match])


def test_trainer_evaluation_and_evaluate_share_one_path(tmp_path):
    """`GRPOTrainer.evaluate` (in-training) and `evaluate` (held-out) sample, decode and score
    through the same path: on the same engine they see the same completions and rewards."""
    from grpokit import GRPOConfig, GRPOTrainer

    tok = make_tokenizer()
    data = Dataset.from_dict({"prompt": ["so, 1+1=", "2+2=", "3+3="], "target": ["2", "4", "6"]})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        num_generations=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        max_completion_length=2,
        max_prompt_length=4,  # "so, 1+1=" -> "1+1="
        bf16=False,
        report_to="none",
    )
    trainer_engine = ScriptedEngine(tok, SUM_SCRIPT)
    trainer = GRPOTrainer(
        make_causal_lm(tok),
        [exact_match],
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tok,
        generation_engine=trainer_engine,
    )
    in_training = trainer.evaluate()
    engine = ScriptedEngine(tok, SUM_SCRIPT)
    held_out = evaluate(
        None,
        tok,
        data,
        [exact_match],
        engine=engine,
        num_samples=4,
        max_completion_length=2,
        batch_size=8,
        max_prompt_length=4,
    )
    assert (
        trainer_engine.calls
        == engine.calls
        == [
            dict(prompts=["1+1=", "2+2="], g=4, max_new_tokens=2),
            dict(prompts=["3+3="], g=4, max_new_tokens=2),
        ]
    )
    # 4 of 12 correct (see test_evaluate_with_an_injected_engine_by_hand); 2 tokens each
    assert in_training["eval_reward"] == held_out["reward"] == pytest.approx(4 / 12)
    assert in_training["eval_completions/mean_length"] == held_out["completion_length"] == 2.0
    assert trainer.state.prompts_over_length == 0  # evaluation does not count as training


def test_the_pipeline_of_a_config_for_training_and_for_evaluation():
    # Training and evaluation share RolloutPipeline.from_config; only G and the columns differ.
    cfg = GRPOConfig(
        num_generations=4,
        num_generations_eval=2,
        remove_unused_columns=True,
        max_completion_length=7,
        max_prompt_length=5,
        prompt_length_policy="skip",
        reward_timeout=3.0,
    )
    parts = dict(engine=None, tokenizer=None, reward_funcs=[], sampling=SamplingParams())
    train = RolloutPipeline.from_config(cfg, **parts)
    held_out = RolloutPipeline.from_config(cfg, evaluation=True, **parts)
    assert (train.num_generations, train.keep_columns) == (4, False)
    assert (held_out.num_generations, held_out.keep_columns) == (2, True)
    for pipeline in (train, held_out):
        assert (pipeline.max_new_tokens, pipeline.prompt_limit) == (7, 5)
        assert (pipeline.prompt_length_policy, pipeline.reward_timeout) == ("skip", 3.0)
    # Without num_generations_eval, evaluation samples num_generations completions too; the
    # rows' columns reach the reward functions in training unless remove_unused_columns.
    cfg = GRPOConfig(num_generations=4)
    assert RolloutPipeline.from_config(cfg, evaluation=True, **parts).num_generations == 4
    assert RolloutPipeline.from_config(cfg, **parts).keep_columns
