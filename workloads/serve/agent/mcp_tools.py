"""MCP servers as LangChain tools: one long-lived stdio session per server, with timeouts and restarts.

    from workloads.serve.agent.mcp_tools import McpServerConfig, load_mcp_tools

    toolset, tools = await load_mcp_tools([
        McpServerConfig(name="utils", command="python",
                        args=["-m", "workloads.serve.agent.mcp_example_server"]),
    ])
    await tools[0].ainvoke({"value": 5, "from_unit": "mi", "to_unit": "km"})  # '8.04672'
    await toolset.aclose()  # stops every server process

Each tool a server lists becomes a `StructuredTool` named `<server>__<tool>` (characters outside
`[A-Za-z0-9_-]` become `_`, so the name is a valid OpenAI function name), whose `args_schema` is
the tool's JSON `inputSchema`. The tools are async only, as LangGraph's `ToolNode` calls them.

Why not langchain-mcp-adapters: it pins mcp<2, and vLLM needs mcp>=2. Its client is also
stateless by default, starting a server process for every call (for the example server, about
half a second of Python start-up); here each server runs once and serves every call.

How a session lives. The mcp SDK's stdio transport is built on anyio task groups, which must be
entered and exited in the same task. A Ray Serve replica or a FastAPI app calls tools from many
request tasks, any of which may be cancelled or finish first, so no request task can own the
session. Instead each server gets a runner task that enters the `Client` context, lists the tools,
and then parks inside its own task group. A call is started as a child of that task group and
hands its result back through an asyncio future, which the caller awaits with the call's timeout.
Stopping a session is cancelling the runner's cancel scope: the SDK then closes the server's
stdin, waits 2 s, and kills its process group, inside the runner task that opened it.

What a caller sees (every failure is a `ToolException`, which a `ToolNode` with error handling
turns into an error `ToolMessage` for the model to read):
- Arguments are checked against the tool's JSON schema before anything is sent.
- A result with `isError` raises with the server's text; the session stays up.
- A call that outlives `timeout_s` raises, and the session is stopped, because a server that
  ignored one deadline may be wedged. Calls in flight on the same session fail with it.
- A server that exits (during a call or between calls) is noticed when its stdout closes; the
  call in flight raises. In both cases the next call starts a fresh server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import jsonschema
import mcp_types as types
from langchain_core.tools import BaseTool, StructuredTool, ToolException
from mcp import Client, StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError
from pydantic import Field, ValidationError

from workloads.common.config import StrictModel

__all__ = [
    "McpServerConfig",
    "McpServerError",
    "McpToolset",
    "example_server_config",
    "load_mcp_tools",
    "tool_name",
]

logger = logging.getLogger(__name__)

# OpenAI's (and vLLM's) limit on function names: ^[a-zA-Z0-9_-]{1,64}$.
MAX_TOOL_NAME = 64
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_LIST_PAGES_CAP = 100  # a server whose pagination never ends cannot hang start-up


class McpServerConfig(StrictModel):
    """One MCP server, started as a subprocess and spoken to over its stdin/stdout."""

    name: str = Field(
        pattern=r"^[A-Za-z][A-Za-z0-9_-]*$",
        max_length=32,
        description="Short identifier; tools are exposed as `<name>__<tool>`.",
    )
    command: str = Field(min_length=1, description="Executable that starts the server.")
    args: list[str] = Field(default_factory=list, description="Arguments to `command`.")
    env: dict[str, str] | None = Field(
        default=None,
        description="Extra environment variables. The SDK passes the server only HOME, LOGNAME, "
        "PATH, SHELL, TERM and USER from this process, so anything else it needs goes here.",
    )
    cwd: str | None = Field(default=None, description="Working directory of the server.")
    tools: list[str] | None = Field(
        default=None,
        description="Tool names to expose (the server's own names, without the prefix); "
        "null exposes every tool. A name the server does not offer is an error at start.",
    )
    timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for one tool call; past it the call fails and the server "
        "is restarted on the next call.",
    )
    startup_timeout_s: float = Field(
        default=20.0, gt=0, description="Longest wait for the server to start and list its tools."
    )


class McpServerError(RuntimeError):
    """A server that cannot be started or used: the message names the server and its command."""


def tool_name(server: str, tool: str) -> str:
    """The LangChain name of `tool` on `server`: `<server>__<tool>`, unsafe characters as `_`."""
    return _NAME_UNSAFE.sub("_", f"{server}__{tool}")


def example_server_config(name: str = "utils", **overrides: Any) -> McpServerConfig:
    """The config of the example server shipped with the project, run by this interpreter."""
    args = ["-m", "workloads.serve.agent.mcp_example_server"]
    return McpServerConfig(name=name, command=sys.executable, args=args, **overrides)


# --------------------------------------------------------------------------------------------
# One session


class _SessionEnded(Exception):
    """Raised into the calls in flight when their session stops; the text says why."""


@dataclass(eq=False)
class _Session:
    """One server process and the runner task that owns its MCP client.

    `scope` is the runner's cancel scope: cancelling it (from any task on the loop) stops the
    session. It is made here, before the runner starts, so a session can be stopped even before
    its runner has run a single step.
    """

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    client: Client | None = None
    task_group: anyio.abc.TaskGroup | None = None
    runner: asyncio.Task[None] | None = None
    tools: list[types.Tool] = field(default_factory=list)
    pending: set[asyncio.Future[types.CallToolResult]] = field(default_factory=set)
    accepting: bool = False
    end_reason: str | None = None

    def stop(self, reason: str) -> None:
        """Stop the session (idempotent); the first reason given is the one calls report.

        Calls in flight fail now rather than when the process is gone, which can take the SDK's
        2 s grace period and more.
        """
        self.accepting = False
        if self.end_reason is None:
            self.end_reason = reason
        self.fail_pending(self.end_reason)
        self.scope.cancel()

    def fail_pending(self, reason: str) -> None:
        for future in self.pending:
            if not future.done():
                future.set_exception(_SessionEnded(reason))


class _EofWatch:
    """The transport's read stream, passed through, that stops the session when it ends.

    The server's stdout closing is how a client learns that the server exited. Without this
    watch a server that died between calls would be found out only by the next call failing;
    with it, that call starts a fresh server instead.
    """

    def __init__(self, stream: Any, session: _Session) -> None:
        self._stream = stream
        self._session = session

    def _ended(self) -> None:
        self._session.stop("exited (its stdout closed)")

    async def receive(self) -> Any:
        try:
            return await self._stream.receive()
        except anyio.EndOfStream:
            self._ended()
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()

    def __aiter__(self) -> _EofWatch:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            self._ended()
            raise

    async def __aenter__(self) -> _EofWatch:
        await self._stream.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> bool | None:
        return await self._stream.__aexit__(*exc_info)

    def __getattr__(self, name: str) -> Any:  # `last_context`, read by the dispatcher
        return getattr(self._stream, name)


@contextlib.asynccontextmanager
async def _watched_stdio(params: StdioServerParameters, session: _Session) -> AsyncIterator[Any]:
    async with stdio_client(params, errlog=_errlog()) as (read_stream, write_stream):
        yield _EofWatch(read_stream, session), write_stream


def _errlog() -> Any:
    """Where the server's stderr goes: ours, when it is a real file (pytest and Ray swap it)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__


