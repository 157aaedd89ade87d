"""DAPO's dynamic sampling in the trainer: groups whose rewards are all equal are dropped and more
prompts drawn until the generation batch is full, within `max_dynamic_sampling_draws`; the
counters, the cap, the joined rollout's alignment and a real run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from datasets import Dataset

from grpokit import GRPOConfig
from grpokit.train.rollout import concatenate_rollouts
from tests.test_trainer import make_trainer
from tests.tiny import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def by_kind(completions: list[Any], kind: list[str], **kwargs: Any) -> list[float]:
    """Rewards 0, 1, 0, 1, ... (varied within every group of G = 2 consecutive rows) for prompts
    of kind "varied"; 1.0 for every completion of a "const" prompt."""
    return [float(i % 2) if k == "varied" else 1.0 for i, k in enumerate(kind)]


def dataset(kinds: list[str]) -> Dataset:
    # Prompts of different lengths, so that joined draws need re-padding.
    return Dataset.from_list(
        [{"prompt": "x" * (1 + i % 4) + str(i), "kind": k} for i, k in enumerate(kinds)]
    )


def trainer_for(tmp_path: Path, kinds: list[str], **overrides: Any) -> Any:
    # B = 4 completions / G = 2 = 2 prompt groups per generation batch, rows in dataset order.
    config: dict[str, Any] = {"shuffle_dataset": False, "dynamic_sampling": True, **overrides}
    return make_trainer(tmp_path, by_kind, dataset=dataset(kinds), **config)


def test_kept_batch_holds_only_varied_groups(tmp_path: Path) -> None:
    # Draw 1: rows 0 (const, dropped) and 1 (varied, kept): 1 group missing. Extra draws of one
    # prompt each: row 2 (const), row 3 (const), row 4 (varied) -> full after 3 extra draws.
    kinds = ["const", "varied", "const", "const", "varied", "varied", "const", "const"]
    trainer = trainer_for(tmp_path, kinds)
    timings: dict[str, float] = {}
    rollout, metrics = trainer.collect_rollouts(timings)
    assert rollout.columns["kind"] == ["varied"] * 4
    assert rollout.prompts == ["xx1"] * 2 + ["x4"] * 2  # rows 1 and 4, G = 2 each
    assert rollout.rewards[:, 0].tolist() == [0.0, 1.0, 0.0, 1.0]
    assert metrics == {
        "dynamic_sampling/extra_draws": 3.0,
        "dynamic_sampling/dropped_groups": 3.0,
        "dynamic_sampling/filled_groups": 0.0,
        "dynamic_sampling/frac_reward_zero_std": 3 / 5,
    }
    assert trainer.sampler.index == 5  # 2 + 1 + 1 + 1 prompts drawn
    assert timings["time/generation"] > 0 and timings["time/rewards"] > 0
    # The joined rows stay aligned: each row's tokens decode to its completion, and the
    # advantages are those of two varied groups (none is 0).
    gen = rollout.gen
    assert gen.prompt_ids.shape[0] == gen.completion_ids.shape[0] == 4
    completions, _ = trainer.decode(rollout.prompts, gen)
    assert completions == rollout.completions
    assert (trainer.advantages(rollout.rewards).advantages != 0).all()


def test_cap_completes_the_batch_with_equal_reward_groups(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Row 0 varied (kept), then only const rows: 2 extra draws (rows 2, 3) find nothing; the
    # batch is completed with the first dropped group (row 1).
    kinds = ["varied", "const", "const", "const", "const", "const"]
    trainer = trainer_for(tmp_path, kinds, max_dynamic_sampling_draws=2)
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        rollout, metrics = trainer.collect_rollouts()
    assert rollout.columns["kind"] == ["varied"] * 2 + ["const"] * 2
    assert rollout.prompts == ["x0"] * 2 + ["xx1"] * 2
    assert metrics["dynamic_sampling/extra_draws"] == 2.0  # the cap, not more
    assert metrics["dynamic_sampling/filled_groups"] == 1.0
    assert metrics["dynamic_sampling/dropped_groups"] == 2.0  # rows 2 and 3
    assert metrics["dynamic_sampling/frac_reward_zero_std"] == 3 / 4
    assert trainer.sampler.index == 4
    assert "only 1 of 2 prompt groups have varied rewards" in caplog.text
    # The filled group has advantage exactly 0: it adds no policy gradient.
    assert trainer.advantages(rollout.rewards).advantages.tolist()[2:] == [0.0, 0.0]


def test_no_extra_draw_when_every_group_varies_or_dynamic_sampling_is_off(
    tmp_path: Path,
) -> None:
    varied = trainer_for(tmp_path / "on", ["varied"] * 4)
    _, metrics = varied.collect_rollouts()
    assert metrics["dynamic_sampling/extra_draws"] == 0.0 and varied.sampler.index == 2
    off = trainer_for(tmp_path / "off", ["const"] * 4, dynamic_sampling=False)
    rollout, metrics = off.collect_rollouts()
    assert metrics == {} and rollout.columns["kind"] == ["const"] * 4


def test_joined_rollouts_give_the_same_logprobs_as_each_draw(tmp_path: Path) -> None:
    # Rows of two draws of different prompt and completion widths, re-padded into one batch:
    # each row's log-probs are those it had in its own draw.
    trainer = trainer_for(tmp_path, ["varied"] * 4, dynamic_sampling=False)
    parts = [trainer.draw_rollouts(1), trainer.draw_rollouts(1)]
    assert parts[0].gen.prompt_ids.shape[1] != parts[1].gen.prompt_ids.shape[1]
    joined = concatenate_rollouts(parts, pad_token_id=0)

    def logprobs(gen: Any) -> torch.Tensor:
        batch = trainer.build_rollout_batch(gen, torch.zeros(gen.completion_ids.shape[0]))
        return trainer.compute_logprobs(trainer.model, batch)

    whole = logprobs(joined.gen)
    for i, part in enumerate(parts):
        own = logprobs(part.gen)
        t = own.shape[1]
        torch.testing.assert_close(whole[2 * i : 2 * i + 2, :t], own, atol=1e-5, rtol=1e-5)
        assert (whole[2 * i : 2 * i + 2, t:] == 0).all()


def test_multi_turn_rollouts_keep_their_tool_records(tmp_path: Path) -> None:
    # Tool calling (tests/tiny.py's scripted calculator, as in tests/test_multi_turn.py): every
    # answer to "1+1?" is wrong (rewards all 0: dropped); "2+3?" gets varied rewards and is drawn
    # next. The joined rollout keeps that group's tool mask and per-row tool records: the tool
    # metrics are the ones of its single-draw run (5 calls over 4 rows, 1 failed).
    from grpokit.train.loggers import tool_metrics
    from tests.tiny import (
        ScriptedEngine,
        add,
        calculator_script,
        correct,
        make_tool_tokenizer,
        one_step_trainer,
    )

    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": q}], "answer": a}
            for q, a in [("1+1?", "2"), ("2+3?", "5")]
        ]
    )
    tok = make_tool_tokenizer()
    trainer = one_step_trainer(
        tmp_path,
        tok,
        correct,
        data,
        generation_engine=ScriptedEngine(tok, calculator_script),
        tools=[add],
        config=dict(
            num_generations=4,
            max_completion_length=300,
            shuffle_dataset=False,
            max_tool_calling_iterations=2,
            dynamic_sampling=True,
        ),
    )
    rollout, metrics = trainer.collect_rollouts()
    assert metrics["dynamic_sampling/extra_draws"] == 1.0
    assert metrics["dynamic_sampling/dropped_groups"] == 1.0
    assert rollout.columns["answer"] == ["5"] * 4
    gen = rollout.gen
    assert gen.tool_mask is not None and gen.turns is not None and len(gen.turns.calls) == 4
    assert tool_metrics(gen)["tools/call_frequency"] == pytest.approx(5 / 4)
    assert tool_metrics(gen)["tools/failure_frequency"] == pytest.approx(1 / 5)
    assert rollout.completions[0][1] == {"role": "tool", "name": "add", "content": "5"}
    batch = trainer.build_rollout_batch(gen, trainer.advantages(rollout.rewards).advantages)
    assert torch.equal(batch.loss_mask, gen.completion_mask * gen.tool_mask)


def test_training_run_logs_the_counters(tmp_path: Path) -> None:
    kinds = ["const", "varied"] * 6
    trainer = trainer_for(tmp_path, kinds, max_steps=2)
    trainer.train()
    logged = read_metrics(tmp_path)
    assert [m["step"] for m in logged] == [1, 2]
    for record in logged:
        # each round: rows (const, varied) -> 1 kept; extra draws of 1 prompt: a const row, then
        # a varied one -> 2 extra draws, 2 groups dropped, 4 rows of the dataset used
        assert record["dynamic_sampling/extra_draws"] == 2.0
        assert record["dynamic_sampling/dropped_groups"] == 2.0
        assert record["frac_reward_zero_std"] == 0.0  # the trained batch has no equal groups
    assert trainer.state.global_step == 2 and trainer.sampler.index == 8


def test_config_checks_the_cap() -> None:
    with pytest.raises(ValueError, match="max_dynamic_sampling_draws"):
        GRPOConfig(max_dynamic_sampling_draws=-1)
    assert GRPOConfig().dynamic_sampling is False


class Ledger:
    """An environment (`environment_factory`) remembering the row it was reset with."""

    def __init__(self) -> None:
        self.start = self.value = -1

    def reset(self, **row: Any) -> None:
        self.start = self.value = int(row["start"])

    def add(self, by: int) -> str:
        """Add to the ledger.

        Args:
            by: How much.
        """
        self.value += by
        return str(self.value)


def test_extra_draws_reset_environments_no_kept_rollout_holds(tmp_path: Path) -> None:
    # G = 2, B = 2 prompts. Draw 1: row 0 (varied, kept: the pool's instances 0 and 1) and row 1
    # (const, dropped: instances 2 and 3); the extra draw's row 2 takes instances 4 and 5, not 0
    # and 1 again, whose reset would move the kept rollouts' environments to row 2.
    from grpokit.train.trainer import GRPOTrainer
    from tests.distributed_worker import ToolScriptedEngine, config
    from tests.tiny import make_causal_lm, make_tool_tokenizer

    tok = make_tool_tokenizer()
    rows = [
        {"prompt": [{"role": "user", "content": f"q{i}"}], "start": i, "kind": kind}
        for i, kind in enumerate(["varied", "const", "varied"])
    ]
    args = config(
        tmp_path,
        num_generations=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_completion_length=112,
        dynamic_sampling=True,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        make_causal_lm(tok, seed=0),
        [by_kind],
        args=args,
        train_dataset=rows,
        processing_class=tok,
        generation_engine=ToolScriptedEngine(tok),
        environment_factory=Ledger,
    )
    rollout, metrics = trainer.collect_rollouts()
    assert metrics["dynamic_sampling/extra_draws"] == 1.0
    assert rollout.columns["kind"] == ["varied"] * 4
    environments = rollout.columns["environments"]
    assert len({id(env) for env in environments}) == 4
    assert [env.start for env in environments] == [0, 0, 2, 2]
