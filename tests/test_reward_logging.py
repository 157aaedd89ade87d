"""What reward functions log (TRL's `log_metric` / `log_extra`) and the console table of
completions (`log_completions`, `num_completions_to_print`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from grpokit.rewards.scoring import RewardLog, compute_rewards
from grpokit.train.loggers import completions_table, sample_rows
from tests.test_trainer import PLAIN, make_trainer, only_gh_varies, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def logging_reward(
    completions: list[str], trainer_state: Any, log_metric: Any, log_extra: Any, **kwargs: Any
) -> list[float]:
    """char_sum reward that logs, at optimizer step s (trainer_state.global_step):
    `step_seen` = s; `twice` = s then s + 1 (one batch: mean s + 0.5); `custom/step_max` = s
    (a name a grpokit metric would reduce by its max; TRL averages every logged metric); and the
    extra columns `length` (each completion's length) and `id` ("row0", "row1", ...)."""
    s = trainer_state.global_step
    log_metric("step_seen", s)
    log_metric("twice", s)
    log_metric("twice", s + 1)
    log_metric("custom/step_max", s)
    log_extra("length", [len(c) for c in completions])
    log_extra("id", [f"row{i}" for i in range(len(completions))])
    return [float(sum(map(ord, c)) % 7) for c in completions]


def test_log_metric_is_averaged_per_batch_then_over_the_logging_window(tmp_path: Path) -> None:
    # 4 rounds of one optimizer step (global_step 0, 1, 2, 3 while scoring), logging every 2.
    trainer = make_trainer(
        tmp_path,
        logging_reward,
        max_steps=4,
        logging_steps=2,
        log_completions=True,
        num_completions_to_print=0,
    )
    trainer.train()
    first, second = read_metrics(tmp_path)
    # step 2 averages the rounds scored at s = 0 and 1; step 4 those at s = 2 and 3.
    assert (first["step"], first["step_seen"], second["step_seen"]) == (2, 0.5, 2.5)
    # twice: batch means s + 0.5 -> (0.5 + 1.5) / 2 = 1.0 and (2.5 + 3.5) / 2 = 3.0
    assert (first["twice"], second["twice"]) == (1.0, 3.0)
    assert (first["custom/step_max"], second["custom/step_max"]) == (0.5, 2.5)  # mean, not max
    assert trainer.state.log_history[0]["twice"] == 1.0  # callbacks and trackers see them too
    # log_extra: columns of completions.jsonl, one value per completion of the logged round.
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2] * 4 + [4] * 4
    assert [r["id"] for r in rows] == ["row0", "row1", "row2", "row3"] * 2
    assert all(r["length"] == len(r["completion"]) for r in rows)
    # Evaluation: eval_<name>, each generation call's mean, averaged (here s = 4 throughout).
    trainer.eval_dataset = PLAIN
    metrics = trainer.evaluate()
    assert (metrics["eval_step_seen"], metrics["eval_twice"]) == (4.0, 4.5)


def test_reward_log_refuses_what_cannot_be_a_column_or_a_metric() -> None:
    log = RewardLog()
    with pytest.raises(ValueError, match="must be a number"):
        log.log_metric("acc", "high")
    with pytest.raises(ValueError, match="other than"):
        log.log_extra("reward", [1, 2])
    with pytest.raises(ValueError, match="must be a list"):
        log.log_extra("note", "abc")

    def two_values(completions: list[str], log_extra: Any, **kwargs: Any) -> list[float]:
        log_extra("note", ["a", "b"])
        return [0.0] * len(completions)

    with pytest.raises(ValueError, match=r"log_extra\('note', values\) got 2 values .* of 3"):
        compute_rewards(
            [two_values], prompts=["p"] * 3, completions=["a", "b", "c"],
            completion_ids=[[1]] * 3, columns={},
        )  # fmt: skip
    with pytest.raises(ValueError, match="clash"):
        compute_rewards(
            [two_values], prompts=["p"], completions=["a"], completion_ids=[[1]],
            columns={"log_metric": [1]},
        )  # fmt: skip


