"""`report_to`: which trackers a config asks for, the errors for missing or unknown ones, and a
real run that reports to TensorBoard, W&B (offline), Trackio (local) and MLflow (file store) at
once, each checked in the files it writes."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit import GRPOConfig
from grpokit.train.trackers import TRACKERS, is_installed, tracker_callbacks


def hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `modules` look uninstalled (`find_spec` gives None, `import` fails)."""
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)


def test_report_to_names_resolve_to_a_list() -> None:
    assert GRPOConfig(report_to="none").report_to == []
    assert GRPOConfig(report_to=None).report_to == []
    assert GRPOConfig(report_to="tensorboard").report_to == ["tensorboard"]
    assert GRPOConfig(report_to=["mlflow", "wandb", "mlflow"]).report_to == ["mlflow", "wandb"]
    # "all" = every supported tracker that is installed, in TRACKERS order (all four in dev).
    assert GRPOConfig(report_to="all").report_to == list(TRACKERS)


def test_all_skips_trackers_that_are_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    hide(monkeypatch, "wandb", "tensorboard", "tensorboardX")
    assert not is_installed("wandb") and not is_installed("tensorboard")
    assert GRPOConfig(report_to=["all"]).report_to == ["trackio", "mlflow"]


@pytest.mark.parametrize(
    ("name", "modules", "command"),
    [
        ("wandb", ("wandb",), "pip install wandb"),
        ("tensorboard", ("tensorboard", "tensorboardX"), "pip install tensorboard"),
        ("trackio", ("trackio",), "pip install trackio"),
        ("mlflow", ("mlflow",), "pip install mlflow"),
    ],
)
def test_a_tracker_that_is_not_installed_fails_at_config_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, modules: tuple, command: str
) -> None:
    hide(monkeypatch, *modules)
    with pytest.raises(ValueError, match=f"report_to='{name}' needs .*`{command}`"):
        GRPOConfig(output_dir=str(tmp_path / "out"), report_to=name)
    assert not (tmp_path / "out").exists()  # nothing written before the error


def test_unknown_tracker_and_unsupported_wandb_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'comet_ml' is not a supported tracker.*callbacks="):
        GRPOConfig(report_to="comet_ml")
    monkeypatch.setenv("WANDB_LOG_MODEL", "end")
    with pytest.raises(ValueError, match="WANDB_LOG_MODEL=end"):
        tracker_callbacks(["wandb"])


def test_tracker_callbacks_are_transformers_integrations() -> None:
    from transformers.integrations import MLflowCallback, TensorBoardCallback

    callbacks = tracker_callbacks(["tensorboard", "mlflow"])
    assert [type(c) for c in callbacks] == [TensorBoardCallback, MLflowCallback]
    assert tracker_callbacks("none") == []


# ---- one real run reporting to the four trackers ------------------------------------------------

RUN = """if True:
    import sys
    from datasets import Dataset
    from grpokit import GRPOConfig, GRPOTrainer
    from tests.tiny import make_causal_lm, make_tokenizer

    def reward(completions, log_metric, **kwargs):
        log_metric("custom/mean_length", sum(len(c) for c in completions) / len(completions))
        return [float(sum(map(ord, c)) % 7) for c in completions]

    tok = make_tokenizer()
    args = GRPOConfig(
        output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, max_steps=2, logging_steps=1, bf16=False, save_strategy="no",
        seed=0, report_to=["tensorboard", "wandb", "trackio", "mlflow"], run_name="tiny-run",
        project="grpokit-test",
    )
    data = Dataset.from_list([{"prompt": p} for p in ["ab", "cd", "ef", "gh"]])
    GRPOTrainer(make_causal_lm(tok), reward, args=args, train_dataset=data,
                processing_class=tok).train()
"""


@pytest.mark.slow
def test_each_tracker_writes_the_logged_metrics(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), ".", ""]),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}",
        "MLFLOW_ALLOW_FILE_STORE": "true",  # MLflow 3 wants a database; its file store still works
        "OMP_NUM_THREADS": "1",
    }
    env.pop("TENSORBOARD_LOGGING_DIR", None)
    subprocess.run(
        [sys.executable, "-c", RUN, str(out)],
        cwd=Path(__file__).parents[1],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    names = ("reward", "loss", "learning_rate", "custom/mean_length")
    logged = {name: [r[name] for r in records] for name in names}

    # TensorBoard: event files under output_dir/runs/<date>_<host>, keys as transformers writes
    # them ("train/<name>"), one scalar per logging step.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = (out / "runs").iterdir()
    events = EventAccumulator(str(run_dir))
    events.Reload()
    for name in names:
        scalars = events.Scalars(f"train/{name}")
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx(logged[name], rel=1e-6)

    # W&B offline: one run folder whose history holds the metric names.
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    history = next(wandb_run.glob("run-*.wandb")).read_bytes()
    for name in names:
        assert f"train/{name}".encode() in history

    # Trackio: the project's local SQLite store, one row of metrics per logging step.
    with sqlite3.connect(tmp_path / "trackio" / "grpokit-test.db") as db:
        rows = db.execute("SELECT run_name, metrics FROM metrics ORDER BY id").fetchall()
    assert [run for run, _ in rows] == ["tiny-run", "tiny-run"]
    tracked = [json.loads(m) for _, m in rows]
    assert [m["train/global_step"] for m in tracked] == [1, 2]
    for name in names:
        assert [m[f"train/{name}"] for m in tracked] == pytest.approx(logged[name], rel=1e-9)

    # MLflow file store: metrics/<name> holds "timestamp value step" per logging step.
    (mlflow_run,) = [p for p in (tmp_path / "mlruns" / "0").iterdir() if p.is_dir()]
    assert (mlflow_run / "tags" / "mlflow.runName").read_text() == "tiny-run"
    for name in names:
        lines = (mlflow_run / "metrics" / name).read_text().split("\n")
        values = [(float(v), int(s)) for _, v, s in (line.split() for line in lines if line)]
        assert [s for _, s in values] == [1, 2]
        assert [v for v, _ in values] == pytest.approx(logged[name], rel=1e-9)
