"""MCP tools against real stdio server processes: the example server and a faulty one.

    pytest tests/unit/test_agent_mcp.py

Every test starts real server subprocesses (about half a second each: a Python start-up and the
mcp import), so these are slower than most unit tests but need no Ray. Each test runs its own
event loop with `asyncio.run`, as pytest-asyncio is not a dependency.
"""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import ToolException

from workloads.common.config import ConfigError, load_config
from workloads.serve.agent.mcp_tools import (
    McpServerConfig,
    McpServerError,
    McpToolset,
    example_server_config,
    load_mcp_tools,
    tool_name,
)

pytestmark = pytest.mark.timeout(60)

# A server that misbehaves on request. `hang` blocks in a sync sleep, as a wedged server would, so
# it cannot even notice its stdin closing: only the SDK's kill gets rid of it.
FAULTY_SERVER = textwrap.dedent(
    """
    import os
    import time

    from mcp.server.mcpserver import MCPServer

    server = MCPServer(name="faulty", log_level="WARNING")


    @server.tool()
    def pid() -> int:
        return os.getpid()


    @server.tool()
    def crash() -> str:
        os._exit(1)


    @server.tool()
    def hang(seconds: float = 60.0) -> str:
        time.sleep(seconds)
        return "woke up"


    server.run("stdio")
    """
)


@pytest.fixture
def faulty_server(tmp_path: Path):
    script = tmp_path / "faulty_server.py"
    script.write_text(FAULTY_SERVER)

    def config(**overrides) -> McpServerConfig:
        return McpServerConfig(
            name="faulty", command=sys.executable, args=[str(script)], **overrides
        )

    return config


def children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting to be reaped."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------------------------
# Config


def test_config_rejects_unknown_keys_and_bad_values(tmp_path: Path):
    path = tmp_path / "mcp.yaml"
    path.write_text("name: utils\ncommand: python\ntimeout: 5\n")
    with pytest.raises(ConfigError, match="timeout.*did you mean 'timeout_s'"):
        load_config(McpServerConfig, path)
    with pytest.raises(ValueError, match="name"):
        McpServerConfig(name="my server", command="python")
    with pytest.raises(ValueError, match="timeout_s"):
        McpServerConfig(name="utils", command="python", timeout_s=0)
    with pytest.raises(McpServerError, match="unique"):
        McpToolset([{"name": "a", "command": "x"}, {"name": "a", "command": "y"}])


def test_tool_names_are_valid_function_names():
    assert tool_name("utils", "unit_convert") == "utils__unit_convert"
    assert tool_name("fs", "read.file/v2") == "fs__read_file_v2"


# --------------------------------------------------------------------------------------------
# The example server through the LangChain tools


def test_example_server_tools_answer_through_langchain():
    async def scenario():
        toolset, tools = await load_mcp_tools([example_server_config()])
        try:
            by_name = {t.name: t for t in tools}
            assert set(by_name) == {
                "utils__unit_convert",
                "utils__word_count",
                "utils__days_between",
            }
            convert = by_name["utils__unit_convert"]
            assert convert.args_schema["required"] == ["value", "from_unit", "to_unit"]
            assert await convert.ainvoke({"value": 5, "from_unit": "mi", "to_unit": "km"}) == (
                "8.04672"
            )
            assert (
                await convert.ainvoke({"value": 212, "from_unit": "F", "to_unit": "C"}) == "100.0"
            )
            counted = await by_name["utils__word_count"].ainvoke({"text": "one two  three\nfour"})
            assert '"words": 4' in counted and '"lines": 2' in counted
            # Called as a model's tool call, the structured result rides along as the artifact.
            message = await by_name["utils__days_between"].ainvoke(
                {
                    "type": "tool_call",
                    "id": "call-1",
                    "name": "utils__days_between",
                    "args": {"start": "2024-02-01", "end": "2024-03-01"},
                }
            )
            assert isinstance(message, ToolMessage)
            assert message.content == "29" and message.artifact == {"result": 29}
        finally:
            await toolset.aclose()

    asyncio.run(scenario())


def test_allow_list_exposes_only_the_named_tools():
    async def scenario():
        toolset, tools = await load_mcp_tools([example_server_config(tools=["word_count"])])
        await toolset.aclose()
        assert [t.name for t in tools] == ["utils__word_count"]
        with pytest.raises(McpServerError, match=r"\['wordcount'\] are not offered"):
            await load_mcp_tools([example_server_config(tools=["wordcount"])])

    asyncio.run(scenario())


