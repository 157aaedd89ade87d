"""The built-in `python` tool: run a snippet in the sandbox, return what it printed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _clip(text: str, limit: int) -> str:
    """The first `limit` characters (and how many more there were)."""
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


def _clip_tail(text: str, limit: int) -> str:
    """The last `limit` characters (a traceback ends with the error)."""
    return text if len(text) <= limit else f"[{len(text) - limit} chars before] ..." + text[-limit:]


def python_tool(*, timeout: float = 10.0, max_chars: int = 2000) -> Callable[[str], str]:
    """A `python(code)` tool for `tools=[...]`: each call runs `code` in a new sandbox
    (`grpokit.sandbox.run_python`: no network, resource limits, `timeout` seconds) and returns
    its stdout (its first `max_chars` characters), then its stderr (its last `max_chars`) and
    how it ended."""

    def python(code: str) -> str:
        """Run a Python program and return what it printed.

        Args:
            code: The program's source; print() the values you want to see.
        """
        from grpokit.sandbox import run_python

        result: Any = run_python(code, timeout=timeout)
        parts = [_clip(result.stdout, max_chars)]
        if result.stderr:
            parts.append("stderr:\n" + _clip_tail(result.stderr, max_chars))
        if result.timed_out:
            parts.append(f"(timed out after {timeout} s)")
        elif result.exit_code not in (0, None):
            parts.append(f"(exit code {result.exit_code})")
        elif result.killed_by:
            parts.append(f"(killed by {result.killed_by})")
        return "\n".join(p for p in parts if p) or "(no output)"

    return python
