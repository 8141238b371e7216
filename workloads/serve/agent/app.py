"""The agent application: a LangGraph agent on Ray Serve with durable threads.

    serve run serve_configs/agent-cpu.yaml        # apps llm (/), rag (/rag) and agent (/agent)

    curl localhost:8000/agent/threads/t1/runs -H 'Content-Type: application/json' \
        -d '{"message": "What is 17 * 23?", "tools": ["calculator"]}'
    curl -N localhost:8000/agent/threads/t1/runs -H 'Content-Type: application/json' \
        -d '{"message": "And divided by 7?", "stream": true}'      # SSE: steps, tokens, final
    curl localhost:8000/agent/threads/t1                           # the thread so far

One deployment, `AgentServer` (FastAPI), builds per replica:
- the chat model: LangChain's `ChatOpenAI` on the LLM app's OpenAI endpoint (tool calling needs
  the LLM app's `enable_auto_tool_choice` and a `tool_call_parser` for the model);
- the tools: `calculator`, `search_documents` (the RAG app's `Retriever` through a Serve
  deployment handle) and the tools of the configured MCP servers (stdio, one session each);
- the checkpointer: SQLite by default (a file every replica can reach), Postgres as an option,
  so a thread continues on any replica and after a replica restarts;
- the graph (`graph.py`): a tool-calling agent, or a supervisor over a researcher and a writer.

Each run takes the thread id from the path and the tool allow-list from the request (`tools`,
else the app's `default_tools`); limits, timeouts and argument validation are the graph's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ToolMessage
from ray import serve

from workloads.serve.agent.config import AgentAppConfig, CheckpointerConfig, parse_agent_args
from workloads.serve.agent.graph import Limits, build_graph, final_answer, new_run, recursion_limit
from workloads.serve.agent.tools import calculator_tool, retrieval_tool
from workloads.serve.http import error_response, json_object
from workloads.serve.llm.ingress import ServingMiddleware, api_key_from_env

logger = logging.getLogger("ray.serve")
BAD_THREAD_ID = "thread id: letters, digits and ._:- (at most 128)"
THREAD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
MAX_MESSAGE_CHARS = 32_000


async def open_checkpointer(cfg: CheckpointerConfig):
    """(saver, close coroutine function). SQLite through aiosqlite; Postgres through
    langgraph-checkpoint-postgres (the `postgres` extra), connection string from the env."""
    if cfg.kind == "sqlite":
        import aiosqlite
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        Path(cfg.path).parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(cfg.path)
        saver = AsyncSqliteSaver(conn)
        await saver.setup()
        return saver, conn.close
    try:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    except ImportError:
        raise RuntimeError(
            "checkpointer.kind postgres needs the postgres extra: "
            "pip install 'llm-ray-workloads[postgres]'"
        ) from None
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    dsn = os.environ.get(cfg.dsn_env)
    if not dsn:
        raise RuntimeError(f"checkpointer.kind postgres: ${cfg.dsn_env} is empty in this replica")
    # A pool (reconnects after a database restart), with the connection settings the saver needs.
    pool = AsyncConnectionPool(
        dsn,
        max_size=8,
        open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open()
    saver = AsyncPostgresSaver(pool)
    await saver.setup()
    return saver, pool.close


def message_json(message: BaseMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"type": message.type, "content": message.content}
    if getattr(message, "name", None):
        out["name"] = message.name
    if isinstance(message, AIMessage) and message.tool_calls:
        out["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in message.tool_calls]
    if isinstance(message, ToolMessage):
        out["tool"] = message.name
        out["status"] = message.status
    return out


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, default=str)}\n\n"


def agent_server_cls(app: FastAPI):
    @serve.ingress(app)
    class AgentServer:
        def __init__(self, cfg: dict[str, Any]):
            self.cfg = AgentAppConfig.model_validate(cfg)
            if self.cfg.require_api_key and api_key_from_env(self.cfg.api_key_env) is None:
                raise RuntimeError(
                    f"require_api_key is set but ${self.cfg.api_key_env} is empty in this replica"
                )
            self.limits = Limits(
                max_steps=self.cfg.limits.max_steps,
                max_tool_calls=self.cfg.limits.max_tool_calls,
                tool_timeout_s=self.cfg.limits.tool_timeout_s,
                max_history_tokens=self.cfg.limits.max_history_tokens,
            )
            # Threads with a run in progress on this replica, and since when. A mark older than the
            # request timeout is stale (a stream whose client left before it started never
            # clears its own), so it can never lock a thread for good.
            self._busy: dict[str, float] = {}
            self._start_lock = asyncio.Lock()
            self.graph = None
            self.tools: dict[str, Any] = {}
            self.mcp = None
            self.mcp_errors: dict[str, str] = {}
            self._close = None

        async def _started(self):
            async with self._start_lock:
                if self.graph is None:
                    await self._start()
            return self.graph

        async def _start(self) -> None:
            from langchain_openai import ChatOpenAI

            # The checkpointer first: if it cannot open, no MCP server has been started for nothing.
            saver, self._close = await open_checkpointer(self.cfg.checkpointer)
            tools = []
            if self.cfg.calculator:
                tools.append(calculator_tool())
            if self.cfg.retriever is not None:
                ref = self.cfg.retriever
                handle = serve.get_deployment_handle(
                    ref.deployment, app_name=ref.app, _check_exists=False
                )
                tools.append(
                    retrieval_tool(lambda q, k: handle.retrieve.remote(q, k), default_k=ref.k)
                )
            if self.cfg.mcp_servers:
                tools += await self._mcp_tools()
            self.tools = {t.name: t for t in tools}
            llm = self.cfg.llm
            model = ChatOpenAI(
                base_url=llm.base_url,
                model=llm.model,
                api_key=api_key_from_env(llm.api_key_env) or "unused",
                temperature=llm.temperature,
                max_tokens=llm.max_tokens,
                timeout=llm.timeout_s,
                max_retries=llm.max_retries,
                streaming=True,
            )
            self.graph = build_graph(
                model, tools, limits=self.limits, mode=self.cfg.mode, checkpointer=saver
            )
            logger.info("agent ready: mode %s, tools %s", self.cfg.mode, sorted(self.tools))

        async def _mcp_tools(self) -> list:
            """Each server's tools; a server that fails to start is left out (and reported on
            /ready and /tools), so the agent serves with the rest."""
            from workloads.serve.agent.mcp_tools import McpToolset

            tools = []
            for server in self.cfg.mcp_servers:
                if server.command in ("python", "python3"):  # the replica's own interpreter
                    server = server.model_copy(update={"command": sys.executable})
                toolset = McpToolset([server])
                try:
                    tools += await toolset.start()
                except Exception as exc:  # noqa: BLE001 - reported, not fatal
                    self.mcp_errors[server.name] = f"{type(exc).__name__}: {exc}"
                    logger.error("MCP server %s left out: %s", server.name, exc)
                    await toolset.aclose()
                    continue
                self.mcp = [*(self.mcp or []), toolset]
            return tools

        async def __del__(self):
            """Serve's graceful shutdown: stop the MCP server processes, close the checkpointer."""
            for toolset in self.mcp or []:
                await toolset.aclose()
            if self._close is not None:
                await self._close()

        def _default_tools(self) -> list[str]:
            if self.cfg.default_tools is not None:
                return [t for t in self.cfg.default_tools if t in self.tools]
            return [t for t in self.tools if t not in self.cfg.explicit_tools]

        @app.get("/ready")
        async def ready(self):
            try:
                await self._started()
            except Exception as exc:  # noqa: BLE001
                return error_response(503, f"{type(exc).__name__}: {exc}", "not_ready")
            return {"ready": True, "tools": sorted(self.tools), "mcp_errors": self.mcp_errors}

        @app.get("/tools")
        async def list_tools(self):
            try:
                await self._started()
            except Exception as exc:  # noqa: BLE001
                return error_response(
                    503, f"agent not started: {type(exc).__name__}: {exc}", "not_ready"
                )
            defaults = set(self._default_tools())
            return {
                "tools": [
                    {"name": t.name, "description": t.description, "default": t.name in defaults}
                    for t in self.tools.values()
                ],
                "mcp_errors": self.mcp_errors,
            }

        @app.get("/threads/{thread_id}")
        async def thread(self, thread_id: str):
            if not THREAD_ID.match(thread_id):
                return error_response(400, BAD_THREAD_ID)
            try:
                graph = await self._started()
            except Exception as exc:  # noqa: BLE001
                return error_response(
                    503, f"agent not started: {type(exc).__name__}: {exc}", "not_ready"
                )
            state = await graph.aget_state({"configurable": {"thread_id": thread_id}})
            if not state.values:
                return error_response(404, f"no thread {thread_id!r}", "not_found")
            return {
                "thread_id": thread_id,
                "messages": [message_json(m) for m in state.values["messages"]],
            }

        @app.post("/threads/{thread_id}/runs")
        async def run(self, thread_id: str, request: Request):
            if not THREAD_ID.match(thread_id):
                return error_response(400, BAD_THREAD_ID)
            body = await json_object(request)
            if isinstance(body, JSONResponse):
                return body
            unknown = set(body) - {"message", "tools", "stream"}
            if unknown:
                return error_response(
                    400, f"unknown keys: {sorted(unknown)}", "invalid_request_error"
                )
            message = body.get("message")
            if (
                not isinstance(message, str)
                or not message.strip()
                or len(message) > MAX_MESSAGE_CHARS
            ):
                return error_response(
                    400,
                    f"`message`: a non-empty string of at most {MAX_MESSAGE_CHARS} characters",
                    "invalid_request_error",
                )
            try:
                graph = await self._started()
            except Exception as exc:  # noqa: BLE001
                return error_response(
                    503, f"agent not started: {type(exc).__name__}: {exc}", "not_ready"
                )
            tools = body.get("tools")
            if tools is None:
                allowed = self._default_tools()
            elif isinstance(tools, list) and all(isinstance(t, str) for t in tools):
                missing = [t for t in tools if t not in self.tools]
                if missing:
                    return error_response(
                        400,
                        f"unknown tools {missing}; available: {sorted(self.tools)}",
                        "invalid_request_error",
                    )
                allowed = list(tools)
            else:
                return error_response(
                    400, "`tools` must be a list of tool names", "invalid_request_error"
                )

            config = {
                "configurable": {"thread_id": thread_id},
                "recursion_limit": recursion_limit(self.limits),
            }
            # One run at a time per thread (on this replica; route a thread's requests to one
            # replica, or use Postgres' own locking, for more): two at once would fork its history.
            started = self._busy.get(thread_id)
            if (
                started is not None
                and time.monotonic() - started < self.cfg.limits.request_timeout_s + 10
            ):
                return error_response(
                    409, f"thread {thread_id!r} has a run in progress", "conflict"
                )
            self._busy[thread_id] = time.monotonic()
            try:
                history = await self._history(graph, config)
            except Exception:
                self._busy.pop(thread_id, None)
                raise
            state_in = new_run(message, allowed, history)
            if body.get("stream"):
                return StreamingResponse(
                    self._stream(graph, state_in, config, thread_id), media_type="text/event-stream"
                )
            try:
                return await self._invoke(graph, state_in, config, thread_id, allowed, len(history))
            finally:
                self._busy.pop(thread_id, None)

        async def _invoke(self, graph, state_in, config, thread_id, allowed, before):
            try:
                state = await asyncio.wait_for(
                    graph.ainvoke(state_in, config), self.cfg.limits.request_timeout_s
                )
            except TimeoutError:
                return error_response(
                    504,
                    f"the run took longer than {self.cfg.limits.request_timeout_s:g} s",
                    "timeout",
                )
            except Exception as exc:  # noqa: BLE001 - the LLM unreachable, a bad answer: one run fails
                logger.exception("run on thread %s failed", thread_id)
                return error_response(502, f"{type(exc).__name__}: {exc}", "agent_error")
            return {
                "thread_id": thread_id,
                "answer": final_answer(state),
                "stop_reason": state.get("stop_reason"),
                "steps": state.get("steps"),
                "tool_calls": state.get("tool_calls"),
                "allowed_tools": allowed,
                "messages": [message_json(m) for m in state["messages"][before:]],
            }

        async def _history(self, graph, config) -> list:
            state = await graph.aget_state(config)
            return list(state.values.get("messages", [])) if state.values else []

        async def _stream(self, graph, state_in, config, thread_id: str):
            """SSE: `token` (model output as it is generated), `step` (each node's new messages:
            tool calls, tool results), then `final` (or `error`), then [DONE]."""
            try:
                async with asyncio.timeout(self.cfg.limits.request_timeout_s):
                    async for namespace, mode, chunk in graph.astream(
                        state_in, config, stream_mode=["updates", "messages"], subgraphs=True
                    ):
                        if mode == "messages":
                            message, meta = chunk
                            if isinstance(message, AIMessageChunk) and message.content:
                                yield _sse(
                                    "token",
                                    {
                                        "node": meta.get("langgraph_node"),
                                        "content": message.content,
                                    },
                                )
                        else:
                            for node, update in chunk.items():
                                messages = (update or {}).get("messages") or []
                                if not messages or (not namespace and node == "researcher"):
                                    continue  # the researcher's own steps came from its subgraph
                                yield _sse(
                                    "step",
                                    {"node": node, "messages": [message_json(m) for m in messages]},
                                )
                state = (await graph.aget_state(config)).values
                yield _sse(
                    "final",
                    {
                        "thread_id": thread_id,
                        "answer": final_answer(state),
                        "stop_reason": state.get("stop_reason"),
                        "steps": state.get("steps"),
                        "tool_calls": state.get("tool_calls"),
                    },
                )
            except TimeoutError:
                yield _sse("error", {"message": "the run took too long", "type": "timeout"})
            except Exception as exc:  # noqa: BLE001
                logger.exception("streamed run on thread %s failed", thread_id)
                yield _sse(
                    "error", {"message": f"{type(exc).__name__}: {exc}", "type": "agent_error"}
                )
            finally:
                self._busy.pop(thread_id, None)
            yield "data: [DONE]\n\n"

    return AgentServer


def build_app(args: dict[str, Any]):
    """Serve's application builder (`import_path: workloads.serve.agent.app:build_app`)."""
    cfg = parse_agent_args(args)
    if cfg.checkpointer.kind == "sqlite":  # replicas do not share the builder's working directory
        cfg.checkpointer.path = str(Path(cfg.checkpointer.path).expanduser().resolve())
    app = FastAPI(
        title="Agent", description="A LangGraph agent with tools, MCP and durable threads."
    )
    app.add_middleware(ServingMiddleware, api_key_env=cfg.api_key_env)
    server = serve.deployment(agent_server_cls(app), name="AgentServer", **cfg.deployment_config)
    return server.bind(cfg.model_dump(mode="json"))
