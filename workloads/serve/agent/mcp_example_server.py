"""An example MCP server over stdio: unit conversion, word counts and date arithmetic.

    python -m workloads.serve.agent.mcp_example_server

It speaks MCP on stdin/stdout, so it is meant to be started by an MCP client, such as the agent's
`McpToolset` with this entry in its config:

    mcp_servers:
      - name: utils
        command: python
        args: ["-m", "workloads.serve.agent.mcp_example_server"]

The three tools are the kind of arithmetic a language model gets wrong on its own and a tool gets
right every time. They are deterministic and need no network, so tests can check exact answers.
A bad input (an unknown unit, a malformed date) raises `ToolError`, which the SDK returns as a
tool result with `isError` set: the model reads the message and can correct itself, and the
server keeps running.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import BaseModel, Field

# Exact factors to the SI base unit (metre, kilogram), from the international yard and pound
# agreement of 1959 (1 yd = 0.9144 m, 1 lb = 0.45359237 kg) and the 1929 nautical mile.
LENGTH_M = {
    "mm": 1e-3,
    "cm": 1e-2,
    "m": 1.0,
    "km": 1e3,
    "in": 0.0254,
    "ft": 0.3048,
    "yd": 0.9144,
    "mi": 1609.344,
    "nmi": 1852.0,
}
MASS_KG = {
    "mg": 1e-6,
    "g": 1e-3,
    "kg": 1.0,
    "t": 1e3,
    "oz": 0.028349523125,
    "lb": 0.45359237,
    "st": 6.35029318,
}
# Temperature is affine, not a scale: (to kelvin, from kelvin) for each unit.
TEMPERATURE = {
    "C": (lambda c: c + 273.15, lambda k: k - 273.15),
    "F": (lambda f: (f - 32.0) * 5.0 / 9.0 + 273.15, lambda k: (k - 273.15) * 9.0 / 5.0 + 32.0),
    "K": (lambda k: k, lambda k: k),
}
# Spellings a model is likely to produce, mapped to the symbols above.
ALIASES = {
    "meter": "m",
    "metre": "m",
    "meters": "m",
    "metres": "m",
    "kilometer": "km",
    "kilometre": "km",
    "kilometers": "km",
    "kilometres": "km",
    "centimeter": "cm",
    "centimeters": "cm",
    "millimeter": "mm",
    "millimeters": "mm",
    "inch": "in",
    "inches": "in",
    "foot": "ft",
    "feet": "ft",
    "yard": "yd",
    "yards": "yd",
    "mile": "mi",
    "miles": "mi",
    "gram": "g",
    "grams": "g",
    "kilogram": "kg",
    "kilograms": "kg",
    "pound": "lb",
    "pounds": "lb",
    "lbs": "lb",
    "ounce": "oz",
    "ounces": "oz",
    "tonne": "t",
    "tonnes": "t",
    "celsius": "C",
    "c": "C",
    "fahrenheit": "F",
    "f": "F",
    "kelvin": "K",
    "k": "K",
}
UNITS_HELP = f"length: {', '.join(LENGTH_M)}; mass: {', '.join(MASS_KG)}; temperature: {', '.join(TEMPERATURE)}"

server = MCPServer(
    name="workloads-example",
    instructions="Deterministic helpers: unit conversion, word counts, days between dates.",
    # Expected tool errors go back to the client; logging each at INFO would only add noise.
    log_level="WARNING",
)


def _unit(name: str) -> str:
    """The symbol for `name`: exact symbols first ("K" is kelvin), then aliases, then lower case."""
    key = name.strip()
    if key in LENGTH_M or key in MASS_KG or key in TEMPERATURE:
        return key
    return ALIASES.get(key.lower(), key.lower())


def _significant(x: float) -> float:
    """12 significant digits: drops binary noise such as 0.30000000000000004 from the answer."""
    return float(f"{x:.12g}")


@server.tool()
def unit_convert(
    value: Annotated[float, Field(description="The quantity to convert.")],
    from_unit: Annotated[str, Field(description=f"Unit of `value`. Known units: {UNITS_HELP}.")],
    to_unit: Annotated[str, Field(description="Unit to convert to, of the same dimension.")],
) -> float:
    """Convert a length, mass or temperature between units, for example 5 mi to km or 100 F to C."""
    src, dst = _unit(from_unit), _unit(to_unit)
    for table in (LENGTH_M, MASS_KG):
        if src in table and dst in table:
            return _significant(value * table[src] / table[dst])
    if src in TEMPERATURE and dst in TEMPERATURE:
        kelvin = TEMPERATURE[src][0](value)
        if kelvin < 0:
            raise ToolError(f"{value} {src} is below absolute zero")
        return _significant(TEMPERATURE[dst][1](kelvin))
    known = {*LENGTH_M, *MASS_KG, *TEMPERATURE}
    unknown = [u for u in (from_unit, to_unit) if _unit(u) not in known]
    if unknown:
        raise ToolError(f"unknown unit {unknown[0]!r}; known units are {UNITS_HELP}")
    raise ToolError(f"cannot convert {from_unit!r} to {to_unit!r}: they measure different things")


class WordCount(BaseModel):
    words: int = Field(description="Whitespace-separated words.")
    characters: int = Field(description="Characters, spaces included.")
    lines: int = Field(description="Lines (a final line without a newline counts).")


@server.tool()
def word_count(text: Annotated[str, Field(description="The text to count.")]) -> WordCount:
    """Count the words, characters and lines of a text, as `wc` does."""
    return WordCount(words=len(text.split()), characters=len(text), lines=len(text.splitlines()))


def _date(name: str, value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value.strip())
    except ValueError:
        raise ToolError(f"{name} {value!r} is not an ISO date (YYYY-MM-DD)") from None


@server.tool()
def days_between(
    start: Annotated[str, Field(description="First date, ISO format YYYY-MM-DD.")],
    end: Annotated[str, Field(description="Second date, ISO format YYYY-MM-DD.")],
) -> int:
    """Number of days from `start` to `end` (negative when `end` is earlier)."""
    return (_date("end", end) - _date("start", start)).days


def main() -> None:
    server.run("stdio")


if __name__ == "__main__":
    main()
