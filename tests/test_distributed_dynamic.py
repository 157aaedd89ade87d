"""DAPO's dynamic sampling on several processes trains as one process does.

The scenarios of tests/distributed_worker.py's `DYNAMIC_SCENARIOS` run once on 1 process (here)
and once on 2 under `torchrun` (gloo, 127.0.0.1), with the deterministic `ScriptedEngine`. Each
dataset row is of kind "c" (its group's rewards are all equal: dropped) or "v" (varied: kept);
rows are read in order, 4 per generation batch, so process 0 first gets rows 0-1 and process 1
rows 2-3. An extra draw reads the processes' shortfalls from the shared order and hands them out
in rank order, so the groups drawn, kept, dropped and filled are exactly those of one process,
only spread over the two. The comments of each test work out the draws; the groups each process
ends with are the scenario's `trained` rows, which a 1-process replay (those rows in that order,
without dynamic sampling) trains on for the parameter comparison.

A process whose share is full still draws with the others: if it did not, the other would wait
in a collective forever; the launch is bounded by a timeout that kills both processes.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from tests import distributed_worker as worker
from tests.test_distributed import (
    EQUAL_METRICS,
    ROOT,
    _free_port,
    _launch,
    _max_diff,
    _metrics,
    _params,
    _wait_all,
)

DYNAMIC_METRICS = (
    "dynamic_sampling/extra_draws",
    "dynamic_sampling/dropped_groups",
    "dynamic_sampling/filled_groups",
    "dynamic_sampling/frac_reward_zero_std",
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dynamic-sampling scenarios on 2 processes (torchrun, in the background) and on 1
    process here."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    script = [str(ROOT / "tests" / "distributed_worker.py"), str(two), "dynamic"]
    launched = _launch([*torchrun, *script], two / "launch.log")
    try:
        worker.run_dynamic_scenarios(one)
    finally:  # a hang (a process left alone in a collective) ends here, killed
        (code,) = _wait_all([launched], timeout=300)
    assert code == 0, (two / "launch.log").read_text()[-3000:]
    return {"one": one, "two": two}


def _trained_prompts(run: Path) -> dict[int, list[int]]:
    """Per step, the dataset row of each trained group in completions.jsonl order (every
    process's rows gathered in rank order: process 0's groups first)."""
    rows: dict[int, list[int]] = {}
    for line in (run / "completions.jsonl").read_text().splitlines():
        record = json.loads(line)
        rows.setdefault(record["step"], []).append(int(record["prompt"].split(":")[0][1:]))
    g = worker.NUM_GENERATIONS
    return {step: ids[::g] for step, ids in rows.items()}


def _check_trains_as_one(runs: dict[str, Path], name: str) -> list[dict[str, Any]]:
    """The 2-process run trains the scenario's `trained` groups in rank order and ends with
    the parameters of the 1-process replay (those groups in that order, no dynamic sampling);
    the 1-process dynamic-sampling run draws, keeps and logs the same groups. Returns the
    2-process run's metrics records."""
    scenario = worker.DYNAMIC_SCENARIOS[name]
    one, two, replay = runs["one"] / name, runs["two"] / name, runs["one"] / f"{name}_replay"
    g = 4  # groups per step
    order = {step: list(scenario.trained[(step - 1) * g : step * g]) for step in (1, 2, 3)}
    assert _trained_prompts(two) == order
    assert _trained_prompts(replay) == order
    initial = worker.make_causal_lm(worker.make_tokenizer(), seed=0).state_dict()
    p2 = _params(two)
    assert _max_diff(_params(replay), initial) > 0.05  # lr 0.05, 3 steps: the weights moved
    assert _max_diff(_params(replay), p2) < 1e-5, _max_diff(_params(replay), p2)
    assert _max_diff(p2, _params(two, "params_rank1.pt")) == 0.0  # DDP's replicas agree
    m2 = _metrics(two)
    assert [r["step"] for r in m2] == [1, 2, 3]
    for r0, r2 in zip(_metrics(replay), m2, strict=True):
        for key in EQUAL_METRICS:
            if key in r0 and key != "epoch":  # the replay reads fewer rows
                assert math.isclose(r0[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r0, r2)
    # One process with dynamic sampling keeps the same groups (in the order it drew them), logs
    # the same counts and rollout metrics and, dapo's update not depending on the rows' order,
    # ends with the same parameters.
    assert {s: sorted(v) for s, v in _trained_prompts(one).items()} == {
        s: sorted(v) for s, v in order.items()
    }
    for r1, r2 in zip(_metrics(one), m2, strict=True):
        for key in (*EQUAL_METRICS, *DYNAMIC_METRICS):
            if key in r1:
                assert math.isclose(r1[key], r2[key], rel_tol=1e-4, abs_tol=1e-6), (key, r1, r2)
    assert _max_diff(_params(one), p2) < 1e-5, _max_diff(_params(one), p2)
    return m2


def _column(records: list[dict[str, Any]], key: str) -> list[float]:
    return [r[key] for r in records]


def test_both_processes_draw_more_and_train_as_one(runs: dict[str, Path]) -> None:
    # kinds "cvcvvcvvcccvvvcv"; shares [process 0 | process 1], extra draws handed out in rank
    # order:
    # round 1: [0c 1v | 2c 3v] both short by 1 -> draw 2: 4v to p0, 5c to p1 -> draw 1: 6v to p1
    # round 2: [7v 8c | 9c 10c] short by 1 and 2 -> draw 3: 11v to p0, 12v 13v to p1
    # round 3: [14c 15v | 0c 1v] (the epoch wraps) -> draw 2: 2c to p0, 3v to p1 -> 4v to p0
    metrics = _check_trains_as_one(runs, "dynamic_both")
    # One process holds the same groups in the order it drew them.
    assert _trained_prompts(runs["one"] / "dynamic_both") == {
        1: [1, 3, 4, 6],
        2: [7, 11, 12, 13],
        3: [15, 1, 3, 4],
    }
    assert _column(metrics, "dynamic_sampling/extra_draws") == [2.0, 1.0, 2.0]
    assert _column(metrics, "dynamic_sampling/dropped_groups") == [3.0, 3.0, 3.0]  # of 7 drawn
    assert _column(metrics, "dynamic_sampling/frac_reward_zero_std") == [3 / 7] * 3
    assert _column(metrics, "dynamic_sampling/filled_groups") == [0.0] * 3
    assert _column(metrics, "frac_reward_zero_std") == [0.0] * 3  # only varied groups trained
    assert metrics[-1]["epoch"] == pytest.approx(1 + 5 / 16)  # 16 + 5 rows read


def test_only_one_process_draws_more_without_a_hang(runs: dict[str, Path]) -> None:
    # kinds "vvcvcvcvvvvvvvcc":
    # round 1: [0v 1v | 2c 3v] p1 short -> 4c to p1 -> 5v to p1
    # round 2: [6c 7v | 8v 9v] p0 short -> 10v to p0
    # round 3: [11v 12v | 13v 14c] p1 short -> 15c to p1 -> 0v (the next epoch) to p1
    metrics = _check_trains_as_one(runs, "dynamic_one")
    assert _column(metrics, "dynamic_sampling/extra_draws") == [2.0, 1.0, 2.0]
    assert _column(metrics, "dynamic_sampling/dropped_groups") == [2.0, 1.0, 2.0]
    assert _column(metrics, "dynamic_sampling/frac_reward_zero_std") == [2 / 6, 1 / 5, 2 / 6]


def test_cap_reached_on_one_process_completes_its_share_as_one_process_would(
    runs: dict[str, Path],
) -> None:
    # kinds "vvcvccvvvvccvvvc", max_dynamic_sampling_draws=1:
    # round 1: [0v 1v | 2c 3v] p1 short -> 4c to p1; cap: p1 completes its share with its
    #          first dropped group, 2c (one process: the first dropped group, 2c, too)
    # round 2: [5c 6v | 7v 8v] p0 short -> 9v to p0
    # round 3: [10c 11c | 12v 13v] p0 short by 2 -> 14v 15c to p0; cap: p0 adds 10c
    metrics = _check_trains_as_one(runs, "dynamic_cap")
    two = runs["two"] / "dynamic_cap"
    one = runs["one"] / "dynamic_cap"
    assert _trained_prompts(one) == {1: [0, 1, 3, 2], 2: [6, 7, 8, 9], 3: [12, 13, 14, 10]}
    assert _column(metrics, "dynamic_sampling/extra_draws") == [1.0, 1.0, 1.0]
    assert _column(metrics, "dynamic_sampling/filled_groups") == [1.0, 0.0, 1.0]
    assert _column(metrics, "dynamic_sampling/dropped_groups") == [1.0, 1.0, 2.0]
    assert _column(metrics, "dynamic_sampling/frac_reward_zero_std") == [2 / 5, 1 / 5, 3 / 6]
    assert _column(metrics, "frac_reward_zero_std") == [0.25, 0.0, 0.25]  # the filled group
    # The filled group trains with advantage 0 (no policy gradient), as on one process.
    filled = [
        json.loads(line)
        for line in (two / "completions.jsonl").read_text().splitlines()
        if json.loads(line)["prompt"].startswith(("q2:", "q10:"))
    ]
    assert len(filled) == 8 and {r["advantage"] for r in filled} == {0.0}

    # The main process warns once per capped round, with the global counts of one process and
    # the process that was short; the other process says nothing.
    def said(run: str, rank: int) -> list[str]:
        text = (runs[run] / f"dynamic_cap_warnings_{rank}.txt").read_text()
        return [line for line in text.splitlines() if line.startswith("dynamic sampling")]

    expected = (
        "dynamic sampling: after 1 extra draw(s) (max_dynamic_sampling_draws) only 3 of 4 "
        "prompt groups have varied rewards; the batch is completed with 1 group(s) of equal "
        "rewards, which add no policy gradient (filled on process {}: 1 of 2)."
    )
    assert said("two", 0) == [expected.format(1), expected.format(0)]
    assert said("two", 1) == []
    assert said("one", 0) == [expected.split(" (filled")[0] + "."] * 2
