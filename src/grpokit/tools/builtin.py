"""Built-in tools by name, and tools named in a run config.

A run config's `tools` entry is a built-in name (`"python"`, `"calculator"`), a name with the
factory's parameters (`{name: python, timeout: 5}`), or `"module:function"` for a tool of the
user's own (with parameters, `function` is a factory called with them that returns the tool).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from grpokit.rewards.builtin import import_user_callable
from grpokit.tools.calculator import calculator_tool
from grpokit.tools.python_tool import python_tool

TOOLS: dict[str, Callable[..., Callable[..., Any]]] = {
    "python": python_tool,
    "calculator": calculator_tool,
}
"""Built-in tools by name: each value is a factory taking the tool's parameters."""


def get_tool(spec: str | dict[str, Any]) -> Callable[..., Any]:
    """The tool function a spec names (not yet checked for type hints and a docstring: that is
    `registry.make_tool`).

    Args:
        spec: `"calculator"`, `"my_pkg.tools:lookup"`, or a dict with `"name"` plus the factory's
            parameters, e.g. `{"name": "python", "timeout": 5.0, "max_chars": 1000}`.

    Raises:
        ValueError: not a name or a mapping with `name`, an unknown built-in (the names are
            listed), a module that does not import or lacks the function, or parameters the
            factory does not accept.
    """
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        name, params = spec["name"], {k: v for k, v in spec.items() if k != "name"}
    else:
        raise ValueError(
            f"tool spec {spec!r} must be a name or a mapping with a 'name' key and parameters."
        )
    if ":" in name:
        function = import_user_callable(name, what="tool")
        if not params:
            return function
        try:
            return function(**params)
        except TypeError as error:
            raise ValueError(
                f"tool {name!r}: calling it with {sorted(params)} failed: {error}."
            ) from error
    if name not in TOOLS:
        raise ValueError(
            f"unknown tool {name!r}. Built-in tools: {sorted(TOOLS)}; a tool of your own is "
            "written 'module:function'."
        )
    factory = TOOLS[name]
    signature = inspect.signature(factory)
    try:
        signature.bind(**params)
    except TypeError as error:
        raise ValueError(
            f"tool {name!r}: bad parameters {sorted(params)} ({error}). It accepts: "
            f"{list(signature.parameters) or 'no parameters'}."
        ) from error
    return factory(**params)
