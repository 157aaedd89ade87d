"""Guards of the training loop on tiny in-process runs: NaN/inf steps are skipped, counted and
warned about, too many in a row stop the run, non-finite weights are never saved, Ctrl-C saves a
checkpoint that resumes to the uninterrupted run's weights, and a stuck reward function times out.

NaN is injected through public objects only: a forward hook on the policy's input embeddings that
fires in training forwards (gradient enabled; generation and log-prob passes run without it)."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from grpokit import GRPOConfig
from grpokit.engines.sampling import NonFiniteLogitsError
from grpokit.rewards.scoring import RewardTimeoutError
from grpokit.train.guards import NonFiniteError, TrainingInterrupted, interrupts_deferred
from grpokit.train.trainer import GRPOTrainer
from tests.test_trainer import char_sum, make_trainer, params, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def poison_training_forwards(trainer: GRPOTrainer, steps: set[int] | None = None) -> None:
    """Make the training forwards of optimizer steps `steps` (1-based; None = every step) NaN."""

    def hook(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor | None:
        step = trainer.state.global_step + 1
        if torch.is_grad_enabled() and (steps is None or step in steps):
            return output * math.nan
        return None

    trainer.model.get_input_embeddings().register_forward_hook(hook)


def recording_reward(snapshots: list[dict[str, torch.Tensor]], trainer_box: list[GRPOTrainer]):
    """char_sum that records the policy's weights at each scoring (once per round)."""

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        snapshots.append(params(trainer_box[0]))
        return char_sum(completions)

    return reward


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


# ---- non-finite steps ---------------------------------------------------------------------------
def test_a_nonfinite_step_is_skipped_counted_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []
    box: list[GRPOTrainer] = []
    trainer = make_trainer(tmp_path, recording_reward(snapshots, box), max_steps=4)
    box.append(trainer)
    poison_training_forwards(trainer, steps={2})
    with caplog.at_level(logging.WARNING, logger="grpokit"):
        trainer.train()

    state = trainer.state
    assert state.global_step == 4 and state.nonfinite_skipped == 1
    # snapshots[r] = weights when round r + 1 is scored, i.e. after r optimizer steps.
    assert not equal(snapshots[0], snapshots[1])  # step 1 updated
    assert equal(snapshots[1], snapshots[2])  # step 2 was skipped: not a single weight moved
    assert not equal(snapshots[2], params(trainer))  # steps 3 and 4 updated
    # No optimizer or scheduler step for the skipped step: 3 of each.
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}
    assert trainer.scheduler.last_epoch == 3
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())

    logged = read_metrics(tmp_path)
    assert [m["train/nonfinite_skipped"] for m in logged] == [0, 1, 1, 1]
    assert logged[1]["loss"] is None and math.isfinite(logged[2]["loss"])  # NaN is written null
    warnings = [r.getMessage() for r in caplog.records if "not finite" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("step 2: loss=nan")
    assert "learning_rate" in warnings[0] and "stops after 3 in a row" in warnings[0]


def test_consecutive_nonfinite_steps_stop_the_run_without_touching_the_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer = make_trainer(tmp_path, max_steps=8, max_consecutive_nonfinite_steps=3)
    before = params(trainer)
    poison_training_forwards(trainer)
    with (
        caplog.at_level(logging.WARNING, logger="grpokit"),
        pytest.raises(NonFiniteError, match=r"stopped at step 3: .* 3 optimizer steps in a row"),
    ):
        trainer.train()
    assert trainer.state.nonfinite_skipped == 3 and trainer.state.global_step == 2
    assert equal(before, params(trainer))
    assert sum("not finite" in r.getMessage() for r in caplog.records) == 2  # steps 1 and 2


def test_nonfinite_steps_in_a_row_reset_after_a_finite_one(tmp_path: Path) -> None:
    """Steps 1, 2, 4, 5 are NaN: never 3 in a row, so the run finishes with 4 skips."""
    trainer = make_trainer(tmp_path, max_steps=6, max_consecutive_nonfinite_steps=3)
    poison_training_forwards(trainer, steps={1, 2, 4, 5})
    trainer.train()
    state = trainer.state
    assert state.global_step == 6 and state.nonfinite_skipped == 4
    assert state.nonfinite_in_a_row == 0


def test_a_diverging_learning_rate_stops_at_generation_with_a_clear_error(tmp_path: Path) -> None:
    """A real divergence, no injection: lr 1e30 takes one finite step to weights of ~1e30, whose
    logits are inf; the next generation says so instead of failing inside the draw."""
    trainer = make_trainer(tmp_path, max_steps=20, learning_rate=1e30, max_grad_norm=None)
    with pytest.raises(NonFiniteLogitsError, match=r"logits of \d+ of 4 rows are NaN or inf"):
        trainer.train()
    assert trainer.state.global_step == 1
    assert isinstance(NonFiniteLogitsError("x"), FloatingPointError)


def test_nonfinite_weights_are_never_saved(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path)
    with torch.no_grad():
        trainer.model.lm_head.weight[3, 1] = math.inf
    with pytest.raises(NonFiniteError, match=r"refusing to save the model: .*'lm_head.weight'"):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()


def test_a_checkpoint_of_nonfinite_weights_is_refused(tmp_path: Path) -> None:
    """The weights turn inf while round 2 is scored (a public mutation from the reward function):
    step 2's loss is NaN and skipped, and checkpoint-2 is refused; checkpoint-1 stays."""
    box: list[GRPOTrainer] = []

    def breaking_reward(completions: list[str], **kwargs: Any) -> list[float]:
        if box[0].state.global_step == 1:
            with torch.no_grad():
                box[0].model.lm_head.weight[3, 1] = math.inf
        return char_sum(completions)

    trainer = make_trainer(tmp_path, breaking_reward, save_strategy="steps", save_steps=1)
    box.append(trainer)
    with pytest.raises(NonFiniteError, match=r"refusing to save checkpoint-2: .*lm_head.weight"):
        trainer.train()
    assert trainer.state.nonfinite_skipped == 1
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]


