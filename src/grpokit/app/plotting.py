"""Training curves as a PNG: reward and accuracy over optimizer steps (matplotlib, Agg backend).

Reads what a run leaves in its folder: `metrics.jsonl` (one record per logging step, written by
the trainer) and `eval.jsonl` (held-out evaluations written by `grpokit train`: before training,
after training). The trainer's own periodic evaluation (`eval_*` keys in `metrics.jsonl`) is drawn
too when present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSONL file; an absent file is an empty list."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a finite `key`."""
    points = [
        (float(r["step"]), float(r[key]))
        for r in records
        if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window) : i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def _plot_noisy(ax: Any, steps: list[float], values: list[float], label: str) -> None:
    """A per-step curve, faint, with its trailing 5-step mean on top (GRPO batches are small)."""
    if not steps:
        return
    line = ax.plot(steps, values, alpha=0.3, linewidth=1)[0]
    ax.plot(steps, moving_average(values, 5), color=line.get_color(), label=f"{label}, 5-step mean")


def plot_run(
    output_dir: str | Path, *, accuracy_reward: str | None = None, path: str | Path | None = None
) -> Path:
    """Draw the reward curve and the accuracy curves of a run into a PNG.

    Left panel: mean training reward per logging step (and its held-out counterpart when the
    trainer evaluated periodically). Right panel: the training mean of the accuracy reward, and
    held-out accuracy from `eval.jsonl` (before and after training) and from periodic evaluation.

    Args:
        output_dir: the run folder.
        accuracy_reward: name of the correctness reward (for its per-function curves); None = skip
            the per-function curves.
        path: where to write the PNG; default `output_dir/curves.png`.

    Returns:
        The PNG's path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    output_dir = Path(output_dir)
    metrics = read_jsonl(output_dir / "metrics.jsonl")
    evals = read_jsonl(output_dir / "eval.jsonl")
    fig, (ax_reward, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))

    steps, values = _series(metrics, "reward")
    _plot_noisy(ax_reward, steps, values, "train reward")
    steps, values = _series(metrics, "eval_reward")
    if steps:
        ax_reward.plot(steps, values, marker="o", label="held-out reward (trainer eval)")
    steps, values = _series(evals, "reward")
    if steps:
        ax_reward.scatter(steps, values, color="black", zorder=3, label="held-out reward (greedy)")
    ax_reward.set(title="Reward", xlabel="optimizer step", ylabel="reward")

    if accuracy_reward:
        key = f"rewards/{accuracy_reward}/mean"
        steps, values = _series(metrics, key)
        _plot_noisy(ax_acc, steps, values, f"train {accuracy_reward}")
        steps, values = _series(metrics, f"eval_{key}")
        if steps:
            ax_acc.plot(
                steps, values, marker="o", label=f"held-out {accuracy_reward} (trainer eval)"
            )
    steps, values = _series(evals, "accuracy")
    if steps:
        ax_acc.plot(steps, values, color="black", marker="o", zorder=3, label="held-out accuracy")
        for x, y in zip(steps, values, strict=True):
            ax_acc.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 6))
    ax_acc.set(title="Accuracy", xlabel="optimizer step", ylabel="fraction correct", ylim=(0, 1))

    for ax in (ax_reward, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(output_dir.name)
    fig.tight_layout()
    out = Path(path) if path is not None else output_dir / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
