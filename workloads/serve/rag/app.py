"""The RAG application: hybrid retrieval with citations, generating through the LLM app.

    serve run serve_configs/rag-cpu.yaml      # apps `llm` (vLLM, OpenAI API) and `rag` (/rag)

    curl localhost:8000/rag/retrieve -d '{"query": "how do I compare two sequences", "k": 3}'
    curl localhost:8000/rag/v1/chat/completions -d '{"model": "demo-llm",
        "messages": [{"role": "user", "content": "How do I compare two sequences?"}]}'
    curl localhost:8000/rag/ingest -d '{"documents": [{"id": "faq-1", "text": "..."}]}'

Two deployments:
- `Retriever` holds a snapshot of the index (`store.py`: the build job's index plus ingested
  segments), the BM25 index over the same chunks and the query encoder, and answers `retrieve`,
  `ingest` and `reload`. Each replica polls the index folder and swaps in a new snapshot when
  it changes, so ingests (from any replica, or the `ingest` command) and rebuilds reach every
  replica without a restart and without failing a request. Other apps (the agent) call it
  through a deployment handle.
- `RAGIngress` (FastAPI): an OpenAI chat endpoint whose answers are grounded in retrieved sources
  and carry `citations`, plus /retrieve, /ingest, /reload and /ready, behind the LLM app's API-key
  middleware. It generates through the LLM app's `LLMServer` deployment handle (Serve routes
  `<model>:<adapter>` to a replica holding that adapter), so there is one engine for both apps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

# The engine yields Ray's internal ErrorResponse; `ray.serve.llm.openai_api_models` only subclasses
# it, so isinstance checks must use this one.
from ray.llm._internal.serve.core.configs.openai_api_models import ErrorResponse  # noqa: E402

from workloads.serve.http import error_response, json_object
from workloads.serve.llm.ingress import (
    ServingMiddleware,
    api_key_from_env,
    first_answer_problem,
)
from workloads.serve.rag.config import RAGAppConfig, parse_rag_args
from workloads.serve.rag.prompt import build_prompt, last_user_text
from workloads.serve.rag.retrieval import HybridRetriever, Reranker, RetrievedChunk
from workloads.serve.rag.store import IndexStore, IngestDocument, Snapshot

logger = logging.getLogger("ray.serve")
READY_TIMEOUT_S = 60.0
ADAPTER_CACHE_S = 30.0


class Retriever:
    """Retrieval over the index's current snapshot; see the module docstring."""

    def __init__(self, cfg: dict[str, Any]):
        self.cfg = RAGAppConfig.model_validate(cfg)
        self.store = IndexStore(self.cfg.index, chunk=self.cfg.ingest.chunk, device=self.cfg.device)
        r = self.cfg.retrieval
        self.reranker = (
            Reranker(r.rerank.model, top_n=r.rerank.top_n, device=self.cfg.device)
            if r.rerank
            else None
        )
        snapshot = self.store.load()
        self._install(snapshot, self._retriever_for(snapshot))
        self.retriever.dense("warm up", 1)  # load the query encoder before the first request
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task | None = None
        self.reload_errors = 0

    def _retriever_for(self, snapshot: Snapshot) -> HybridRetriever:
        r = self.cfg.retrieval
        return HybridRetriever(
            snapshot.index,
            candidates=r.candidates,
            rrf_k=r.rrf_k,
            device=self.cfg.device,
            reranker=self.reranker,
        )

    def _install(self, snapshot: Snapshot, retriever: HybridRetriever) -> None:
        # One assignment: a request keeps the retriever it started with.
        self.snapshot, self.retriever = snapshot, retriever
        logger.info(
            "index %s: %d chunks (%d segments)",
            self.cfg.index,
            len(snapshot.index),
            len(snapshot.segments),
        )

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.reload_interval_s)
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a bad segment must not stop serving the last good snapshot
                self.reload_errors += 1
                logger.exception("index reload failed; still serving the previous snapshot")

    async def check_health(self) -> None:
        self._ensure_poller()  # Serve calls this every few seconds, traffic or not

    async def reload(self) -> dict[str, Any]:
        """Load the folder's changes, if any, beside the snapshot in use, then swap."""
        self._ensure_poller()
        async with self._lock:
            await self._catch_up()
        return self.stats()

    async def _catch_up(self) -> None:
        """Swap in the folder's changes, if any (the caller holds the lock)."""
        new = await asyncio.to_thread(self._refreshed)
        if new is not None:
            self._install(*new)

    def _refreshed(self) -> tuple[Snapshot, HybridRetriever] | None:
        """The changed snapshot and its retriever (BM25 index included), built off the event
        loop while requests go on with the current pair; None when nothing changed."""
        new = self.store.refresh(self.snapshot)
        return None if new is None else (new, self._retriever_for(new))

    def stats(self) -> dict[str, Any]:
        return {
            "index": self.cfg.index,
            "chunks": len(self.snapshot.index),
            "segments": len(self.snapshot.segments),
            "model": self.snapshot.index.model,
            "reload_errors": self.reload_errors,
        }

    async def retrieve(self, query: str, k: int | None = None, mode: str | None = None) -> dict:
        """{"chunks": [RetrievedChunk as dict, ...], "chunks_in_index": n}. An empty index gives
        no chunks (the caller says so); a query is never an error."""
        self._ensure_poller()
        retriever = self.retriever
        k = min(k or self.cfg.retrieval.k, self.cfg.retrieval.max_k)
        found = await asyncio.to_thread(
            retriever.retrieve, query, k, mode or self.cfg.retrieval.mode
        )
        return {
            "chunks": [c.__dict__ for c in found],
            "chunks_in_index": len(retriever.index),
        }

    async def ingest(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """Append documents as a new segment and serve them from this replica at once (the other
        replicas within reload_interval_s). Malformed entries are rejected with a reason."""
        self._ensure_poller()
        docs, rejects = [], []
        for i, raw in enumerate(documents):
            try:
                docs.append(IngestDocument.model_validate(raw))
            except ValidationError as exc:
                fields = ", ".join(".".join(map(str, e["loc"])) or "document" for e in exc.errors())
                ident = raw.get("id") if isinstance(raw, dict) else None
                rejects.append(
                    {
                        "id": str(ident if ident is not None else f"#{i}"),
                        "reason": f"malformed: {fields}",
                    }
                )
        async with self._lock:
            # Catch up with segments other replicas wrote first, so their ids count as taken.
            await self._catch_up()
            report = await asyncio.to_thread(self.store.append, self.snapshot, docs, rejects)
            await self._catch_up()
        return {**report.as_dict(), "chunks_in_index": len(self.snapshot.index)}


def _llm_deployment_name(model_id: str) -> str:
    # ray.llm's builder: "LLMServer:" + model id with "/" -> "--" and "." -> "_"
    return "LLMServer:" + model_id.replace("/", "--").replace(".", "_")


def build_rag_fastapi(api_key_env: str | None) -> FastAPI:
    app = FastAPI(title="RAG", description="Retrieval-augmented chat with citations.")
    app.add_middleware(ServingMiddleware, api_key_env=api_key_env)
    return app


def rag_ingress_cls(app: FastAPI):
    @serve.ingress(app)
    class RAGIngress:
        def __init__(self, retriever, cfg: dict[str, Any]):
            self.cfg = RAGAppConfig.model_validate(cfg)
            if self.cfg.require_api_key and api_key_from_env(self.cfg.api_key_env) is None:
                raise RuntimeError(
                    f"require_api_key is set but ${self.cfg.api_key_env} is empty in this replica"
                )
            self.retriever = retriever
            # Not checked now: the LLM app may still be deploying (one serve config starts all
            # apps at once); a call before it is up fails that request, not this replica.
            self._llm = serve.get_deployment_handle(
                _llm_deployment_name(self.cfg.model), app_name=self.cfg.llm_app, _check_exists=False
            )
            # The LLM app's ingress knows which adapters exist (its /v1/models); asked once per
            # adapter id and remembered for a while, so an unknown adapter is a 404 here too.
            self._llm_ingress = serve.get_deployment_handle(
                self.cfg.llm_ingress, app_name=self.cfg.llm_app, _check_exists=False
            )
            self._adapters_seen: dict[str, float] = {}

        async def _adapter_served(self, model: str) -> bool:
            if model == self.cfg.model:
                return True
            if (
                time.monotonic() - self._adapters_seen.get(model, -ADAPTER_CACHE_S)
                < ADAPTER_CACHE_S
            ):
                return True
            card = await self._llm_ingress.model.remote(model)
            if card is not None:
                self._adapters_seen[model] = time.monotonic()
            return card is not None

        def _llm_handle(self, model: str):
            handle = self._llm.options(stream=True)
            if model != self.cfg.model:  # an adapter: Serve's multiplexed routing
                handle = handle.options(multiplexed_model_id=model)
            return handle

        def _model(self, requested: str | None) -> str | None:
            model = requested or self.cfg.model
            base = model.split(":", 1)[0]
            return model if base == self.cfg.model else None

        @app.get("/ready")
        async def ready(self):
            from ray.serve.llm.openai_api_models import CompletionRequest

            try:
                stats = await asyncio.wait_for(self.retriever.stats.remote(), READY_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
                return error_response(503, f"{type(exc).__name__}: {exc}", "not_ready")
            call = self._llm_handle(self.cfg.model).completions.remote(
                CompletionRequest(model=self.cfg.model, prompt="ready?", max_tokens=1), None
            )
            problem = await first_answer_problem(call, READY_TIMEOUT_S)
            if problem is not None:
                return error_response(503, problem, "not_ready")
            return {"ready": True, "retriever": stats, "model": self.cfg.model}

        @app.get("/v1/models")
        async def models(self):
            return {
                "object": "list",
                "data": [{"id": self.cfg.model, "object": "model", "owned_by": "rag"}],
            }

        @app.post("/retrieve")
        async def retrieve(self, request: Request):
            body = await json_object(request)
            if isinstance(body, JSONResponse):
                return body
            query = body.get("query")
            k, mode = body.get("k"), body.get("mode")
            problem = _check_retrieval_args(query, k, mode, self.cfg)
            if problem:
                return error_response(400, problem, "invalid_request_error")
            try:
                found = await self.retriever.retrieve.remote(query, k, mode)
            except Exception as exc:  # noqa: BLE001 - a failing retriever is one failed request
                return _call_error("retriever", exc)
            if not found["chunks_in_index"]:
                return self._empty()
            chunks = [
                {**RetrievedChunk(**c).citation(), "text": c["text"]} for c in found["chunks"]
            ]
            return {"query": query, "mode": mode or self.cfg.retrieval.mode, "chunks": chunks}

        def _empty(self) -> JSONResponse:
            return error_response(
                409,
                f"the index {self.cfg.index} holds no documents yet: POST /ingest some, or "
                "build it with ray_jobs/build_index.py",
                "empty_index",
            )

        @app.post("/ingest")
        async def ingest(self, request: Request):
            if not self.cfg.ingest.enabled:
                return error_response(403, "ingest is disabled in this app's config", "forbidden")
            body = await json_object(request)
            if isinstance(body, JSONResponse):
                return body
            docs = body.get("documents")
            if not isinstance(docs, list) or not docs:
                return error_response(
                    400,
                    "`documents` must be a non-empty list of {id, text}",
                    "invalid_request_error",
                )
            if len(docs) > self.cfg.ingest.max_documents:
                return error_response(
                    413,
                    f"{len(docs)} documents; at most {self.cfg.ingest.max_documents} per request",
                    "invalid_request_error",
                )
            try:
                return await self.retriever.ingest.remote(docs)
            except Exception as exc:  # noqa: BLE001
                return _call_error("ingest", exc)

        @app.post("/reload")
        async def reload(self):
            try:
                return await self.retriever.reload.remote()
            except Exception as exc:  # noqa: BLE001
                return _call_error("reload", exc)

        @app.post("/v1/chat/completions")
        async def chat(self, request: Request):
            from ray.serve.llm.openai_api_models import ChatCompletionRequest

            body = await json_object(request)
            if isinstance(body, JSONResponse):
                return body
            options = body.pop("retrieval", None) or {}
            if not isinstance(options, dict):
                return error_response(
                    400, "`retrieval` must be an object {k, mode}", "invalid_request_error"
                )
            model = self._model(body.get("model"))
            if model is None:
                return error_response(
                    404,
                    f"model {body.get('model')!r}: this RAG app answers with {self.cfg.model!r} "
                    "or its adapters",
                    "NotFoundError",
                )
            try:
                served = await self._adapter_served(model)
            except Exception as exc:  # noqa: BLE001
                return _call_error("LLM app", exc)
            if not served:
                return error_response(
                    404,
                    f"model {model!r}: the {self.cfg.llm_app!r} app serves no such adapter",
                    "NotFoundError",
                )
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return error_response(
                    400, "`messages` must be a list of message objects", "invalid_request_error"
                )
            query = last_user_text(messages)
            if not query or not query.strip():
                return error_response(
                    400,
                    "`messages` needs a user message with text: the retrieval query",
                    "invalid_request_error",
                )
            problem = _check_retrieval_args(query, options.get("k"), options.get("mode"), self.cfg)
            if problem:
                return error_response(400, problem, "invalid_request_error")

            try:
                found = await self.retriever.retrieve.remote(
                    query, options.get("k"), options.get("mode")
                )
            except Exception as exc:  # noqa: BLE001
                return _call_error("retriever", exc)
            if not found["chunks_in_index"]:
                return self._empty()
            prompt = build_prompt(
                [RetrievedChunk(**c) for c in found["chunks"]],
                max_context_chars=self.cfg.prompt.max_context_chars,
                screen_injections=self.cfg.prompt.screen_injections,
            )
            messages = [m for m in body["messages"] if m.get("role") != "system"]
            body.update(
                model=model, messages=[{"role": "system", "content": prompt.system}, *messages]
            )
            if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
                body["max_tokens"] = self.cfg.prompt.default_max_tokens
            try:
                req = ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                where = "; ".join(
                    f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]
                )
                return error_response(400, where, "invalid_request_error")

            # The first item decides the status, as in Ray's own ingress: an engine error (an
            # unknown adapter, a prompt over the model length) is an HTTP error, not a stream.
            stream = self._llm_handle(model).chat.remote(req, None)
            try:
                first = await stream.__anext__()
            except Exception as exc:  # noqa: BLE001
                return _call_error("LLM", exc)
            error = _engine_error(first)
            if error is not None:
                stream.cancel()
                return error_response(error.error.code, error.error.message, error.error.type)
            if not req.stream:
                first = first[0] if isinstance(first, list) else first
                out = first.model_dump(mode="json", exclude_none=True)
                out["citations"] = prompt.citations
                return out
            return StreamingResponse(
                _sse_with_citations(first, stream, prompt.citations, model),
                media_type="text/event-stream",
            )

    return RAGIngress


def _engine_error(item) -> ErrorResponse | None:
    for part in item if isinstance(item, list) else [item]:
        if isinstance(part, ErrorResponse):
            return part
    return None


def _call_error(what: str, exc: Exception) -> JSONResponse:
    """A failed deployment call as a JSON error: an HTTPException raised over there (an unknown
    adapter is a 404 from the adapter loader) keeps its status, anything else is a 502."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) and 400 <= status < 600 else 502
    detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
    logger.warning("%s call failed: %s", what, detail)
    return error_response(
        status, f"{what}: {detail}", "upstream_error" if status == 502 else "error"
    )


async def _sse_with_citations(first, stream, citations: list[dict[str, Any]], model: str):
    """The LLM's event stream (`first` item already read), after a first chunk that has no
    choices and the citations (the `usage` chunk of OpenAI's API has the same shape, so clients
    accept it). An error mid-stream ends it with an error event and [DONE]."""
    head = {
        "id": f"rag-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "citations": citations,
    }
    yield f"data: {json.dumps(head)}\n\n"

    async def items():
        yield first
        async for item in stream:
            yield item

    try:
        async for item in items():
            for part in item if isinstance(item, list) else [item]:
                if isinstance(part, ErrorResponse):
                    yield f"data: {json.dumps({'error': part.error.model_dump(mode='json')})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                yield part if isinstance(part, str) else f"data: {part.model_dump_json()}\n\n"
    except Exception as exc:  # noqa: BLE001 - the client gets an error event, not a cut stream
        logger.warning("RAG stream failed: %s", exc)
        error = {"message": f"{type(exc).__name__}: {exc}", "type": "upstream_error", "code": 502}
        yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"


def _check_retrieval_args(query, k, mode, cfg: RAGAppConfig) -> str | None:
    if not isinstance(query, str) or not query.strip():
        return "`query` must be a non-empty string"
    if k is not None and (
        not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= cfg.retrieval.max_k
    ):
        return f"`k` must be an integer from 1 to {cfg.retrieval.max_k}"
    if mode is not None and mode not in ("dense", "lexical", "hybrid"):
        return "`mode` must be dense, lexical or hybrid"
    return None


def build_app(args: dict[str, Any]):
    """Serve's application builder (`import_path: workloads.serve.rag.app:build_app`)."""
    cfg = parse_rag_args(args)
    if "://" not in cfg.index:  # replicas do not share the builder's working directory
        cfg.index = str(Path(cfg.index).expanduser().resolve())
    IndexStore(cfg.index).version()  # a missing index fails here, naming the folder
    raw = cfg.model_dump(mode="json")
    retriever = serve.deployment(Retriever, name="Retriever", **cfg.retriever_deployment_config)
    ingress = serve.deployment(
        rag_ingress_cls(build_rag_fastapi(cfg.api_key_env)),
        name="RAGIngress",
        **cfg.ingress_deployment_config,
    )
    return ingress.bind(retriever.bind(raw), raw)