def _describe(exc: BaseException) -> str:
    """One line for an exception, looking inside the exception groups anyio raises."""
    while getattr(exc, "exceptions", None):  # BaseExceptionGroup, also the 3.10 backport
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    if isinstance(exc, McpServerError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return f"command not found ({exc.filename or exc})"
    if isinstance(exc, MCPError):
        return exc.error.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _list_tools(client: Client) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    for _ in range(_LIST_PAGES_CAP):
        page = await client.list_tools(cursor=cursor)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _result_text(result: types.CallToolResult) -> str:
    """Text blocks joined by newlines; other blocks named, since a chat model reads only text."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.EmbeddedResource) and isinstance(
            block.resource, types.TextResourceContents
        ):
            parts.append(block.resource.text)
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource {block.uri}]")
        else:
            parts.append(f"[{block.type} content: {getattr(block, 'mime_type', 'unknown type')}]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content)
    return "\n".join(parts)


class _Server:
    """One configured server: starts, calls and restarts its session on one event loop."""

    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self._session: _Session | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # binds to a loop on first use, not here
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def label(self) -> str:
        return f"MCP server '{self.config.name}'"

    @property
    def command_line(self) -> str:
        return " ".join([self.config.command, *self.config.args])

    @property
    def live_session(self) -> _Session | None:
        session = self._session
        return session if session is not None and session.accepting else None

    async def ensure_started(self) -> _Session:
        """The live session, starting a server process if there is none.

        Raises McpServerError when the server cannot be started.
        """
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif loop is not self._loop:
            raise McpServerError(
                f"{self.label} has its session on another event loop; "
                "make one McpToolset per event loop"
            )
        if (session := self.live_session) is not None:
            return session
        async with self._lock:  # concurrent first calls start one process, not several
            if (session := self.live_session) is not None:
                return session
            if self._closed:
                raise McpServerError(f"{self.label} was closed (McpToolset.aclose)")
            self._retire()
            session = self._session = _Session()
            ready: asyncio.Future[None] = loop.create_future()
            session.runner = asyncio.create_task(
                self._run(session, ready), name=f"mcp-{self.config.name}"
            )
            try:
                # Shielded: a caller cancelled mid-start must not cancel `ready` under the runner.
                await asyncio.shield(ready)
            except McpServerError:
                await session.runner  # already past its teardown; this only collects it
                raise
            except BaseException:
                session.stop("start-up was abandoned")
                self._retire()
                # Nobody will read the runner's start-up error; asyncio would log it as lost.
                ready.add_done_callback(lambda f: f.cancelled() or f.exception())
                raise
            return session

    def _retire(self) -> None:
        """Move the stopped session's runner aside; `aclose` waits for it to finish stopping."""
        session, self._session = self._session, None
        if session is not None and session.runner is not None and not session.runner.done():
            self._retiring.add(session.runner)
            session.runner.add_done_callback(self._retiring.discard)

    async def _run(self, session: _Session, ready: asyncio.Future[None]) -> None:
        """The runner task: opens the client, serves calls until stopped, then closes it.

        Every exit path resolves `ready` (start-up) and fails the calls still in flight, so no
        caller waits on a session that is gone.
        """
        cfg = self.config
        params = StdioServerParameters(command=cfg.command, args=cfg.args, env=cfg.env, cwd=cfg.cwd)
        client = Client(
            _watched_stdio(params, session),
            cache=None,  # tools are listed once per session; nothing to cache
            read_timeout_seconds=cfg.startup_timeout_s,  # bounds each start-up request
            client_info=types.Implementation(name="llm-ray-workloads-agent", version="0.1.0"),
        )
        failure: str | None = None
        try:
            with session.scope:
                session.scope.deadline = anyio.current_time() + cfg.startup_timeout_s
                async with client:
                    session.tools = self._select(await _list_tools(client))
                    async with anyio.create_task_group() as task_group:
                        session.client, session.task_group = client, task_group
                        session.scope.deadline = math.inf
                        session.accepting = True
                        ready.set_result(None)
                        await anyio.sleep_forever()
            if not ready.done():
                failure = session.end_reason or f"did not start in {cfg.startup_timeout_s:g} s"
        except Exception as exc:
            failure = _describe(exc)
            if ready.done():
                logger.warning("%s failed: %s", self.label, failure, exc_info=exc)
        finally:
            session.accepting = False
            session.fail_pending(session.end_reason or failure or "was stopped")
            if not ready.done():
                ready.set_exception(
                    McpServerError(
                        f"{self.label} (command: {self.command_line}) could not start: "
                        f"{failure or session.end_reason}"
                    )
                )

    def _select(self, tools: list[types.Tool]) -> list[types.Tool]:
        """Apply the allow-list. A name the server does not offer is an error: it is a typo."""
        allowed = self.config.tools
        if allowed is None:
            return tools
        offered = {tool.name for tool in tools}
        missing = [name for name in allowed if name not in offered]
        if missing:
            raise McpServerError(
                f"tools {missing} are not offered by the server; it offers {sorted(offered)}"
            )
        return [tool for tool in tools if tool.name in allowed]

    async def call(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Call `tool` with the call timeout. Every failure raises ToolException."""
        try:
            session = await self.ensure_started()
        except McpServerError as exc:
            raise ToolException(str(exc)) from None
        assert session.task_group is not None
        future: asyncio.Future[types.CallToolResult] = asyncio.get_running_loop().create_future()
        session.pending.add(future)
        session.task_group.start_soon(self._call_in_session, session, tool, arguments, future)
        timeout = self.config.timeout_s
        try:
            result = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            session.stop(f"did not answer a call to '{tool}' in {timeout:g} s")
            raise ToolException(
                f"{self.label} did not answer in {timeout:g} s (tool '{tool}'); "
                "it was stopped and will be restarted on the next call"
            ) from None
        except _SessionEnded as exc:
            raise ToolException(
                f"{self.label} {exc} during the call to '{tool}'; "
                "it will be restarted on the next call"
            ) from None
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                session.stop("exited (connection closed)")
                raise ToolException(
                    f"{self.label} exited during the call to '{tool}'; "
                    "it will be restarted on the next call"
                ) from None
            if exc.code == types.REQUEST_TIMEOUT:
                session.stop(f"did not answer a call to '{tool}' in {timeout:g} s")
                raise ToolException(
                    f"{self.label} did not answer in {timeout:g} s (tool '{tool}'); "
                    "it was stopped and will be restarted on the next call"
                ) from None
            raise ToolException(
                f"{self.label} rejected the call to '{tool}': {exc.error.message}"
            ) from None
        except ValidationError as exc:  # the SDK checks results against the output schema
            raise ToolException(
                f"{self.label} returned an invalid result for '{tool}': {exc}"
            ) from exc
        finally:
            session.pending.discard(future)
        if result.is_error:
            raise ToolException(_result_text(result) or f"tool '{tool}' failed without a message")
        return result

    async def _call_in_session(
        self,
        session: _Session,
        tool: str,
        arguments: dict[str, Any],
        future: asyncio.Future[types.CallToolResult],
    ) -> None:
        """Runs inside the runner's task group, so the SDK's cancel scopes stay in one task."""
        assert session.client is not None
        with anyio.CancelScope() as scope:
            # A caller that gives up (timeout, or its own request cancelled) cancels the call.
            future.add_done_callback(lambda f: scope.cancel() if f.cancelled() else None)
            try:
                result = await session.client.call_tool(
                    tool, arguments, read_timeout_seconds=self.config.timeout_s
                )
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(result)

    async def stop(self, *, close: bool) -> None:
        """Stop the session and wait until every process this server started has exited.

        With `close`, later calls are refused instead of starting the server again.
        """
        async with self._lock:
            self._closed = self._closed or close
            if self._session is not None:
                self._session.stop("was closed" if close else "was stopped")
            self._retire()
            retiring = list(self._retiring)
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# The toolset


class McpToolset:
    """Every configured MCP server, its session, and its tools as LangChain tools.

    Bound to the event loop it is started on (a replica's or an app's loop); `aclose` it on that
    loop. `start` is idempotent and safe to await from concurrent requests.
    """

    def __init__(self, configs: Sequence[McpServerConfig | Mapping[str, Any]]) -> None:
        parsed = [
            c if isinstance(c, McpServerConfig) else McpServerConfig.model_validate(c)
            for c in configs
        ]
        names = [c.name for c in parsed]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise McpServerError(f"MCP server names must be unique; repeated: {duplicates}")
        self._servers = {c.name: _Server(c) for c in parsed}
        self._tools: list[BaseTool] | None = None
        self._start_lock = asyncio.Lock()

    @property
    def tools(self) -> list[BaseTool]:
        """The LangChain tools, in config order then server order. Needs `start` first."""
        if self._tools is None:
            raise McpServerError("McpToolset.start() has not been awaited yet")
        return list(self._tools)

    async def start(self) -> list[BaseTool]:
        """Start every server, list their tools, and build the LangChain tools (once).

        Raises McpServerError naming the first server that cannot start; any that did start are
        stopped again.
        """
        async with self._start_lock:
            if self._tools is not None:
                return list(self._tools)
            servers = list(self._servers.values())
            results = await asyncio.gather(
                *(s.ensure_started() for s in servers), return_exceptions=True
            )
            try:
                errors = [r for r in results if isinstance(r, BaseException)]
                if errors:
                    raise errors[0]
                tools: list[BaseTool] = []
                for server, session in zip(servers, results, strict=True):
                    assert isinstance(session, _Session)
                    tools.extend(_langchain_tool(server, t) for t in session.tools)
                names = [t.name for t in tools]
                clashes = sorted({n for n in names if names.count(n) > 1})
                if clashes:
                    raise McpServerError(f"MCP tool names clash after sanitising: {clashes}")
            except BaseException:
                # Stopped, not closed: a later `start` tries again (the failure may pass).
                await asyncio.gather(*(s.stop(close=False) for s in servers))
                raise
            self._tools = tools
            return list(tools)

    async def call(self, server: str, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Call a tool by its server's own name: no schema check (the LangChain tools do that),
        the same timeout, restart and ToolException rules."""
        if server not in self._servers:
            raise McpServerError(f"no MCP server named {server!r}; have {sorted(self._servers)}")
        return await self._servers[server].call(tool, arguments)

    async def aclose(self) -> None:
        """Stop every server and wait for their processes to exit. Idempotent."""
        await asyncio.gather(*(s.stop(close=True) for s in self._servers.values()))

    async def __aenter__(self) -> McpToolset:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


def _argument_checker(
    server: _Server, tool: types.Tool, name: str
) -> Callable[[dict[str, Any]], None]:
    """A function that raises ToolException listing every way `arguments` break the schema."""
    schema = tool.input_schema
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
        validator = validator_cls(schema)
    except jsonschema.SchemaError as exc:
        logger.warning(
            "%s: tool %r has an invalid inputSchema (%s); arguments go unchecked",
            server.label,
            tool.name,
            exc.message,
        )
        return lambda arguments: None

    def check(arguments: dict[str, Any]) -> None:
        try:
            errors = sorted(validator.iter_errors(arguments), key=lambda e: list(e.absolute_path))
        except Exception as exc:  # e.g. a $ref to a remote schema: leave the check to the server
            logger.warning("%s: cannot check arguments of %r: %s", server.label, tool.name, exc)
            return
        if errors:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
                if e.absolute_path
                else e.message
                for e in errors
            )
            raise ToolException(f"invalid arguments for tool '{name}': {problems}")

    return check


def _langchain_tool(server: _Server, tool: types.Tool) -> BaseTool:
    name = tool_name(server.config.name, tool.name)
    if len(name) > MAX_TOOL_NAME:
        raise McpServerError(
            f"{server.label}: tool name {name!r} is longer than {MAX_TOOL_NAME} characters; "
            "use a shorter server name or leave the tool out with `tools:`"
        )
    check = _argument_checker(server, tool, name)

    async def call(**arguments: Any) -> tuple[str, Any]:
        check(arguments)
        result = await server.call(tool.name, arguments)
        return _result_text(result), result.structured_content

    description = tool.description or tool.title or f"Tool {tool.name!r} of {server.label}."
    return StructuredTool(
        name=name,
        description=description,
        args_schema=tool.input_schema,
        coroutine=call,
        # The text goes to the model; the structured result rides along as the artifact.
        response_format="content_and_artifact",
        metadata={"mcp_server": server.config.name, "mcp_tool": tool.name},
    )


async def load_mcp_tools(
    configs: Sequence[McpServerConfig | Mapping[str, Any]],
) -> tuple[McpToolset, list[BaseTool]]:
    """Start the servers and return the toolset (to `aclose` later) and its LangChain tools."""
    toolset = McpToolset(configs)
    return toolset, await toolset.start()