def test_max_consecutive_nonfinite_steps_is_validated() -> None:
    with pytest.raises(ValueError, match="max_consecutive_nonfinite_steps must be a positive"):
        GRPOConfig(max_consecutive_nonfinite_steps=0)
    assert GRPOConfig(max_consecutive_nonfinite_steps=None).max_consecutive_nonfinite_steps is None


# ---- Ctrl-C -------------------------------------------------------------------------------------
def interrupting_reward(at_step: int, box: list[GRPOTrainer]):
    """char_sum that raises KeyboardInterrupt (as Ctrl-C would) while scoring the round that
    starts at optimizer step `at_step`: after that round's generation has used random numbers
    and prompts."""

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        if box and box[0].state.global_step == at_step:
            raise KeyboardInterrupt
        return char_sum(completions)

    reward.__name__ = "char_sum"
    return reward


def test_ctrl_c_saves_a_checkpoint_that_resumes_to_the_uninterrupted_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    full = make_trainer(tmp_path / "full", max_steps=4)
    initial = params(full)
    full.train()
    assert not equal(initial, params(full))

    box: list[GRPOTrainer] = []
    run = tmp_path / "run"
    interrupted = make_trainer(
        run, interrupting_reward(2, box), max_steps=4, save_strategy="steps", save_steps=100
    )
    box.append(interrupted)
    with (
        caplog.at_level(logging.WARNING, logger="grpokit"),
        pytest.raises(TrainingInterrupted) as caught,
    ):
        interrupted.train()
    assert isinstance(caught.value, KeyboardInterrupt)
    assert caught.value.checkpoint == run / "checkpoint-2"
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-2"]
    lines = [r.getMessage() for r in caplog.records if "interrupted" in r.getMessage()]
    assert lines == [caught.value.message]
    assert lines[0].startswith(f"interrupted at step 2; checkpoint at {run / 'checkpoint-2'}.")
    assert "trainer.train(resume_from_checkpoint=True)" in lines[0]
    assert "mid generation round" not in lines[0]

    resumed = make_trainer(run, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert equal(params(full), params(resumed))
    assert resumed.state.data_index == full.state.data_index


def test_ctrl_c_mid_round_and_with_save_strategy_no(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two optimizer steps per round, interrupted in the second: the checkpoint is at step 1 and
    says it is mid-round. With save_strategy="no" nothing is written and the line says why."""
    trainer = make_trainer(
        tmp_path / "mid", max_steps=4, steps_per_generation=2, save_strategy="steps", save_steps=9
    )

    def hook(module: Any, args: Any, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and trainer.state.global_step == 1:
            raise KeyboardInterrupt

    trainer.model.get_input_embeddings().register_forward_hook(hook)
    with pytest.raises(TrainingInterrupted, match="mid generation round") as caught:
        trainer.train()
    assert caught.value.checkpoint == tmp_path / "mid" / "checkpoint-1"
    assert trainer.state.global_step == 1

    box: list[GRPOTrainer] = []
    trainer = make_trainer(tmp_path / "no", interrupting_reward(1, box), save_strategy="no")
    box.append(trainer)
    with pytest.raises(TrainingInterrupted, match="save_strategy='no'") as caught:
        trainer.train()
    assert caught.value.checkpoint is None
    assert not list((tmp_path / "no").glob("checkpoint-*"))


def test_sigint_during_an_optimizer_update_is_held_until_it_ends() -> None:
    finished = []
    with pytest.raises(KeyboardInterrupt), interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
        finished.append(True)  # still runs: the signal waits for the end of the block
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_deferred():  # no signal: no interrupt
        pass


REWARD_MODULE = '''
import os, pathlib, time

def char_sum(completions, trainer_state=None, **kwargs):
    """Blocks while scoring the round of step BLOCK_AT_STEP, after touching READY_FILE."""
    if os.environ.get("BLOCK_AT_STEP") == str(trainer_state.global_step):
        pathlib.Path(os.environ["READY_FILE"]).touch()
        time.sleep(300)
    return [float(sum(map(ord, c)) % 7) for c in completions]
'''


def _run_config(tmp_path: Path, model: str, output_dir: Path) -> Path:
    import json

    import yaml

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"q": f"{a}+{a}=", "a": str(2 * a)}) for a in range(12)))
    config = {
        "model": model,
        "task": {
            "kind": "dataset",
            "path": str(data),
            "columns": {"q": "prompt", "a": "answer"},
            "format": "plain",
            "eval_fraction": 0.25,
        },
        "rewards": ["ctrl_c_reward:char_sum"],
        "plot": False,
        "training": {
            "output_dir": str(output_dir),
            "max_steps": 4,
            "num_generations": 2,
            "per_device_train_batch_size": 4,
            "max_completion_length": 6,
            "learning_rate": 1e-2,
            "logging_steps": 1,
            "save_steps": 100,
        },
        "eval": {"before": False, "after": False},
    }
    path = tmp_path / f"{output_dir.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_sigint_to_grpokit_train_exits_130_and_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `grpokit train` process gets SIGINT while scoring its second round: it exits 130
    with one line (where it saved, how to resume) and no traceback; `--resume` then ends with the
    weights of an uninterrupted run."""
    from safetensors.torch import load_file

    from grpokit.app.cli import main
    from tests.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    (tmp_path / "ctrl_c_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    interrupted, full = tmp_path / "interrupted", tmp_path / "full"
    ready = tmp_path / "ready"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path("src").resolve()), str(tmp_path)]),
        "OMP_NUM_THREADS": "1",  # the in-process runs below use one thread too
        "BLOCK_AT_STEP": "1",
        "READY_FILE": str(ready),
    }
    command = "import sys; from grpokit.app.cli import main; sys.exit(main())"
    config = _run_config(tmp_path, model, interrupted)
    process = subprocess.Popen(
        [sys.executable, "-c", command, "train", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ready.exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1, err
    assert f"interrupted at step 1; checkpoint at {interrupted / 'checkpoint-1'}" in lines[0]
    assert f"grpokit train {interrupted / 'config.yaml'} --resume" in lines[0]
    assert [p.name for p in interrupted.glob("checkpoint-*")] == ["checkpoint-1"]

    assert main(["train", str(interrupted / "config.yaml"), "--resume"]) == 0
    assert main(["train", str(_run_config(tmp_path, model, full))]) == 0
    resumed_weights = load_file(str(interrupted / "final_model" / "model.safetensors"))
    full_weights = load_file(str(full / "final_model" / "model.safetensors"))
    initial = load_file(str(Path(model) / "model.safetensors"))
    assert any(not torch.equal(initial[k], v) for k, v in full_weights.items())  # it learned
    assert resumed_weights.keys() == full_weights.keys()
    for name, value in full_weights.items():
        assert torch.equal(value, resumed_weights[name]), name


# ---- reward timeout through the trainer ----------------------------------------------------------
def test_reward_timeout_from_the_config_stops_or_skips_a_stuck_reward(tmp_path: Path) -> None:
    """A reward that hangs while scoring round 2: with the default policy the run stops with an
    error naming it; with "nan" that batch has no applicable reward (zero advantages) and the
    run finishes."""
    release = threading.Event()
    box: list[GRPOTrainer] = []

    def hangs_at_step_1(completions: list[str], **kwargs: Any) -> list[float]:
        if box[-1].state.global_step == 1:
            release.wait()
        return char_sum(completions)

    try:
        box.append(make_trainer(tmp_path / "error", hangs_at_step_1, reward_timeout=0.3))
        with pytest.raises(RewardTimeoutError, match="'hangs_at_step_1' did not return within"):
            box[-1].train()
        assert box[-1].state.global_step == 1

        box.append(
            make_trainer(
                tmp_path / "nan",
                hangs_at_step_1,
                max_steps=3,
                reward_timeout=0.3,
                reward_timeout_policy="nan",
            )
        )
        assert box[-1].train().global_step == 3
        logged = read_metrics(tmp_path / "nan")
        assert logged[1]["frac_reward_zero_std"] == 1.0 and logged[1]["loss"] == 0.0
    finally:
        release.set()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("reward_timeout", 0, r"reward_timeout must be a finite number > 0 or None, got 0\."),
        ("reward_timeout", math.inf, "reward_timeout must be a finite number > 0 or None"),
        ("reward_timeout", "5", "reward_timeout must be a finite number > 0 or None"),
        ("reward_timeout_policy", "skip", "reward_timeout_policy must be one of"),
    ],
)
def test_reward_timeout_fields_are_validated(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**{field: value})


def test_grpokit_train_reports_a_diverged_run_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """learning_rate 1e30 diverges after one step; `grpokit train` exits 2 with one error line
    that names the likely cause, and no final model is written."""
    from grpokit.app.cli import main
    from tests.tiny import save_tiny_model

    model = save_tiny_model(str(tmp_path / "model"))
    (tmp_path / "ctrl_c_reward.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    config = _run_config(tmp_path, model, run)
    argv = ["train", str(config), "--learning_rate", "1e30", "--max_grad_norm", "null"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("grpokit: error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "NaN or inf" in errors[0] and "learning_rate" in errors[0]
    assert not (run / "final_model").exists()
