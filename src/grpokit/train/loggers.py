"""Where metrics go: a `Logger` protocol, a console progress bar, a JSONL metrics file, a
completions file and the console table of completions. The trainer talks to one `RunLogger`,
which fans out to these (the trackers of `report_to` are callbacks: `train.trackers`)."""

from __future__ import annotations

import io
import json
import logging
import math
import random
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from grpokit.tools.turns import call_metrics
from grpokit.train.checkpoint import write_text_atomic

log = logging.getLogger("grpokit")

# Shown in the progress bar's postfix, when present, in this order.
PROGRESS_KEYS = ("reward", "loss", "kl", "completions/mean_length", "step_time")


class Logger(Protocol):
    """A sink for scalar metrics, logged at an optimizer step."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record `metrics` for optimizer step `step`."""
        ...

    def close(self) -> None:
        """Flush and release resources."""
        ...


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


def keep_records_until(path: str | Path, step: int) -> int:
    """Rewrite a JSONL file keeping only the records of optimizer steps <= `step`.

    A resumed run logs again every step after its checkpoint; dropping what the interrupted run
    logged past it keeps each step once. A line that does not parse (cut by a crash) is dropped.

    Returns:
        The number of lines dropped (0 when the file does not exist).
    """
    path = Path(path)
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(kept))
        log.info("%s: dropped %d records past step %d", path.name, dropped, step)
    return dropped


