"""The typed arguments of the agent app: what `serve_configs/agent-*.yaml` pass as `args`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from workloads.common.config import ConfigError, StrictModel, format_validation_error
from workloads.serve.agent.mcp_tools import McpServerConfig, tool_name
from workloads.serve.llm.config import API_KEY_ENV

BUILTIN_TOOLS = ("calculator", "search_documents")


class ChatModelConfig(StrictModel):
    base_url: str = Field(
        default="http://127.0.0.1:8000/v1",
        description="The LLM app's OpenAI endpoint (through the Serve proxy on this node).",
    )
    model: str = Field(description="Model id to use, e.g. demo-llm or demo-llm:<adapter>.")
    api_key_env: str | None = Field(
        default=API_KEY_ENV,
        description="Variable holding the LLM app's API key (the same secret as its ingress).",
    )
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    timeout_s: float = Field(default=120.0, gt=0)
    max_retries: int = Field(default=1, ge=0)


class RetrieverRef(StrictModel):
    app: str = Field(default="rag", description="The Serve app that runs the RAG Retriever.")
    deployment: str = Field(default="Retriever")
    k: int = Field(
        default=4,
        ge=1,
        le=10,
        description="Passages per search, unless the model asks for another number.",
    )


class LimitsConfig(StrictModel):
    max_steps: int = Field(default=12, ge=1, description="Model calls per request.")
    max_tool_calls: int = Field(default=8, ge=0, description="Tool calls per request.")
    tool_timeout_s: float = Field(default=30.0, gt=0, description="Per tool call.")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Per request, all steps.")
    max_history_tokens: int = Field(
        default=6000,
        ge=100,
        description="The most recent turns of a thread, up to about this many tokens, are shown "
        "to the model (the thread keeps everything). Leave room for the tools' schemas and "
        "llm.max_tokens in the model's context.",
    )


class CheckpointerConfig(StrictModel):
    kind: Literal["sqlite", "postgres"] = "sqlite"
    path: str = Field(
        default="outputs/agent/threads.sqlite",
        description="SQLite file (kind sqlite): on a volume every replica of the app can reach; "
        "replicas on several nodes need postgres.",
    )
    dsn_env: str = Field(
        default="AGENT_POSTGRES_DSN",
        description="Variable holding the Postgres connection string (kind postgres; needs the "
        "`postgres` extra).",
    )


class AgentAppConfig(StrictModel):
    """Arguments of `workloads.serve.agent.app:build_app`."""

    llm: ChatModelConfig
    mode: Literal["single", "supervisor"] = Field(
        default="single",
        description="single: one tool-calling agent; supervisor: a supervisor routing between a "
        "researcher (the tools) and a writer (no tools).",
    )
    retriever: RetrieverRef | None = Field(
        default_factory=RetrieverRef,
        description="The RAG app's Retriever, as the search_documents tool (null: no retrieval).",
    )
    calculator: bool = True
    mcp_servers: list[McpServerConfig] = Field(
        default_factory=list,
        description="MCP servers started by each replica over stdio; their tools are named "
        "<server>__<tool>.",
    )
    default_tools: list[str] | None = Field(
        default=None,
        description="The tools a request may use when it names none (null: every tool not in "
        "`explicit_tools`). A request's `tools` list replaces it.",
    )
    explicit_tools: list[str] = Field(
        default_factory=list,
        description="Tools only available to a request that names them in `tools` (side effects).",
    )
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    checkpointer: CheckpointerConfig = Field(default_factory=CheckpointerConfig)
    api_key_env: str | None = API_KEY_ENV
    require_api_key: bool = False
    deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Serve options of the agent deployment."
    )

    def configured_tools(self) -> list[str]:
        """Names of the built-in tools and the MCP tools the allow-lists of servers name (an
        MCP server without `tools` exposes what it lists at start, known only then)."""
        names = [
            n for n, on in zip(BUILTIN_TOOLS, (self.calculator, self.retriever), strict=True) if on
        ]
        for server in self.mcp_servers:
            names += [tool_name(server.name, t) for t in server.tools or []]
        return names

    @model_validator(mode="after")
    def _tools_known(self) -> AgentAppConfig:
        names = {s.name for s in self.mcp_servers}
        if len(names) != len(self.mcp_servers):
            raise ValueError("mcp_servers: names must be unique")
        known = set(self.configured_tools())
        open_servers = [s.name for s in self.mcp_servers if s.tools is None]
        for key in ("default_tools", "explicit_tools"):
            for name in getattr(self, key) or []:
                server = name.split("__", 1)[0] if "__" in name else None
                if name not in known and server not in open_servers:
                    raise ValueError(f"{key}: unknown tool {name!r} (known: {sorted(known)})")
        return self


def parse_agent_args(args: dict[str, Any] | None) -> AgentAppConfig:
    try:
        return AgentAppConfig.model_validate(dict(args or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(AgentAppConfig, exc, "agent app args")) from None
