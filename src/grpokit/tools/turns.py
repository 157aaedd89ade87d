"""Tool calling between turns: `ToolCalling` (the settings) and `ToolTurns` (one batch).

`ToolTurns` is the `engines.base.TurnHandler` of one batch of N rollouts. When a row's turn ends
it reads the turn's tool calls (`parsing`); if there are none, or the row has used
`max_iterations` rounds of tool calls, the rollout is over. Otherwise the calls run in the
background (`execution.ToolRunner`: concurrently, per-call timeout, errors as messages) and the
reply (the tool messages rendered by the chat template, `chat.reply_ids`) is appended to the row;
a reply that would not fit in the completion budget ends the rollout instead (its messages are
dropped). It also keeps what the completions log and the metrics need: each reply's messages,
and the calls and errors per row.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from grpokit.tools.chat import reply_ids
from grpokit.tools.execution import ToolRunner
from grpokit.tools.parsing import ParsedTurn, ToolCall, ToolCallParser, parse_auto
from grpokit.tools.registry import Tool, make_tools


@dataclass
class ToolCalling:
    """How the model calls tools during a rollout.

    Attributes:
        tools: The standalone tools by name (`registry.make_tools`).
        parser: Reads tool calls from a turn's text (`parsing`).
        max_iterations: Rounds of tool calls per rollout; None = until the model stops calling
            tools or the completion budget is used up.
        timeout: Seconds each tool call may take; None = no limit.
    """

    tools: dict[str, Tool] = field(default_factory=dict)
    parser: ToolCallParser = parse_auto
    max_iterations: int | None = None
    timeout: float | None = None

    @classmethod
    def from_functions(
        cls, functions: Sequence[Callable[..., Any]], **settings: Any
    ) -> ToolCalling:
        """Settings for tool `functions` (validated by `registry.make_tools`)."""
        return cls(make_tools(functions), **settings)

    def schemas(self, tools: dict[str, Tool] | None = None) -> list[dict[str, Any]]:
        """JSON schemas of `tools` (default: the standalone ones) for the chat template."""
        return [tool.schema for tool in (self.tools if tools is None else tools).values()]

    def turns(
        self,
        tokenizer: Any,
        row_tools: Sequence[dict[str, Tool]],
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> ToolTurns:
        """The turn handler of one batch; `row_tools[n]` are the tools row n may call."""
        return ToolTurns(
            tokenizer,
            row_tools,
            parser=self.parser,
            runner=ToolRunner(self.timeout),
            max_iterations=self.max_iterations,
            chat_template_kwargs=chat_template_kwargs,
        )


class ToolTurns:
    """The `TurnHandler` of one batch of N tool-calling rollouts (module docstring).

    Attributes:
        replies: Per row, the messages of each reply appended, in order.
        calls: Per row, tool calls made (unreadable ones included).
        errors: Per row, calls that failed (unreadable, unknown tool, bad arguments, exception,
            timeout).
        dropped: Per row, replies that did not fit in the completion budget.
    """

    def __init__(
        self,
        tokenizer: Any,
        row_tools: Sequence[dict[str, Tool]],
        *,
        parser: ToolCallParser,
        runner: ToolRunner,
        max_iterations: int | None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> None:
        n = len(row_tools)
        self.tokenizer = tokenizer
        self.row_tools = list(row_tools)
        self.parser = parser
        self.runner = runner
        self.max_iterations = max_iterations
        self.chat_template_kwargs = chat_template_kwargs
        self.replies: list[list[list[dict[str, Any]]]] = [[] for _ in range(n)]
        self.calls = [0] * n
        self.errors = [0] * n
        self.dropped = [0] * n
        self._rounds = [0] * n
        self._specials = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._tokenizer_lock = threading.Lock()  # tool replies are rendered from worker threads
        self._executor = ThreadPoolExecutor(max_workers=max(1, min(16, n)), thread_name_prefix="tt")

    # ---- TurnHandler ---------------------------------------------------------------------------
    def end_turn(self, row: int, turn_ids: list[int], room: int) -> Future[list[int] | None] | None:
        """Run the turn's tool calls in the background, or None when the rollout is over."""
        parsed = self.parse(turn_ids)
        if not parsed.tool_calls:
            return None
        if self.max_iterations is not None and self._rounds[row] >= self.max_iterations:
            return None
        self._rounds[row] += 1
        return self._executor.submit(self._reply, row, parsed.tool_calls, room)

    def _reply(self, row: int, calls: list[ToolCall], room: int) -> list[int] | None:
        results = self.runner.run(calls, self.row_tools[row])
        messages = [result.message() for result in results]
        with self._tokenizer_lock:
            ids = reply_ids(self.tokenizer, messages, self.chat_template_kwargs)
        self.calls[row] += len(results)
        self.errors[row] += sum(result.error for result in results)
        if len(ids) >= room:  # the model must have room to write at least one token after it
            self.dropped[row] += 1
            return None
        self.replies[row].append(messages)
        return ids

    # ---- reading turns -------------------------------------------------------------------------
    def parse(self, turn_ids: list[int]) -> ParsedTurn:
        """The turn's text (special tokens kept, a final EOS dropped) split by the parser."""
        ids = list(turn_ids)
        if ids and ids[-1] in self._specials:
            ids = ids[:-1]
        with self._tokenizer_lock:
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
        return self.parser(text)

    def transcript(self, row: int, completion_ids: list[int], model: list[int]) -> list[Any]:
        """Row `row`'s completion as chat messages: its assistant turns (from the tokens,
        `model[t]` 1 = written by the model) and the tool messages appended between them."""
        messages: list[Any] = []
        replies = iter(self.replies[row])
        start = 0
        for end in range(1, len(completion_ids) + 1):
            if end < len(completion_ids) and model[end] == model[start]:
                continue
            if model[start]:
                messages.append(self.parse(completion_ids[start:end]).message())
            else:
                messages.extend(next(replies, []))
            start = end
        return messages

    def close(self) -> None:
        """Release the worker threads and the runner's event loop."""
        self._executor.shutdown(wait=True)
        self.runner.close()


def call_metrics(calls: Sequence[int], errors: Sequence[int]) -> dict[str, float]:
    """Tool-call metrics of N completions from their calls and failed calls per completion.

    `tools/call_frequency` (calls per completion) and `tools/failure_frequency` (failed calls /
    calls; 0 without calls) are TRL's; `tools/call_rate` is the fraction of completions that
    made at least one call.
    """
    n, total = max(1, len(calls)), sum(calls)
    return {
        "tools/call_frequency": total / n,
        "tools/failure_frequency": sum(errors) / total if total else 0.0,
        "tools/call_rate": sum(c > 0 for c in calls) / n,
    }