class JsonlLogger:
    """Appends one JSON object per logging step to a file (`{"step": ..., **metrics}`).

    Args:
        path: the file.
        after_step: records of steps after this one already in the file are dropped first (a
            resumed run's step); None = start the file afresh.
    """

    def __init__(self, path: str | Path, after_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if after_step is None:
            self.path.unlink(missing_ok=True)
        else:
            keep_records_until(self.path, after_step)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _json_safe(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write(self, record: dict[str, Any]) -> None:
        """Append an arbitrary JSON record."""
        self._file.write(json.dumps(record, default=str) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ProgressBarLogger:
    """A tqdm bar over optimizer steps; the latest reward, loss and length in its postfix."""

    def __init__(
        self, total: int, initial: int = 0, desc: str | None = None, *, disable: bool = False
    ) -> None:
        self.bar = tqdm(
            total=total, initial=initial, desc=desc or "grpo", dynamic_ncols=True, disable=disable
        )

    def advance(self, step: int) -> None:
        """Move the bar to optimizer step `step`."""
        self.bar.update(step - self.bar.n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.advance(step)
        shown = {k: f"{metrics[k]:.4g}" for k in PROGRESS_KEYS if k in metrics}
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        self.bar.close()


class RunLogger:
    """The trainer's single logging entry point: progress bar + metrics.jsonl + completions.jsonl.

    Args:
        output_dir: directory holding `metrics.jsonl` and, when enabled, `completions.jsonl`.
        total_steps: optimizer steps of the whole run (the bar's length).
        initial_step: step the run starts from (non-zero when resuming). A fresh run (0) starts
            both files afresh; a resumed run drops their records past `initial_step`.
        log_completions: whether `log_completions` writes anything.
        run_name: shown in the bar.
        disable_tqdm: hide the progress bar.
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        total_steps: int,
        initial_step: int = 0,
        log_completions: bool = False,
        run_name: str | None = None,
        disable_tqdm: bool = False,
    ) -> None:
        out = Path(output_dir)
        self.progress = ProgressBarLogger(total_steps, initial_step, run_name, disable=disable_tqdm)
        after = initial_step or None
        self.metrics_file = JsonlLogger(out / "metrics.jsonl", after)
        completions = out / "completions.jsonl"
        self.completions_file = JsonlLogger(completions, after) if log_completions else None
        if not log_completions:  # an earlier run's file: drop what this run will not rewrite
            if after is None:
                completions.unlink(missing_ok=True)
            else:
                keep_records_until(completions, after)
        self.sinks: list[Logger] = [self.progress, self.metrics_file]

    def advance(self, step: int) -> None:
        """Move the progress bar without logging."""
        self.progress.advance(step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Send `metrics` of optimizer step `step` to every sink."""
        for sink in self.sinks:
            sink.log(step, metrics)

    def log_completions(
        self,
        step: int,
        rows: list[dict[str, Any]],
        *,
        reward_names: Sequence[str],
        print_count: int | None = None,
        seed: int = 0,
    ) -> None:
        """Write one record per completion (`completion_rows`) and print a table of
        `print_count` of them drawn at random (None = all; 0 = no table), as TRL prints with
        `num_completions_to_print`. Nothing when `log_completions` is off."""
        if self.completions_file is None:
            return
        for row in rows:
            self.completions_file.write({"step": step, **row})
        shown = sample_rows(rows, print_count, seed=seed)
        if shown:
            tqdm.write(completions_table(shown, step, reward_names), end="")

    def close(self) -> None:
        """Close every sink."""
        for sink in self.sinks:
            sink.close()
        if self.completions_file is not None:
            self.completions_file.close()


class SilentRunLogger:
    """`RunLogger`'s interface writing nothing: the logger of every process but the main one."""

    def advance(self, step: int) -> None:
        """Nothing to move."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Nothing is written."""

    def log_completions(
        self,
        step: int,
        rows: list[dict[str, Any]],
        *,
        reward_names: Sequence[str],
        print_count: int | None = None,
        seed: int = 0,
    ) -> None:
        """Nothing is written."""

    def close(self) -> None:
        """Nothing to close."""


class MetricsBuffer:
    """Metric values queued between logging steps; `flush` reduces them with `reduce_metrics`.

    Args:
        nan_inf_filter: `logging_nan_inf_filter`: the logged `loss` is the mean of the finite step
            losses (True), or of all of them, so a NaN/inf step shows (False). Other metrics
            always average their finite values.
    """

    def __init__(self, nan_inf_filter: bool = True) -> None:
        self.values: dict[str, list[float]] = defaultdict(list)
        self.nan_inf_filter = nan_inf_filter
        self.mean_keys: set[str] = set()

    def add(self, metrics: dict[str, float], *, mean: bool = False) -> None:
        """Queue one value per key; `mean=True` reduces these keys by their mean whatever their
        name (metrics that reward functions log, which TRL averages)."""
        for key, value in metrics.items():
            self.values[key].append(value)
        if mean:
            self.mean_keys.update(metrics)

    def extend(self, metrics: dict[str, list[float]]) -> None:
        """Queue several values per key (e.g. one per optimizer step)."""
        for key, values in metrics.items():
            self.values[key].extend(values)

    def flush(
        self, pool: Callable[[dict[str, list[float]]], dict[str, list[float]]] | None = None
    ) -> dict[str, float]:
        """The reduced metrics queued since the last flush; empties the buffer.

        Args:
            pool: Combines the queued values with other processes' before reducing
                (`World.gather_lists`); None = this process's alone.
        """
        values = pool(self.values) if pool is not None else self.values
        out = reduce_metrics(values, means=self.mean_keys)
        losses = values.get("loss")
        if losses and not self.nan_inf_filter:
            out["loss"] = sum(losses) / len(losses)
        self.values.clear()
        self.mean_keys.clear()
        return out


def reduce_metrics(values: dict[str, list[float]], means: Collection[str] = ()) -> dict[str, float]:
    """Reduce lists of metric values: a key whose last part starts or ends with `min` / `max`
    (`completions/min_length`, `ratio/max`, `clip_ratio/high_max`) takes the min / max; every other
    key, and every key in `means`, the mean of its finite values (NaN when there is none)."""
    out: dict[str, float] = {}
    for key, vals in values.items():
        last = key.rsplit("/", 1)[-1]
        finite = [v for v in vals if math.isfinite(v)]
        if not finite:
            out[key] = float("nan")
        elif key in means:
            out[key] = sum(finite) / len(finite)
        elif last.startswith("min") or last.endswith("_min") or last == "min":
            out[key] = min(finite)
        elif last.startswith("max") or last.endswith("_max") or last == "max":
            out[key] = max(finite)
        else:
            out[key] = sum(finite) / len(finite)
    return out


def completion_metrics(completion_mask: Any, is_truncated: Any) -> dict[str, float]:
    """Length metrics of one generation batch (TRL's names).

    Args:
        completion_mask: `[N, T]` 1 up to and including the first EOS.
        is_truncated: `[N]` bool, True = no EOS within `max_completion_length`.
    """
    return length_metrics(completion_mask.sum(1), is_truncated)


def length_metrics(lengths: Any, is_truncated: Any) -> dict[str, float]:
    """`completion_metrics` from the completions' lengths: `lengths` `[N]` tokens up to and
    including the first EOS, `is_truncated` `[N]` bool."""
    lengths = lengths.float()  # [N]
    terminated = lengths[~is_truncated]
    has_terminated = len(terminated) > 0
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": is_truncated.float().mean().item(),
        "completions/mean_terminated_length": terminated.mean().item() if has_terminated else 0.0,
        "completions/min_terminated_length": terminated.min().item() if has_terminated else 0.0,
        "completions/max_terminated_length": terminated.max().item() if has_terminated else 0.0,
    }


def tool_metrics(gen: Any) -> dict[str, float]:
    """Multi-turn metrics of one generation batch (none for a single-turn batch).

    `tools/call_frequency` (tool calls per completion) and `tools/failure_frequency` (failed
    calls / calls) are TRL's, `tools/call_rate` the completions that made a call
    (`tools.turns.call_metrics`); `tools/turns_mean` counts the model's turns per completion,
    `tools/model_tokens_mean` / `tools/tool_tokens_mean` the tokens it wrote / that were
    appended for it per completion, `tools/dropped_replies` the replies that did not fit.
    """
    if gen.tool_mask is None:
        return {}
    model = gen.model_mask  # [N, T]
    appended = gen.completion_mask * (1 - gen.tool_mask)  # [N, T]
    n = max(1, model.shape[0])
    out = {
        "tools/turns_mean": float(gen.model_turns.sum()) / n,
        "tools/model_tokens_mean": float(model.sum()) / n,
        "tools/tool_tokens_mean": float(appended.sum()) / n,
    }
    turns = gen.turns
    if turns is not None:
        out.update(call_metrics(turns.calls, turns.errors))
        out["tools/dropped_replies"] = float(sum(turns.dropped))
    return out


def name_reward_metrics(metrics: dict[str, float], names: list[str]) -> dict[str, float]:
    """Rename `rewards/{k}/...` (reward-function index) to `rewards/{names[k]}/...`, as TRL logs."""
    renamed = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == "rewards" and parts[1].isdigit():
            key = f"rewards/{names[int(parts[1])]}/{parts[2]}"
        renamed[key] = value
    return renamed


def completion_rows(
    prompts: list[Any],
    completions: list[Any],
    rewards: Any,
    combined: Any,
    advantages: Any,
    names: list[str],
    extra: dict[str, list[Any]] | None = None,
    unique_prompts: bool = False,
) -> list[dict[str, Any]]:
    """Records for the completions file, one per completion: prompt, completion, per-function
    rewards (None = does not apply), combined reward, advantage, and each `extra` column (the
    `log_extra` columns of the reward functions, N values each). With `unique_prompts`
    (`log_unique_prompts`), only the first row of each distinct prompt."""

    def finite(value: float) -> float | None:
        return value if math.isfinite(value) else None

    rows = list(range(len(prompts)))
    if unique_prompts:  # prompts may be chat messages (lists of dicts): compare their text
        firsts: dict[str, int] = {}
        for i in rows:
            firsts.setdefault(str(prompts[i]), i)
        rows = sorted(firsts.values())
    columns = extra or {}
    return [
        {
            "prompt": prompts[i],
            "completion": completions[i],
            "rewards": {name: finite(rewards[i, k].item()) for k, name in enumerate(names)},
            "reward": finite(combined[i].item()),
            "advantage": advantages[i].item(),
            **{column: values[i] for column, values in columns.items()},
        }
        for i in rows
    ]


# ---- the console table of completions ------------------------------------------------------------
ROW_KEYS = ("prompt", "completion", "rewards", "reward", "advantage")
"""The keys of a `completion_rows` record that are not `log_extra` columns."""


def sample_rows(rows: list[Any], count: int | None, *, seed: int) -> list[Any]:
    """`count` of `rows` drawn at random without replacement (seeded; in their order); all of
    them when `count` is None or not below their number, none when it is <= 0."""
    if count is None or count >= len(rows):
        return list(rows)
    if count <= 0:
        return []
    picked = sorted(random.Random(seed).sample(range(len(rows)), count))
    return [rows[i] for i in picked]


def completions_table(
    rows: list[dict[str, Any]], step: int, reward_names: Sequence[str], width: int | None = None
) -> str:
    """The completions of `rows` (`completion_rows` records) as the table TRL prints: columns
    Prompt, Completion, one per reward function, Advantage, then the `log_extra` columns;
    numbers with 2 decimals ("nan" = the reward does not apply); chat messages as their role
    in capitals over their content. Drawn with `rich` when installed (in colour on a terminal),
    else as plain text.

    Args:
        rows: The records to show.
        step: The optimizer step, in the title.
        reward_names: The reward functions, in the order of their columns.
        width: Characters per line; None = the terminal's width.
    """
    extra = [key for key in rows[0] if key not in ROW_KEYS] if rows else []
    headers = ["Prompt", "Completion", *reward_names, "Advantage", *extra]
    cells = [
        [
            _cell_text(row["prompt"]),
            _cell_text(row["completion"]),
            *(_number(row["rewards"].get(name)) for name in reward_names),
            _number(row["advantage"]),
            *(_cell_text(row.get(column)) for column in extra),
        ]
        for row in rows
    ]
    width = width or shutil.get_terminal_size().columns
    try:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
    except ImportError:
        lines = [f"Step {step}", " | ".join(headers)]
        lines += [" | ".join(c.replace("\n", "\\n") for c in row) for row in cells]
        return "\n".join(lines) + "\n"
    styles = ["bright_yellow", "bright_green"] + ["bold cyan"] * len(reward_names)
    styles += ["bold magenta"] + ["bright_white"] * len(extra)
    table = Table(show_header=True, header_style="bold white", expand=True)
    numeric = range(2, 3 + len(reward_names))
    for k, (header, style) in enumerate(zip(headers, styles, strict=True)):
        table.add_column(header, style=style, justify="right" if k in numeric else "left")
    for row in cells:
        table.add_row(*row)
        table.add_section()
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=sys.stdout.isatty(), highlight=False)
    console.print(Panel(table, expand=False, title=f"Step {step}", border_style="bold white"))
    return buffer.getvalue()


def _cell_text(value: Any) -> str:
    """A prompt, completion or extra value as text: messages as ROLE then content."""
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return "\n\n".join(
            f"{str(m.get('role', '')).upper()}\n{m.get('content', '')}" for m in value
        )
    return str(value)


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.2f}"
