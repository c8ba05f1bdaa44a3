"""The built-in tools an agent definition may name. Tools are code we ship, chosen by name, never by path."""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from autogen_core.tools import BaseTool, FunctionTool

__all__ = ["TOOL_NAMES", "build_tools"]

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 100:
            raise ValueError("exponent too large")
        result = _BINARY[type(node.op)](left, right)
        if isinstance(result, complex):  # a negative number to a fractional power
            raise ValueError("the result is not a real number")
        return float(result)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return float(_UNARY[type(node.op)](_evaluate(node.operand)))
    raise ValueError("only numbers and + - * / // % ** are allowed")


async def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression such as `(2 + 3) * 4`."""
    if len(expression) > 500:
        return "error: expression too long"
    try:
        result = _evaluate(ast.parse(expression, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError) as exc:
        return f"error: {exc}"
    return f"{result:g}"


async def current_time() -> str:
    """The current date and time in UTC, ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


async def word_count(text: str) -> str:
    """Count the words in a text."""
    return str(len(text.split()))


_CATALOG: dict[str, tuple[Callable[..., Any], str]] = {
    "calculator": (calculator, "Evaluate an arithmetic expression such as `(2 + 3) * 4`."),
    "current_time": (current_time, "The current date and time in UTC."),
    "word_count": (word_count, "Count the words in a text."),
}
TOOL_NAMES = tuple(sorted(_CATALOG))


def build_tools(names: list[str]) -> list[BaseTool[Any, Any]]:
    unknown = sorted(set(names) - set(_CATALOG))
    if unknown:
        raise ValueError(f"unknown tools: {', '.join(unknown)}")
    return [FunctionTool(_CATALOG[name][0], description=_CATALOG[name][1], name=name) for name in names]
