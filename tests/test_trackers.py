"""`report_to`: which trackers a config asks for, the errors for missing or unknown ones, and a
real run that reports to TensorBoard, W&B (offline), Trackio (local) and MLflow (file store) at
once, each checked in the files it writes."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from grpokit import GRPOConfig
from grpokit.train.trackers import (
    TRACKERS,
    completions_table_columns,
    is_installed,
    tracker_callbacks,
)


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


# ---- the completions table (log_completions) ----------------------------------------------------


def _row(prompt, completion, rewards, advantage, **extra):
    return {
        "prompt": prompt,
        "completion": completion,
        "rewards": rewards,
        "reward": 0.0,
        "advantage": advantage,
        **extra,
    }


def test_completions_table_columns_in_trls_order() -> None:
    rows = [
        _row("p", "a", {"f": 1.0, "g": None}, 0.5, length=1),
        _row("p", "b", {"f": 0.0, "g": 2.0}, -0.5, length=1),
        _row([{"role": "user", "content": "q"}], "c", {"f": 3.0, "g": 1.0}, 0.0, length=1),
    ]
    columns = completions_table_columns(7, rows, ["f", "g"])
    # step, prompt, completion, one column per reward function, the log_extra columns, advantage
    assert list(columns) == ["step", "prompt", "completion", "f", "g", "length", "advantage"]
    assert columns["step"] == [7, 7, 7]
    assert columns["prompt"] == ["p", "p", [{"role": "user", "content": "q"}]]
    assert columns["f"] == [1.0, 0.0, 3.0]
    assert math.isnan(columns["g"][0]) and columns["g"][1:] == [2.0, 1.0]  # None = does not apply
    assert columns["advantage"] == [0.5, -0.5, 0.0]
    # log_unique_prompts: the first row of each distinct prompt (also across processes' rows)
    unique = completions_table_columns(7, rows, ["f", "g"], unique_prompts=True)
    assert unique["completion"] == ["a", "c"] and unique["advantage"] == [0.5, 0.0]
    assert completions_table_columns(1, [], ["f"]) == {
        "step": [],
        "prompt": [],
        "completion": [],
        "f": [],
        "advantage": [],
    }


TABLE_RUN = """if True:
    import sys
    from datasets import Dataset
    from grpokit import GRPOConfig, GRPOTrainer
    from tests.tiny import make_causal_lm, make_tokenizer

    def chars(completions, log_extra, **kwargs):
        log_extra("length", [len(c) for c in completions])
        return [float(sum(map(ord, c)) % 7) for c in completions]

    def every_other(completions, **kwargs):  # None: does not apply to that completion
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    tok = make_tokenizer()
    args = GRPOConfig(
        output_dir=sys.argv[1], per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, max_steps=2, logging_steps=1, bf16=False, save_strategy="no",
        seed=0, report_to=sys.argv[2].split(","), run_name="tiny-run", project="grpokit-test",
        log_completions=True, num_completions_to_print=1,
    )
    data = Dataset.from_list([{"prompt": p} for p in ["ab", "cd", "ef", "gh"]])
    GRPOTrainer(make_causal_lm(tok), [chars, every_other], args=args, train_dataset=data,
                processing_class=tok).train()
"""


def _run_tiny(tmp_path: Path, script: str, *argv: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), ".", ""]),
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "TRACKIO_DIR": str(tmp_path / "trackio"),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=Path(__file__).parents[1],
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )


@pytest.mark.slow
def test_the_completions_table_goes_to_wandb_and_trackio(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run_tiny(tmp_path, TABLE_RUN, str(out), "wandb,trackio")
    columns = ["step", "prompt", "completion", "chars", "every_other", "length", "advantage"]
    # What completions.jsonl holds, as table rows: every completion of the round (N = 4 per
    # step), not only the num_completions_to_print=1 shown on the console, as TRL logs them.
    expected = []
    for line in (out / "completions.jsonl").read_text().splitlines():
        r = json.loads(line)
        rewards = [math.nan if r["rewards"][f] is None else r["rewards"][f] for f in columns[3:5]]
        expected.append(
            [r["step"], r["prompt"], r["completion"], *rewards, r["length"], r["advantage"]]
        )
    assert [row[0] for row in expected] == [1, 1, 1, 1, 2, 2, 2, 2]
    assert sum(math.isnan(row[4]) for row in expected) == 4  # every_other's None rows

    def same(rows: list[list]) -> None:
        assert len(rows) == len(expected)
        for got, want in zip(rows, expected, strict=True):
            assert got[:3] == want[:3] and got[5] == want[5]
            assert got[3:5] == pytest.approx(want[3:5], nan_ok=True)
            assert got[6] == pytest.approx(want[6], rel=1e-6)

    # W&B offline: the run folder holds one table file per logging step (wandb.Table's JSON).
    (wandb_run,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = sorted(
        (wandb_run / "files" / "media" / "table").glob("completions_*.table.json"),
        key=lambda p: int(p.name.split("_")[1]),
    )
    assert len(tables) == 2
    wandb_rows = []
    for path in tables:
        table = json.loads(path.read_text())
        assert table["columns"] == columns
        wandb_rows += table["data"]
    same(wandb_rows)

    # Trackio: the local store holds a `completions` table per logging step, next to the metrics.
    with sqlite3.connect(tmp_path / "trackio" / "grpokit-test.db") as db:
        logged = [json.loads(m) for (m,) in db.execute("SELECT metrics FROM metrics ORDER BY id")]
    logged_tables = [m for m in logged if "completions" in m]
    assert [m["train/global_step"] for m in logged_tables] == [1, 2]
    assert all(m["completions"]["_type"] == "trackio.table" for m in logged_tables)
    trackio_rows = []
    for m in logged_tables:
        for record in m["completions"]["_value"]:
            assert list(record) == columns
            values = [math.nan if v == "NaN" else v for v in record.values()]
            trackio_rows.append(values)
    same(trackio_rows)
    # the step's metrics were logged before its table, as TRL logs them
    steps = [
        m.get("train/global_step") for m in logged if "train/reward" in m or "completions" in m
    ]
    kinds = [
        "table" if "completions" in m else "metrics" for m in logged if m.get("train/global_step")
    ]
    assert steps == [1, 1, 2, 2] and kinds == ["metrics", "table", "metrics", "table"]
