"""Tools the model may call: Python callables described by their type hints and docstrings.

A tool is a function (sync or async) or a bound method with type-hinted arguments and a
Google-style docstring (a description and an `Args:` section): transformers' `get_json_schema`
turns it into the JSON schema the chat template shows the model, as TRL and transformers' chat
templates expect. Tools are called by name with keyword arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from grpokit.errors import ConfigError


@dataclass(frozen=True)
class Tool:
    """A callable the model may call.

    Attributes:
        name: The name the model calls it by (the function's `__name__`).
        function: The callable (sync or async).
        schema: Its JSON schema (`{"type": "function", "function": {...}}`).
    """

    name: str
    function: Callable[..., Any]
    schema: dict[str, Any]

    @property
    def is_async(self) -> bool:
        """Whether calling it returns a coroutine."""
        return inspect.iscoroutinefunction(self.function)

    def bind(self, arguments: dict[str, Any]) -> None:
        """Check `arguments` against the signature (raises `TypeError` naming what is wrong)."""
        inspect.signature(self.function).bind(**arguments)


def make_tool(function: Callable[..., Any]) -> Tool:
    """A `Tool` from a type-hinted function with a Google-style docstring.

    Raises:
        ConfigError: not callable, or no docstring / a missing type hint / an undocumented
            argument (the message names the function and the fix).
    """
    from transformers.utils import get_json_schema

    if not callable(function):
        raise ConfigError(f"tools: {function!r} is not callable; pass functions or methods.")
    name = getattr(function, "__name__", type(function).__name__)
    try:
        schema = get_json_schema(function)
    except Exception as error:  # transformers' DocstringParsingException / TypeHintParsingException
        raise ConfigError(
            f"tool {name!r}: {error}. A tool needs a type hint on every argument and a "
            "Google-style docstring with a description and an 'Args:' entry per argument."
        ) from error
    return Tool(name, function, schema)


def make_tools(functions: Iterable[Callable[..., Any]], where: str = "tools") -> dict[str, Tool]:
    """Tools by name.

    Raises:
        ConfigError: a bad tool (`make_tool`) or two tools with the same name.
    """
    tools: dict[str, Tool] = {}
    for function in functions:
        tool = make_tool(function)
        if tool.name in tools:
            raise ConfigError(
                f"{where}: two tools are named {tool.name!r}; the model calls tools by name, so "
                "rename one of them."
            )
        tools[tool.name] = tool
    return tools
