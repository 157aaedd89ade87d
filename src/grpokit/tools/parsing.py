"""Reading tool calls out of an assistant turn's text.

A parser is any function `text -> ParsedTurn` (`ToolCallParser`), so a model with its own format
needs only a new function. Built in, by name (`PARSERS`):

- "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call (the
  format of Hermes, Qwen2.5/Qwen3 and the chat templates written for them; an unclosed last block
  is read to the end of the turn); a block may also hold a JSON list of calls (SmolLM2's
  `<tool_call>[{...}, ...]</tool_call>`; `[]` = no call);
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- "json": the whole turn is one JSON object `{"name": ..., "parameters"|"arguments": {...}}` or a
  list of them (Llama 3.1/3.2's JSON tool calls, optionally after `<|python_tag|>`);
- "auto" (default): "hermes" when the turn holds `<tool_call>`, "mistral" when it holds
  `[TOOL_CALLS]`, else "json".

A call that cannot be read (bad JSON, no name, arguments that are not an object) is kept as a
`ToolCall` with `error` set: the model is told what was wrong, as for any failed call.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One tool call requested by the model.

    Attributes:
        name: The tool's name ("" when it could not be read).
        arguments: Keyword arguments for the tool.
        error: Why the call could not be read, or None.
    """

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def message(self) -> dict[str, Any]:
        """The call as a chat-template `tool_calls` entry."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedTurn:
    """An assistant turn split into its text and its tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The turn as an assistant message (with `tool_calls` when it made any)."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [call.message() for call in self.tool_calls]
        return message


ToolCallParser = Callable[[str], ParsedTurn]

_HERMES = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)


def call_from_json(body: str) -> ToolCall:
    """A `ToolCall` from one JSON object `{"name", "arguments" | "parameters"}` (error if not)."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError as error:
        return ToolCall("", error=f"the tool call is not valid JSON ({error.msg}): {body[:200]!r}")
    return call_from_object(value)


def call_from_object(value: Any) -> ToolCall:
    """A `ToolCall` from a decoded JSON value (error if it is not a call)."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall(
            "", error='a tool call must be a JSON object {"name": ..., "arguments": {...}}'
        )
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        with contextlib.suppress(json.JSONDecodeError):
            arguments = json.loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], error="the tool call's arguments must be a JSON object")
    return ToolCall(value["name"], arguments)


def parse_hermes(text: str) -> ParsedTurn:
    """`<tool_call>{json}</tool_call>` blocks (or `<tool_call>[{json}, ...]</tool_call>`); the
    text outside them is the content."""
    calls = []
    for body in _HERMES.findall(text):
        body = body.strip()
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            calls.append(call_from_json(body))  # the error says what is wrong with the JSON
            continue
        values = value if isinstance(value, list) else [value]
        calls.extend(call_from_object(v) for v in values)
    return ParsedTurn(_HERMES.sub("", text).strip(), calls)


def parse_mistral(text: str) -> ParsedTurn:
    """`[TOOL_CALLS]` followed by a JSON list of calls (or one call)."""
    marker = "[TOOL_CALLS]"
    if marker not in text:
        return ParsedTurn(text.strip())
    content, _, body = text.partition(marker)
    try:
        value = json.loads(body.strip())
    except json.JSONDecodeError as error:
        bad = ToolCall("", error=f"the tool calls are not valid JSON ({error.msg})")
        return ParsedTurn(content.strip(), [bad])
    values = value if isinstance(value, list) else [value]
    return ParsedTurn(content.strip(), [call_from_object(v) for v in values])


def parse_json(text: str) -> ParsedTurn:
    """The whole turn as a JSON call or list of calls; any other text is plain content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith(("{", "[")):
        return ParsedTurn(text.strip())
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return ParsedTurn(text.strip())
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, dict) and "name" in v for v in values):
        return ParsedTurn(text.strip())
    return ParsedTurn("", [call_from_object(v) for v in values])


def parse_auto(text: str) -> ParsedTurn:
    """Pick the format by its marker: hermes, mistral, else json."""
    if "<tool_call>" in text:
        return parse_hermes(text)
    if "[TOOL_CALLS]" in text:
        return parse_mistral(text)
    return parse_json(text)


PARSERS: dict[str, ToolCallParser] = {
    "auto": parse_auto,
    "hermes": parse_hermes,
    "mistral": parse_mistral,
    "json": parse_json,
}


def resolve_parser(parser: str | ToolCallParser) -> ToolCallParser:
    """A parser by name (`PARSERS`) or the callable itself.

    Raises:
        ValueError: an unknown name.
    """
    if callable(parser):
        return parser
    if parser not in PARSERS:
        raise ValueError(
            f"tool_call_parser must be one of {sorted(PARSERS)} or a function text -> ParsedTurn, "
            f"got {parser!r}."
        )
    return PARSERS[parser]
