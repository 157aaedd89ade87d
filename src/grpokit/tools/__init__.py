"""Tools and multi-turn rollouts: the model calls tools, reads their replies and goes on.

`registry` (callables to schemas), `parsing` (tool calls from text), `execution` (running calls
with timeouts), `chat` (rendering replies with the chat template), `turns` (the turn handler the
engines call between turns).
"""

from grpokit.tools.execution import ToolResult, ToolRunner
from grpokit.tools.parsing import PARSERS, ParsedTurn, ToolCall, ToolCallParser
from grpokit.tools.registry import Tool, make_tool, make_tools
from grpokit.tools.turns import ToolCalling, ToolTurns

__all__ = [
    "PARSERS",
    "ParsedTurn",
    "Tool",
    "ToolCall",
    "ToolCallParser",
    "ToolCalling",
    "ToolResult",
    "ToolRunner",
    "ToolTurns",
    "make_tool",
    "make_tools",
]
