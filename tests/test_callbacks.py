"""Callbacks with transformers' `TrainerCallback` contract: the events of real runs, their order
and the state they see, the control flags a callback sets, and adding / removing callbacks."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from transformers import PrinterCallback, TrainerCallback, TrainerControl

from grpokit.train.callbacks import CallbackError
from tests.test_trainer import PLAIN, make_trainer, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

EVENTS = (
    "on_init_end",
    "on_train_begin",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_step_end",
    "on_evaluate",
    "on_log",
    "on_save",
    "on_train_end",
)


class Recorder(TrainerCallback):
    """Records every event with the state it saw."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def _record(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model = kwargs["model"]
        self.seen.append(
            {
                "event": event,
                "step": state.global_step,
                "max_steps": state.max_steps,
                "epoch": state.epoch,
                "history": len(state.log_history),
                "has_grad": any(p.grad is not None for p in model.parameters()),
                "kwargs": set(kwargs),
                "logs": kwargs.get("logs"),
                "metrics": kwargs.get("metrics"),
            }
        )


def _recording(event: str) -> Any:
    def method(self: Recorder, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._record(event, args, state, control, **kwargs)

    return method


for _event in EVENTS:
    setattr(Recorder, _event, _recording(_event))


def as_logged(record: dict[str, Any]) -> dict[str, Any]:
    """A log record as metrics.jsonl writes it (NaN as null)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def test_event_order_and_state_of_a_two_step_run(tmp_path: Path) -> None:
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path,
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=4,
        trainer_kwargs=dict(eval_dataset=PLAIN, callbacks=[recorder]),
    )
    trainer.train()
    step = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    assert [s["event"] for s in recorder.seen] == [
        "on_init_end",
        "on_train_begin",
        *step,
        "on_log",  # logging_steps=1
        *step,
        "on_evaluate",  # eval_steps=2; its metrics are merged into the step's record
        "on_log",
        "on_save",  # save_steps=2
        "on_train_end",
    ]
    by_event: dict[str, list[dict[str, Any]]] = {}
    for s in recorder.seen:
        by_event.setdefault(s["event"], []).append(s)
    # global_step counts the optimizer steps taken: it moves between the optimizer step and
    # on_step_end, as in transformers.
    assert [s["step"] for s in by_event["on_step_begin"]] == [0, 1]
    assert [s["step"] for s in by_event["on_pre_optimizer_step"]] == [0, 1]
    assert [s["step"] for s in by_event["on_optimizer_step"]] == [0, 1]
    assert [s["step"] for s in by_event["on_step_end"]] == [1, 2]
    assert [s["step"] for s in by_event["on_log"]] == [1, 2]
    assert {s["max_steps"] for s in recorder.seen} == {2}
    # The optimizer sees the accumulated gradients; zero_grad clears them before on_step_end.
    assert all(s["has_grad"] for s in by_event["on_pre_optimizer_step"])
    assert not any(s["has_grad"] for s in by_event["on_step_end"])
    # 4 prompts, 2 per generation batch: one epoch after the two steps.
    assert [s["epoch"] for s in by_event["on_step_end"]] == [0.5, 1.0]
    # on_log sees its record already in log_history; the logs are what metrics.jsonl holds.
    assert [s["history"] for s in by_event["on_log"]] == [1, 2]
    logged = read_metrics(tmp_path)
    for s, record in zip(by_event["on_log"], logged, strict=True):
        assert as_logged({**s["logs"], "step": s["step"]}) == record
    assert [as_logged(r) for r in trainer.state.log_history] == logged
    assert set(by_event["on_evaluate"][0]["metrics"]) <= set(logged[1])
    assert "eval_reward" in by_event["on_evaluate"][0]["metrics"]
    assert {"model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader"} <= (
        by_event["on_step_end"][0]["kwargs"]
    )
    # The state callbacks read, as transformers fills it.
    state = trainer.state
    assert (state.logging_steps, state.eval_steps, state.save_steps) == (1, 2, 2)
    assert state.train_batch_size == 4 and state.num_train_epochs == 1
    assert state.is_world_process_zero and state.is_local_process_zero
    assert state.best_metric is None and state.trial_name is None
    # trainer_state.json round-trips the log history.
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert [as_logged(r) for r in saved["log_history"]] == logged
    assert saved["global_step"] == 2


def test_several_steps_per_round_begin_and_end_each(tmp_path: Path) -> None:
    # num_iterations=2: one generation round of two optimizer steps, logged once at its end.
    recorder = Recorder()
    make_trainer(
        tmp_path, num_iterations=2, max_steps=2, trainer_kwargs=dict(callbacks=[recorder])
    ).train()
    step = ["on_step_begin", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end"]
    events = [s["event"] for s in recorder.seen]
    assert events == ["on_init_end", "on_train_begin", *step, *step, "on_log", "on_train_end"]


class StopAfterFirstStep(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> Any:
        if state.global_step == 1:
            control.should_training_stop = True
        return control


def test_should_training_stop_stops_after_the_step_and_saves(tmp_path: Path) -> None:
    trainer = make_trainer(
        tmp_path,
        max_steps=4,
        logging_steps=10,
        save_strategy="steps",
        save_steps=10,
        trainer_kwargs=dict(callbacks=[StopAfterFirstStep]),
    )
    state = trainer.train()
    assert state.global_step == 1
    # As at the last step: the step is logged and a final checkpoint written.
    assert [m["step"] for m in read_metrics(tmp_path)] == [1]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1"]


class ForceLogAndSave(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: TrainerControl, **kwargs: Any) -> None:
        if state.global_step == 1:
            control.should_log = True
            control.should_save = True


def test_should_log_and_should_save_from_a_callback(tmp_path: Path) -> None:
    # logging_steps and save_steps are never crossed before the end: step 1's record and
    # checkpoint exist only because the callback asked for them.
    make_trainer(
        tmp_path,
        max_steps=3,
        logging_steps=10,
        save_strategy="steps",
        save_steps=10,
        trainer_kwargs=dict(callbacks=[ForceLogAndSave()]),
    ).train()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 3]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-3"]


class Broken(TrainerCallback):
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        raise KeyError("boom")


def test_a_callback_that_raises_is_named(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, max_steps=1, trainer_kwargs=dict(callbacks=[Broken]))
    with pytest.raises(CallbackError, match=r"Broken\.on_optimizer_step raised KeyError") as err:
        trainer.train()
    assert isinstance(err.value.__cause__, KeyError)
    assert (err.value.callback, err.value.event) == ("Broken", "on_optimizer_step")


def test_add_remove_and_pop_callbacks(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    recorder = Recorder()
    trainer = make_trainer(tmp_path, max_steps=1, trainer_kwargs=dict(callbacks=[Recorder]))
    handler = trainer.callback_handler
    assert [type(cb) for cb in handler.callbacks] == [Recorder]  # a class is instantiated
    first = handler.callbacks[0]
    assert [s["event"] for s in first.seen] == ["on_init_end"]
    trainer.add_callback(recorder)
    trainer.add_callback(PrinterCallback)  # a stock transformers callback
    assert trainer.pop_callback(Recorder) is first  # by class: the first of that class
    assert trainer.pop_callback(first) is None  # already gone
    trainer.remove_callback(recorder)  # by instance
    assert [type(cb) for cb in handler.callbacks] == [PrinterCallback]
    trainer.remove_callback(PrinterCallback)  # by class
    assert handler.callbacks == []
    trainer.add_callback(recorder)
    trainer.add_callback(PrinterCallback())
    trainer.train()
    assert recorder.seen[0]["event"] == "on_train_begin"  # added after __init__
    assert "'loss'" in capsys.readouterr().out  # PrinterCallback printed the logs
