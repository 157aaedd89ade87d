"""Experiment trackers (`report_to`) through transformers' own integration callbacks.

`report_to` names trackers as in transformers and TRL: "tensorboard", "wandb", "trackio",
"mlflow", a list of them, "all" (every one of these that is installed) or "none". Each name
becomes transformers' integration callback (`transformers.integrations.TensorBoardCallback`,
`WandbCallback`, `TrackioCallback`, `MLflowCallback`), added ahead of the user's callbacks as
transformers' `Trainer` does, so each tracker receives the record of every logging step through
`on_log` (the record written to metrics.jsonl; keys as transformers' `rewrite_logs` shows them:
`train/reward`, `eval/reward`, ...) and is opened at `on_train_begin` and closed at
`on_train_end`. Where each writes, and the environment variables each reads, are transformers'
and the library's own:

- tensorboard: event files in `$TENSORBOARD_LOGGING_DIR`, else `output_dir/runs/<date>_<host>`.
- wandb: project `$WANDB_PROJECT` (default "huggingface"), run `run_name`; `WANDB_MODE=offline`
  writes the run to `$WANDB_DIR/wandb/offline-run-*` (default `./wandb`) without a network.
- trackio: project `project`, run `run_name`, a local SQLite store in `$TRACKIO_DIR` (default
  `$HF_HOME/trackio`); `trackio_space_id` logs to a Hugging Face Space instead.
- mlflow: `$MLFLOW_TRACKING_URI` (e.g. `file:./mlruns`, a local file store), experiment
  `$MLFLOW_EXPERIMENT_NAME`, run `run_name`; the config is logged as the run's parameters.

With `log_completions`, W&B and Trackio also get the `completions` table at each logging step,
as TRL logs it (`log_completions_table`).

Whether a tracker is installed is checked when the config is built (`resolve_report_to`), so a
missing one is an error that names the `pip install` command before anything runs. This module
imports transformers' integrations, and the trackers, only when they are used.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "trackio": (("trackio",), "pip install trackio"),
    "mlflow": (("mlflow",), "pip install mlflow"),
}
"""Supported `report_to` names: the modules any one of which makes it available (as transformers
checks) and the command that installs it (`pip install grpokit[track]` installs all four)."""


def is_installed(name: str) -> bool:
    """Whether the tracker `name` (a key of `TRACKERS`) can be imported."""
    return any(importlib.util.find_spec(module) is not None for module in TRACKERS[name][0])


def resolve_report_to(report_to: str | list[str] | None) -> list[str]:
    """`report_to` as the list of trackers to use, each checked to be known and installed.

    Args:
        report_to: A tracker name, a list of names, "all" (every tracker of `TRACKERS` that is
            installed), "none" or None (no tracker; metrics still go to the console and to
            output_dir/metrics.jsonl).

    Returns:
        Tracker names without duplicates, in the order given ("all": `TRACKERS` order).

    Raises:
        ValueError: an unknown name, or a tracker that is not installed (naming its
            `pip install` command).
    """
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if names in (["none"], []):
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if is_installed(name)]
    resolved: list[str] = []
    for name in names:
        if name not in TRACKERS:
            raise ValueError(
                f"report_to: {name!r} is not a supported tracker; use one or a list of "
                f"{sorted(TRACKERS)}, 'all' or 'none'. Another transformers integration can be "
                "passed as a callback: GRPOTrainer(callbacks=[...])."
            )
        if not is_installed(name):
            raise ValueError(
                f"report_to={name!r} needs the {name} package, which is not installed: "
                f"`{TRACKERS[name][1]}` (or `pip install grpokit[track]` for every tracker), or "
                f"remove {name!r} from report_to."
            )
        if name not in resolved:
            resolved.append(name)
    return resolved


TRACKIO_DEFAULTS: dict[str, Any] = {
    "project": "huggingface",
    "trackio_space_id": None,
    "trackio_bucket_id": None,
    "trackio_static_space_id": None,
}
"""The `GRPOConfig` fields only Trackio reads, at their defaults."""


def check_trackio_settings(args: Any) -> None:
    """Refuse Trackio settings (`TRACKIO_DEFAULTS`) changed while "trackio" is not in
    `args.report_to` (already resolved): nothing would read them.

    Raises:
        ValueError: naming the fields set.
    """
    if "trackio" in args.report_to:
        return
    values = {
        "project": args.project,
        "trackio_space_id": args.trackio_space_id,
        "trackio_bucket_id": args.trackio_bucket_id,
        "trackio_static_space_id": args.trackio_static_space_id,
    }
    changed = [name for name, value in values.items() if value != TRACKIO_DEFAULTS[name]]
    if changed:
        raise ValueError(
            f"{', '.join(changed)} only apply when logging to Trackio; add 'trackio' to "
            f"report_to (now {args.report_to or 'none'!r}) or leave them at their defaults."
        )


def tracker_callbacks(report_to: str | list[str] | None) -> list[Any]:
    """transformers' integration callbacks (instances) for the trackers of `report_to`.

    Raises:
        ValueError: as `resolve_report_to`; or wandb with `WANDB_LOG_MODEL=end`: transformers'
            callback then saves the model through a transformers `Trainer` built from `args`,
            which a `GRPOConfig` is not.
    """
    report_to = resolve_report_to(report_to)
    if not report_to:
        return []
    if "wandb" in report_to and os.getenv("WANDB_LOG_MODEL", "false").lower() == "end":
        raise ValueError(
            "WANDB_LOG_MODEL=end is not supported with grpokit (transformers' WandbCallback "
            "saves the final model through a transformers Trainer); use "
            "WANDB_LOG_MODEL=checkpoint to upload each checkpoint, or unset it."
        )
    from transformers.integrations import get_reporting_integration_callbacks

    return [callback() for callback in get_reporting_integration_callbacks(report_to)]


# ---- the completions table ---------------------------------------------------------------------
def completions_table_columns(
    step: int,
    rows: Sequence[dict[str, Any]],
    reward_names: Sequence[str],
    *,
    unique_prompts: bool = False,
) -> dict[str, list[Any]]:
    """The columns of the `completions` table, in TRL's order: `step`, `prompt`, `completion`,
    one column per reward function (NaN = does not apply), one per `log_extra` column, then
    `advantage`.

    Args:
        step: The optimizer step, repeated on every row.
        rows: `completion_rows` records of every process, in order.
        reward_names: The reward functions' names (their columns).
        unique_prompts: `log_unique_prompts`: keep only the first row of each distinct prompt.

    Prompts and completions are as the reward functions saw them: strings, or lists of chat
    messages (as TRL logs them; distinct prompts are told apart by their text).
    """
    from grpokit.train.loggers import ROW_KEYS  # not at import: the config imports this module

    if unique_prompts:
        firsts: dict[str, dict[str, Any]] = {}
        for row in rows:
            firsts.setdefault(str(row["prompt"]), row)
        rows = list(firsts.values())
    extra = [key for key in rows[0] if key not in ROW_KEYS] if rows else []
    nan = float("nan")
    return {
        "step": [step] * len(rows),
        "prompt": [row["prompt"] for row in rows],
        "completion": [row["completion"] for row in rows],
        **{
            name: [nan if (r := row["rewards"].get(name)) is None else r for row in rows]
            for name in reward_names
        },
        **{column: [row.get(column) for row in rows] for column in extra},
        "advantage": [row["advantage"] for row in rows],
    }


def log_completions_table(
    report_to: str | Sequence[str] | None, step: int, columns: dict[str, list[Any]]
) -> None:
    """Log `columns` (`completions_table_columns`) as the table `completions` to W&B
    (`wandb.Table`, when a run is open) and to Trackio (`trackio.Table`), those of them that
    `report_to` names, at step `step` (`train/global_step`, the step axis of the integration
    callbacks). Call it on the main process only, after the step's metrics were logged."""
    report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
    backends = []
    if "wandb" in report_to:
        wandb = sys.modules.get("wandb")  # imported by the callback's setup; no run, no table
        if wandb is not None and wandb.run is not None:
            backends.append(wandb)
    if "trackio" in report_to:
        import trackio

        backends.append(trackio)
    if not backends:
        return
    import pandas as pd

    frame = pd.DataFrame(columns)
    for backend in backends:
        backend.log({"completions": backend.Table(dataframe=frame), "train/global_step": step})
