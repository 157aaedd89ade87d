"""`code_tests`: reward model-written code by the fraction of test cases it passes, in the sandbox.

The completion's code (its last fenced code block, or its whole text) runs in `grpokit.sandbox`
(a separate process without network, with resource limits) followed by each test statement, each
under its own time limit (`SIGALRM` inside the sandbox); the reward is the fraction of tests that
ran without an exception. Whatever the code prints is captured and discarded, so it cannot push
the harness's report out of the output. The harness shares the process with the code it checks: a
model that deliberately inspected and forged the report could fake a pass, which the sandbox does
not prevent (it protects the machine, not the score).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from typing import Any

from grpokit.data.prompts import completion_text

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)

_HARNESS = """\
import io, json, signal, sys
def _alarm(signum, frame):
    raise TimeoutError("test timed out")
signal.signal(signal.SIGALRM, _alarm)
_out, _ns, _passed = sys.stdout, {"__name__": "__solution__"}, []
def _run(source, name):
    sys.stdout = sys.stderr = io.StringIO()
    signal.setitimer(signal.ITIMER_REAL, PER_TEST)
    try:
        exec(compile(source, name, "exec"), _ns)
        return 1
    except BaseException:
        return 0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        sys.stdout = sys.stderr = _out
_ok = _run(CODE, "solution") and _run(SETUP, "setup")
for _test in TESTS:
    _passed.append(_run(_test, "test") if _ok else 0)
_out.write("\\n" + NONCE + json.dumps(_passed) + "\\n")
"""


def extract_code(text: str) -> str:
    """The last fenced code block of `text` (```python ... ```), or the whole text."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def harness_program(
    code: str, tests: Sequence[str], setup: str, per_test: float, nonce: str
) -> str:
    """The sandboxed program: the harness with the code, setup and tests filled in."""
    values = {
        "CODE": code,
        "SETUP": setup,
        "TESTS": list(tests),
        "PER_TEST": float(per_test),
        "NONCE": nonce,
    }
    header = "".join(f"{name} = {value!r}\n" for name, value in values.items())
    return header + _HARNESS


def run_tests(
    code: str, tests: Sequence[str], setup: str = "", *, per_test_timeout: float = 5.0
) -> list[int]:
    """Run `code` then each test in the sandbox: 1 = passed, 0 = failed (all 0 when the code
    fails to run or the sandbox returns no report)."""
    from grpokit.sandbox import run_python

    if not tests:
        return []
    nonce = "@@grpokit-tests-" + secrets.token_hex(8) + "@@"
    program = harness_program(code, tests, setup, per_test_timeout, nonce)
    result = run_python(program, timeout=per_test_timeout * (len(tests) + 2) + 5.0)
    for line in reversed(result.stdout.splitlines()):
        if line.startswith(nonce):
            passed = json.loads(line[len(nonce) :])
            if isinstance(passed, list) and len(passed) == len(tests):
                return [int(bool(p)) for p in passed]
    return [0] * len(tests)


def make_code_tests(per_test_timeout: float = 5.0) -> Callable[..., list[float | None]]:
    """A `code_tests` reward function with `per_test_timeout` seconds per test."""

    def code_tests(
        completions: list[Any],
        tests: list[Sequence[str] | None],
        test_setup: list[str | None] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """Fraction of the row's `tests` (test statements) the completion's code passes, run
        after the row's `test_setup` code; None for a row without tests."""
        rewards: list[float | None] = []
        for i, completion in enumerate(completions):
            row_tests = list(tests[i] or [])
            if not row_tests:
                rewards.append(None)
                continue
            setup = (test_setup[i] if test_setup else None) or ""
            code = extract_code(completion_text(completion))
            passed = run_tests(code, row_tests, setup, per_test_timeout=per_test_timeout)
            rewards.append(sum(passed) / len(passed))
        return rewards

    return code_tests


code_tests = make_code_tests()
