"""The typed arguments of the RAG app: what `serve_configs/rag-*.yaml` pass as `args`.

The RAG app generates through the LLM app's `LLMServer` deployments (Serve deployment handles
across applications), so one serve config deploys both and the engine is shared with the plain
OpenAI endpoint. Unknown keys fail before any replica starts, naming the key.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from workloads.common.config import ConfigError, StrictModel, format_validation_error
from workloads.embed.chunking import ChunkConfig
from workloads.serve.llm.config import API_KEY_ENV


class RerankConfig(StrictModel):
    model: str = Field(
        description="A sentence-transformers CrossEncoder: a local folder, or a hub id on "
        "clusters (cross-encoder/ms-marco-MiniLM-L6-v2)."
    )
    top_n: int = Field(default=20, ge=1, description="How many fused candidates it rescores.")


class RetrievalConfig(StrictModel):
    k: int = Field(default=5, ge=1, description="Sources per answer (and /retrieve's default).")
    max_k: int = Field(default=20, ge=1, description="The largest k a request may ask for.")
    mode: Literal["dense", "lexical", "hybrid"] = "hybrid"
    candidates: int = Field(
        default=50, ge=1, description="Candidates from each retriever before fusion."
    )
    rrf_k: int = Field(default=60, ge=1, description="Reciprocal-rank-fusion constant.")
    rerank: RerankConfig | None = None

    @model_validator(mode="after")
    def _k_fits(self) -> RetrievalConfig:
        if self.k > self.max_k:
            raise ValueError(f"retrieval.k ({self.k}) exceeds retrieval.max_k ({self.max_k})")
        return self


class PromptConfig(StrictModel):
    max_context_chars: int = Field(
        default=6000,
        ge=200,
        description="Characters of source text in the prompt, all sources together; the last "
        "sources are shortened to fit. Size it to the model's context minus the answer.",
    )
    screen_injections: bool = Field(
        default=True,
        description="Replace sentences of retrieved text that address the model (injection "
        "patterns) with a marker, and flag the source in its citation.",
    )
    default_max_tokens: int = Field(
        default=256, ge=1, description="max_tokens when the request sets none."
    )


class IngestConfig(StrictModel):
    enabled: bool = Field(default=True, description="Serve POST /ingest.")
    max_documents: int = Field(default=1000, ge=1, description="Documents per ingest request.")
    chunk: ChunkConfig = Field(
        default_factory=ChunkConfig,
        description="Chunking of ingested documents: use the embed job's settings.",
    )


class RAGAppConfig(StrictModel):
    """Arguments of `workloads.serve.rag.app:build_app`."""

    index: str = Field(
        description="The index folder (ray_jobs/build_index.py's output, or one made with "
        "`python -m workloads.serve.rag.ingest --create`). A local path present on every "
        "serving node, or a URI."
    )
    model: str = Field(
        description="The LLM app's model id to answer with; requests may name it or one of its "
        "adapters (<model>:<adapter>)."
    )
    llm_app: str = Field(
        default="llm", description="Name of the Serve application that serves `model`."
    )
    llm_ingress: str = Field(
        default="ServingIngress",
        description="The LLM app's ingress deployment, asked which adapters exist.",
    )
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    reload_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often each retriever replica looks for new segments or a rebuilt index.",
    )
    device: str = Field(default="cpu", description="Device of the query encoder and reranker.")
    api_key_env: str | None = Field(
        default=API_KEY_ENV,
        description="Environment variable holding the API key (as in the LLM app); when set in "
        "the replica, every route but /ready needs `Authorization: Bearer <key>`.",
    )
    require_api_key: bool = False
    retriever_deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Serve options of the Retriever deployment."
    )
    ingress_deployment_config: dict[str, Any] = Field(
        default_factory=dict, description="Serve options of the RAG ingress."
    )


def parse_rag_args(args: dict[str, Any] | None) -> RAGAppConfig:
    try:
        return RAGAppConfig.model_validate(dict(args or {}))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(RAGAppConfig, exc, "rag app args")) from None
