"""The built-in `calculator` tool: exact arithmetic on an expression, without `eval`.

The expression is parsed with `ast` and only numbers, `+ - * / // % **`, unary signs and
parentheses are evaluated; anything else (names, calls, attributes) is refused with a message the
model can read. Integers stay exact (Python's big integers); `/` gives an integer when the
division is exact, else a float. Results and powers are bounded so that no expression can take
long or use much memory.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import threading
from collections.abc import Callable
from typing import Any, TypeGuard

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type, Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[,_](?=\d)")  # 1,234 and 1_234
# Tool calls run in threads (`tools.execution`), and CPython 3.11 keeps the recursion depth of
# `ast.parse`'s tree building in state shared by threads: two parses at once could fail with
# "SystemError: AST constructor recursion depth mismatch" (python/cpython#106905; seen once in
# the calculator example's run). One parse at a time.
_PARSE_LOCK = threading.Lock()


class CalculatorError(ValueError):
    """An expression the calculator does not evaluate (its message is shown to the model)."""


def _digits(value: float) -> float:
    """Decimal digits of `value`'s integer part (0 for |value| < 1)."""
    return math.log10(abs(value)) if abs(value) >= 1 else 0.0


def evaluate_expression(expression: str, *, max_digits: int = 100) -> int | float:
    """The value of an arithmetic expression.

    Args:
        expression: e.g. `"123 * 456 - 7"`; `^` is read as a power, `×` and `÷` as `*` and
            `/`; `,` and `_` between digits and a trailing `=` are ignored.
        max_digits: Largest result (and intermediate value) allowed, in decimal digits.

    Raises:
        CalculatorError: not an arithmetic expression, division by zero, or a value over
            `max_digits` digits.
    """
    text = _DIGIT_SEPARATOR.sub("", expression.strip().rstrip("="))
    text = text.replace("^", "**").replace("×", "*").replace("÷", "/")
    if not text:
        raise CalculatorError("empty expression; write one such as 12 * 34.")
    try:
        with _PARSE_LOCK:
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError) as error:  # ValueError: an integer literal too long to read
        reason = error.msg if isinstance(error, SyntaxError) else str(error)
        raise CalculatorError(f"cannot read {expression!r} as arithmetic ({reason}).") from None
    return _evaluate(tree.body, max_digits)


def _is_number(value: object) -> TypeGuard[int | float]:
    """An int or float literal (not a bool, not complex)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _evaluate(node: ast.AST, max_digits: int) -> int | float:
    value: int | float
    if isinstance(node, ast.Constant) and _is_number(node.value):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_evaluate(node.operand, max_digits))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, max_digits), _evaluate(node.right, max_digits)
        if isinstance(node.op, ast.Pow) and right * _digits(left) > max_digits:
            raise CalculatorError(f"the result has more than {max_digits} digits.")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise CalculatorError("division by zero.") from None
        except OverflowError:
            raise CalculatorError(f"the result has more than {max_digits} digits.") from None
        if isinstance(node.op, ast.Div) and isinstance(left, int) and isinstance(right, int):
            value = left // right if left % right == 0 else value
    else:
        shown = ast.unparse(node) if isinstance(node, ast.expr) else type(node).__name__
        raise CalculatorError(
            f"{shown!r} is not arithmetic; use numbers, + - * / // % ** and parentheses."
        )
    if isinstance(value, complex) or _digits(value) > max_digits:
        raise CalculatorError(f"the result has more than {max_digits} digits or is not real.")
    return value


def calculator_tool(*, max_digits: int = 100) -> Callable[[str], str]:
    """A `calculator(expression)` tool for `tools=[...]` (`evaluate_expression`): returns the
    value as text, or `Error: ...` for an expression it does not evaluate."""

    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly and return its value.

        Args:
            expression: The arithmetic to compute, for example "1234 * 5678" (numbers, + - * /
                // % ** and parentheses).
        """
        try:
            value = evaluate_expression(expression, max_digits=max_digits)
        except CalculatorError as error:
            return f"Error: {error}"
        return str(value)

    return calculator
