"""The agent's built-in tools: a calculator that parses arithmetic (never `eval`) and retrieval
over the RAG app's index. MCP servers add more (`mcp_tools.py`).

Every tool has a typed argument schema (pydantic), so a call with malformed arguments is refused
by LangGraph's ToolNode with a message the model can read, before the tool runs.
"""

from __future__ import annotations

import ast
import json
import math
import operator
from collections.abc import Awaitable, Callable
from typing import Any

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field

MAX_EXPRESSION_CHARS = 500
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable[..., float]] = {
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "abs": abs,
    "round": lambda x, ndigits=0: round(x, _ndigits(ndigits)),
    "min": min,
    "max": max,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}


def _ndigits(n):
    # round(1, -10**9) builds 10**(10**9): bounded like the exponents below.
    if not isinstance(n, int) or abs(n) > 15:
        raise ToolException("round's digits must be an integer from -15 to 15")
    return n


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic: numbers, + - * / // % **, parentheses, pi, e and a few math
    functions. The expression is parsed into Python's AST and only those nodes are evaluated;
    names, attributes, subscripts and every other construct are refused, and exponents and
    magnitudes are bounded so that `9**9**9` cannot hang the replica."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolException(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolException(f"not an arithmetic expression: {exc.msg}") from None
    try:
        return _eval(tree.body)
    except ZeroDivisionError:
        raise ToolException("division by zero") from None
    except (OverflowError, ValueError) as exc:
        raise ToolException(f"cannot compute: {exc}") from None


def _eval(node: ast.AST):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolException(f"exponent {right} is larger than {MAX_EXPONENT}")
        return _bounded(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
    ):
        return _bounded(_FUNCTIONS[node.func.id](*(_eval(a) for a in node.args)))
    raise ToolException(f"unsupported in arithmetic: {ast.unparse(node)!r}")


def _bounded(value):
    if isinstance(value, complex) or abs(value) > MAX_MAGNITUDE:
        raise ToolException("result out of range")
    return value


class CalculatorArgs(BaseModel):
    expression: str = Field(description="Arithmetic, e.g. '(17 + 3) * 2 ** 10 / sqrt(16)'.")


def calculator_tool() -> StructuredTool:
    return StructuredTool.from_function(
        func=lambda expression: json.dumps(calculate(expression)),
        name="calculator",
        description="Evaluate an arithmetic expression exactly. Use it for every calculation.",
        args_schema=CalculatorArgs,
        handle_tool_error=True,
    )


class SearchArgs(BaseModel):
    query: str = Field(min_length=1, description="What to look for, in your own words.")
    k: int | None = Field(default=None, ge=1, le=10, description="How many passages to return.")


RetrieveFn = Callable[[str, int], Awaitable[dict[str, Any]]]


def retrieval_tool(retrieve: RetrieveFn, default_k: int = 4) -> StructuredTool:
    """`search_documents`: the RAG app's hybrid retrieval. `retrieve(query, k)` returns the
    Retriever deployment's answer ({"chunks": [...], "chunks_in_index": n}); the model gets
    numbered passages with their doc ids, to cite."""

    async def search_documents(query: str, k: int | None = None) -> str:
        found = await retrieve(query, k or default_k)
        if not found["chunks_in_index"]:
            raise ToolException("the document index is empty: nothing can be searched yet")
        if not found["chunks"]:
            return "No passage matches."
        return "\n\n".join(
            f"[{c['doc_id']} {c['start']}-{c['end']}]"
            + (f" {c['title']}" if c.get("title") else "")
            + f"\n{c['text']}"
            for c in found["chunks"]
        )

    return StructuredTool.from_function(
        coroutine=search_documents,
        name="search_documents",
        description="Search the knowledge base (hybrid BM25 + dense retrieval). Returns passages "
        "with their document ids and character offsets.",
        args_schema=SearchArgs,
        handle_tool_error=True,
    )
