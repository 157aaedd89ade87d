"""Running the model's tool calls: concurrently, each with a timeout, never raising.

Every call of a turn starts at once: a sync tool in a daemon thread of its own, an async tool on
the runner's event loop (a daemon thread). Each call may take `timeout` seconds; a sync call that
times out is left running in its thread (Python cannot stop a thread; run untrusted or runaway
work in the sandbox, `grpokit.sandbox`), an async one is cancelled. Whatever goes wrong (an
unreadable call, an unknown tool, bad arguments, an exception, a timeout) becomes a
`ToolResult` with `error=True` whose content tells the model what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from grpokit.tools.parsing import ToolCall
from grpokit.tools.registry import Tool


@dataclass(frozen=True)
class ToolResult:
    """What one tool call gave the model: `content` is the tool message's text."""

    name: str
    content: str
    error: bool = False

    def message(self) -> dict[str, Any]:
        """The result as a `{"role": "tool", ...}` chat message."""
        return {"role": "tool", "name": self.name, "content": self.content}


def format_result(value: Any) -> str:
    """A tool's return value as text: strings as they are, JSON for dicts and lists."""
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list)):
        try:
            return json.dumps(value, default=str)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


class ToolRunner:
    """Runs tool calls with a per-call `timeout` (seconds; None = no limit).

    Args:
        timeout: Seconds each call may take.
    """

    def __init__(self, timeout: float | None = None) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"tool timeout must be > 0 seconds or None, got {timeout}.")
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def run(self, calls: list[ToolCall], tools: dict[str, Tool]) -> list[ToolResult]:
        """Run `calls` concurrently against `tools`; one result per call, in order."""
        started: list[tuple[ToolCall, Future[Any] | ToolResult]] = []
        for call in calls:
            started.append((call, self._start(call, tools)))
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        results = []
        for call, pending in started:
            if isinstance(pending, ToolResult):
                results.append(pending)
                continue
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            results.append(self._collect(call, pending, wait))
        return results

    def _start(self, call: ToolCall, tools: dict[str, Tool]) -> Future[Any] | ToolResult:
        """Start one call, or its error result when it cannot be made."""
        if call.error is not None:
            return ToolResult(call.name or "unknown", f"Error: {call.error}", error=True)
        tool = tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(tools)) or "none"
            message = f"Error: unknown tool {call.name!r}; the tools are: {known}."
            return ToolResult(call.name, message, error=True)
        try:
            tool.bind(call.arguments)
        except TypeError as error:
            message = f"Error: bad arguments for {call.name}: {error}."
            return ToolResult(call.name, message, error=True)
        if tool.is_async:
            return asyncio.run_coroutine_threadsafe(
                tool.function(**call.arguments), self._event_loop()
            )
        return _in_daemon_thread(lambda: tool.function(**call.arguments), call.name)

    def _collect(self, call: ToolCall, pending: Future[Any], wait: float | None) -> ToolResult:
        try:
            value = pending.result(timeout=wait)
        except Exception as error:
            if not pending.done():  # our timeout, not an exception of the tool's own
                pending.cancel()  # cancels an async call; a sync thread runs on, detached
                message = f"Error: {call.name} timed out after {self.timeout} s."
                return ToolResult(call.name, message, error=True)
            message = f"Error: {call.name} raised {type(error).__name__}: {error}"
            return ToolResult(call.name, message, error=True)
        return ToolResult(call.name, format_result(value))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                threading.Thread(target=loop.run_forever, name="tools", daemon=True).start()
                self._loop = loop
            return self._loop

    def close(self) -> None:
        """Cancel the async calls still running and stop the event loop thread (if any)."""
        with self._lock:
            loop, self._loop = self._loop, None
        if loop is None:
            return
        with contextlib.suppress(Exception):  # a call that ignores cancellation: leave it
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)


async def _cancel_all() -> None:
    """Cancel every other task of the running loop and wait for them to end."""
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _in_daemon_thread(function: Callable[[], Any], name: str) -> Future[Any]:
    """`function()` in a new daemon thread; its result or exception in the returned future."""
    future: Future[Any] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function())
        except BaseException as error:  # delivered to the caller through the future
            future.set_exception(error)

    threading.Thread(target=target, name=f"tool {name}", daemon=True).start()
    return future