def test_invalid_arguments_fail_before_the_call_and_tool_errors_keep_the_session():
    async def scenario():
        toolset, tools = await load_mcp_tools([example_server_config()])
        try:
            convert = next(t for t in tools if t.name == "utils__unit_convert")
            # jsonschema's wording, not the server's pydantic "Field required": checked here.
            with pytest.raises(ToolException) as missing:
                await convert.ainvoke({"value": "five", "from_unit": "mi"})
            assert "'to_unit' is a required property" in str(missing.value)
            assert "value: 'five' is not of type 'number'" in str(missing.value)

            with pytest.raises(ToolException, match="unknown unit 'parsec'"):
                await convert.ainvoke({"value": 1, "from_unit": "parsec", "to_unit": "km"})
            days = next(t for t in tools if t.name == "utils__days_between")
            with pytest.raises(ToolException, match="not an ISO date"):
                await days.ainvoke({"start": "2024-13-01", "end": "2024-01-01"})
            # The same server process answers after the errors.
            assert (
                await convert.ainvoke({"value": 1, "from_unit": "kg", "to_unit": "g"}) == "1000.0"
            )
        finally:
            await toolset.aclose()

    asyncio.run(scenario())


def test_tool_node_turns_tool_errors_into_error_messages():
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode

    async def scenario():
        toolset, tools = await load_mcp_tools([example_server_config()])
        try:
            graph = StateGraph(MessagesState)
            graph.add_node("tools", ToolNode(tools, handle_tool_errors=True))
            graph.add_edge(START, "tools")
            graph.add_edge("tools", END)
            calls = [
                {"id": "a", "name": "utils__unit_convert", "args": {"value": 1, "from_unit": "m"}},
                {"id": "b", "name": "utils__word_count", "args": {"text": "hello world"}},
            ]
            ask = AIMessage(content="", tool_calls=calls)
            out = await graph.compile().ainvoke({"messages": [ask]})
            bad, good = out["messages"][1:]
            assert bad.status == "error" and "'to_unit' is a required property" in bad.content
            assert good.status == "success" and '"words": 2' in good.content
        finally:
            await toolset.aclose()

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# Failures: crashes, hangs, servers that never start


def test_crash_mid_call_raises_and_the_next_call_restarts_the_server(faulty_server):
    async def scenario():
        toolset, tools = await load_mcp_tools([faulty_server()])
        by_name = {t.name: t for t in tools}
        try:
            first_pid = int(await by_name["faulty__pid"].ainvoke({}))
            with pytest.raises(ToolException, match="MCP server 'faulty' exited"):
                await by_name["faulty__crash"].ainvoke({})
            second_pid = int(await by_name["faulty__pid"].ainvoke({}))
            assert second_pid != first_pid and not alive(first_pid)

            # A server that dies between calls is noticed by its stdout closing, so the next call
            # goes to a fresh process instead of failing.
            psutil.Process(second_pid).kill()
            await asyncio.sleep(0.5)
            third_pid = int(await by_name["faulty__pid"].ainvoke({}))
            assert third_pid not in (first_pid, second_pid)
        finally:
            await toolset.aclose()

    asyncio.run(scenario())


def test_hung_call_times_out_restarts_and_leaves_no_processes(faulty_server):
    before = children()

    async def scenario():
        toolset, tools = await load_mcp_tools([faulty_server(timeout_s=1)])
        by_name = {t.name: t for t in tools}
        hung_pid = int(await by_name["faulty__pid"].ainvoke({}))
        started = time.monotonic()
        with pytest.raises(ToolException, match=r"MCP server 'faulty' did not answer in 1 s"):
            await by_name["faulty__hang"].ainvoke({"seconds": 60})
        assert time.monotonic() - started < 3
        new_pid = int(await by_name["faulty__pid"].ainvoke({}))
        assert new_pid != hung_pid
        await toolset.aclose()
        return hung_pid, new_pid

    pids = asyncio.run(scenario())
    assert not any(alive(pid) for pid in pids)
    assert not any(alive(pid) for pid in children() - before)


def test_closed_toolset_refuses_calls(faulty_server):
    async def scenario():
        toolset, tools = await load_mcp_tools([faulty_server()])
        pid = int(await tools[0].ainvoke({}))
        await toolset.aclose()
        assert not alive(pid)
        with pytest.raises(ToolException, match="was closed"):
            await tools[0].ainvoke({})

    asyncio.run(scenario())


def test_servers_that_cannot_start_name_server_and_command(tmp_path: Path):
    before = children()

    async def scenario():
        missing = McpServerConfig(name="ghost", command="no-such-mcp-server-binary")
        with pytest.raises(McpServerError) as not_found:
            await McpToolset([missing]).start()
        message = str(not_found.value)
        assert "MCP server 'ghost'" in message and "no-such-mcp-server-binary" in message
        assert "not found" in message

        exits = McpServerConfig(
            name="quitter", command=sys.executable, args=["-c", "raise SystemExit(3)"]
        )
        with pytest.raises(McpServerError, match="MCP server 'quitter'.*could not start: exited"):
            await McpToolset([exits]).start()

        # Reads nothing and answers nothing: start-up gives up after startup_timeout_s.
        mute = McpServerConfig(
            name="mute",
            command=sys.executable,
            args=["-c", "import time; time.sleep(60)"],
            startup_timeout_s=1,
        )
        started = time.monotonic()
        with pytest.raises(McpServerError, match="MCP server 'mute'.*could not start"):
            await McpToolset([mute]).start()
        assert time.monotonic() - started < 8

    asyncio.run(scenario())
    assert not any(alive(pid) for pid in children() - before)
