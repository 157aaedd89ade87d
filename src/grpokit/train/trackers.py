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

Whether a tracker is installed is checked when the config is built (`resolve_report_to`), so a
missing one is an error that names the `pip install` command before anything runs. This module
imports transformers' integrations only when the trainer asks for the callbacks.
"""

from __future__ import annotations

import importlib.util
import os
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