# ---- the console table --------------------------------------------------------------------------
ROWS = [
    {"prompt": "2+2=", "completion": "4", "rewards": {"acc": 1.0, "fmt": None},
     "reward": 1.0, "advantage": 0.70710678, "source": "gsm"},
    {"prompt": [{"role": "user", "content": "hi"}], "completion": "yo",
     "rewards": {"acc": 0.0, "fmt": 0.5}, "reward": 0.5, "advantage": -0.7071, "source": "chat"},
]  # fmt: skip


def test_plain_completions_table_without_rich(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["rich", *(m for m in sys.modules if m.startswith("rich."))]:
        monkeypatch.setitem(sys.modules, name, None)  # as if rich were not installed
    assert completions_table(ROWS, 7, ["acc", "fmt"]).splitlines() == [
        "Step 7",
        "Prompt | Completion | acc | fmt | Advantage | source",
        "2+2= | 4 | 1.00 | nan | 0.71 | gsm",
        "USER\\nhi | yo | 0.00 | 0.50 | -0.71 | chat",
    ]


def test_rich_completions_table_has_trls_columns() -> None:
    pytest.importorskip("rich")
    text = completions_table(ROWS, 7, ["acc", "fmt"], width=100)
    assert "Step 7" in text.splitlines()[0]
    header = next(line for line in text.splitlines() if "Prompt" in line)
    cells = [c.strip() for c in header.split("┃")[1:-1]]  # │ ┃ Prompt ┃ ... ┃ source ┃ │
    assert cells == ["Prompt", "Completion", "acc", "fmt", "Advantage", "source"]
    for value in ("2+2=", "1.00", "nan", "0.71", "gsm", "USER", "hi", "-0.71", "chat"):
        assert value in text


def test_sample_rows_draws_without_replacement_in_order() -> None:
    rows = list(range(10))
    picked = sample_rows(rows, 3, seed=5)
    assert (
        len(picked) == 3
        and picked == sorted(set(picked))
        and picked == sample_rows(rows, 3, seed=5)
    )
    assert sample_rows(rows, None, seed=0) == rows == sample_rows(rows, 20, seed=0)
    assert sample_rows(rows, 0, seed=0) == []


def test_trainer_prints_num_completions_to_print_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_trainer(tmp_path, logging_reward, log_completions=True, num_completions_to_print=2).train()
    printed = capsys.readouterr().out
    tables = printed.split("Step ")[1:]
    assert [t.split()[0] for t in tables] == ["1", "2"]  # one table per logging step
    for table in tables:
        for header in ("Prompt", "Completion", "logging_reward", "Advantage", "length", "id"):
            assert header in table
        assert sum(f"row{i}" in table for i in range(4)) == 2  # 2 of the round's 4 completions
    # completions.jsonl still gets all 4 completions of each logged round.
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 8


def test_log_extra_follows_its_rows_through_dynamic_sampling(tmp_path: Path) -> None:
    # Only prompt "gh" gets varied rewards: the other groups are dropped and more prompts drawn,
    # so the logged rows are selected and joined from several scoring calls.
    def echo_reward(
        prompts: list[str], completions: list[str], log_extra: Any, log_metric: Any, **kw: Any
    ) -> list[float]:
        log_extra("echo", [f"{p}|{c}" for p, c in zip(prompts, completions, strict=True)])
        log_metric("calls", 1.0)
        return only_gh_varies(prompts, completions)

    make_trainer(
        tmp_path,
        echo_reward,
        dynamic_sampling=True,
        max_dynamic_sampling_draws=3,
        log_completions=True,
        num_completions_to_print=0,
    ).train()
    rows = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["echo"] == f"{r['prompt']}|{r['completion']}" for r in rows)
    assert all(m["dynamic_sampling/extra_draws"] >= 1 for m in read_metrics(tmp_path))
    assert all(m["calls"] == 1.0 for m in read_metrics(tmp_path))  # one mean per scoring call
