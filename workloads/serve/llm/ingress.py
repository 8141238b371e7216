"""The thin layer over `ray.serve.llm`'s OpenAI ingress: what a production endpoint needs and the
library leaves out. Routing, streaming, LoRA multiplexing and error bodies stay Ray's
`OpenAiIngress`; `app.build_app` puts this class where Ray's builder puts its own.

- `ServingMiddleware` (pure ASGI, so streams pass through untouched): Bearer API-key
  authentication on `/v1/*` when a key is configured (401 otherwise), and `X-Accel-Buffering: no`
  plus `Cache-Control: no-cache` on event streams so proxies (nginx, ingress controllers) do not
  buffer them.
- `PromptBudget`: 400 when prompt tokens + max_tokens exceed the model length, which vLLM would
  otherwise answer with a silently shortened completion.
- `ServingIngress`: local adapters (`adapters.py`) in /v1/models, the budget on chat and
  completions, and `GET /ready`, a real one-token generation on every model (Ray's own health
  check only asks the engine whether it is alive).
"""

import asyncio
import hmac
import json
import os
import time
from typing import Any

from fastapi import HTTPException, Request, status
from fastapi.responses import Response
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingCompletionRequest,
    ErrorResponse,
    OpenAIHTTPException,
)
from ray.llm._internal.serve.core.ingress.utils import _sanitize_chat_completion_request
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

from workloads.serve.llm.adapters import LocalAdapters
from workloads.serve.llm.config import API_KEY_ENV

# Open without a key: the readiness probe (load balancers and kubelets carry no key). CORS
# preflights carry no credentials either; Ray's CORS middleware answers them.
PUBLIC_PATHS = frozenset({"/ready"})
READY_TIMEOUT_S = 60.0
READY_CACHE_S = 5.0


def api_key_from_env(api_key_env: str | None) -> str | None:
    return (os.environ.get(api_key_env) if api_key_env else None) or None


def _needs_key(scope) -> bool:
    if scope["method"] == "OPTIONS":
        return False
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):  # an app under a route_prefix sees /<prefix>/v1/...
        path = path[len(root) :] or "/"
    return path not in PUBLIC_PATHS


class ServingMiddleware:
    """Bearer authentication and proxy-safe streaming headers, as ASGI middleware.

    The key is read from the environment of the ingress replica (`api_key_env`, set through the
    application's runtime_env or the pod's secret), never from the YAML."""

    def __init__(self, app, api_key_env: str | None = API_KEY_ENV):
        self.app = app
        self.api_key = api_key_from_env(api_key_env)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and _needs_key(scope):
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _send_json(
                    send,
                    401,
                    {
                        "error": {
                            "message": "missing or wrong API key: send Authorization: Bearer <key>",
                            "type": "authentication_error",
                            "code": 401,
                        }
                    },
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )

        async def send_with_stream_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                content_type = dict(headers).get(b"content-type", b"")
                if content_type.startswith(b"text/event-stream"):
                    headers += [(b"x-accel-buffering", b"no"), (b"cache-control", b"no-cache")]
                    message = {**message, "headers": headers}
            await send(message)

        return await self.app(scope, receive, send_with_stream_headers)


async def _send_json(send, code: int, body: dict[str, Any], extra_headers=()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": code,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class PromptBudget:
    """prompt tokens + max_tokens <= max_model_len, checked before the request reaches the engine.

    vLLM answers 400 only when the prompt alone is too long; when the prompt fits but the
    completion would not, it shortens `max_tokens` without telling the client (OpenAI's API
    answers 400). Counting needs the tokenizer and, for chat, the chat template, so this loads the
    base model's tokenizer once per ingress replica. Requests it cannot count (token-id prompts
    are counted directly; multimodal content is not) are left to vLLM's own check."""

    def __init__(self, tokenizer_source: str, max_model_len: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
        self.max_model_len = max_model_len

    def prompt_tokens(self, body) -> int | None:
        if hasattr(body, "messages"):
            try:
                ids = self.tokenizer.apply_chat_template(
                    [_text_message(m) for m in body.messages],
                    tools=[t if isinstance(t, dict) else t.model_dump() for t in body.tools]
                    if body.tools
                    else None,
                    add_generation_prompt=body.add_generation_prompt,
                    continue_final_message=getattr(body, "continue_final_message", False),
                    tokenize=True,
                    return_dict=False,
                    **(getattr(body, "chat_template_kwargs", None) or {}),
                )
            except Exception:  # noqa: BLE001 - images, templates we cannot render here
                return None
            return len(ids)
        prompt = body.prompt
        if isinstance(prompt, str):
            return len(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
            return max((len(self.tokenizer(p).input_ids) for p in prompt), default=0)
        return None

    def check(self, body) -> None:
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if max_tokens is None or getattr(body, "truncate_prompt_tokens", None) is not None:
            return  # vLLM's default completion length, or a prompt vLLM will cut to fit
        used = self.prompt_tokens(body)
        if used is not None and used + max_tokens > self.max_model_len:
            raise OpenAIHTTPException(
                status_code=status.HTTP_400_BAD_REQUEST,
                message=(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"The prompt has {used} tokens and max_tokens is {max_tokens} "
                    f"({used + max_tokens} in all). Shorten the prompt or lower max_tokens."
                ),
                type="BadRequestError",
            )


def _text_message(message) -> dict[str, Any]:
    """A chat message as a string-content template sees it: text parts joined by newlines, as
    vLLM renders them for such templates; any other part (an image) is not counted here."""
    message = dict(message if isinstance(message, dict) else message.model_dump())
    content = message.get("content")
    if isinstance(content, list):
        parts = [p if isinstance(p, dict) else dict(p) for p in content]
        if any(p.get("type") != "text" for p in parts):
            raise ValueError("non-text content")
        message["content"] = "\n".join(p["text"] for p in parts)
    return message


class ServingIngress(OpenAiIngress):
    """Ray's `OpenAiIngress` plus local adapters in the model list, the prompt budget and /ready."""

    def __init__(
        self,
        llm_deployments,
        model_cards,
        *,
        lora_paths: dict[str, str] | None = None,
        local_adapters: dict[str, LocalAdapters] | None = None,
        prompt_budgets: dict[str, tuple[str, int]] | None = None,
        pooling_models: list[str] | None = None,
        api_key_env: str | None = API_KEY_ENV,
        require_api_key: bool = False,
    ):
        if require_api_key and api_key_from_env(api_key_env) is None:
            # Fail the replica rather than serve without auth where the secret did not reach
            # this pod (Serve retries it, and the deployment shows why).
            raise RuntimeError(
                f"require_api_key is set but ${api_key_env} is empty in this ingress replica"
            )
        super().__init__(llm_deployments, model_cards, lora_paths=lora_paths)
        self._ready_at = 0.0
        self._pooling_models = set(pooling_models or ())
        self._local_adapters = dict(local_adapters or {})
        self._budgets = {m: PromptBudget(*args) for m, args in (prompt_budgets or {}).items()}

    async def model(self, model_id: str):
        from ray.llm._internal.common.utils.lora_utils import get_base_model_id, get_lora_id
        from ray.llm._internal.serve.core.configs.openai_api_models import ModelCard

        base = get_base_model_id(model_id)
        local = self._local_adapters.get(base)
        if model_id != base and local is not None:
            folder = local.folder(get_lora_id(model_id))
            if folder is not None:
                card = self._model_cards[base]
                return ModelCard(
                    id=model_id,
                    object="model",
                    owned_by=card.owned_by,
                    permission=list(card.permission),
                    metadata={**card.metadata, "base_model_id": base, "adapter_path": str(folder)},
                )
            if not self._lora_paths.get(base):
                return None
        return await super().model(model_id)

    async def models(self):
        listed = await super().models()
        have = {m.id for m in listed.data}
        for base, local in self._local_adapters.items():
            for name in local.names():
                card = await self.model(f"{base}:{name}")
                if card is not None and card.id not in have:
                    listed.data.append(card)
        return listed

    async def _check_budget(self, body) -> None:
        from ray.llm._internal.common.utils.lora_utils import get_base_model_id

        budget = self._budgets.get(get_base_model_id(await self._get_model_id(body.model)))
        if budget is not None:
            # Tokenizing a long prompt takes milliseconds: off the event loop that streams others.
            await asyncio.to_thread(budget.check, body)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        await self._check_budget(body)
        return await super().completions(body, request)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        # Ray sanitizes list-form content (single-use pydantic iterators) before sending the
        # request on; do it before the budget reads the messages, or the model would get none.
        body = _sanitize_chat_completion_request(body)
        await self._check_budget(body)
        return await super().chat(body, request)

    async def ready(self) -> dict[str, Any]:
        """A real one-token generation on every generative model (one embedding on pooling
        models), all at once, each within READY_TIMEOUT_S; 503 until every model answers. A
        success is reused for READY_CACHE_S, so frequent probes do not each cost a generation."""
        if time.monotonic() - self._ready_at < READY_CACHE_S:
            return {"ready": True, "models": dict.fromkeys(self._default_serve_handles, "ok")}
        answers = await asyncio.gather(
            *(self._probe(m) for m in self._default_serve_handles), return_exceptions=True
        )
        failed = {m: str(a) for m, a in zip(self._default_serve_handles, answers, strict=True) if a}
        if failed:
            raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, failed)
        self._ready_at = time.monotonic()
        return {"ready": True, "models": dict.fromkeys(self._default_serve_handles, "ok")}

    async def _probe(self, model_id: str) -> str | None:
        """None when the model answered, else why not."""
        handle = self._get_configured_serve_handle(model_id)
        if model_id in self._pooling_models:
            call = handle.embeddings.remote(
                EmbeddingCompletionRequest(model=model_id, input="ready?"), None
            )
        else:
            call = handle.completions.remote(
                CompletionRequest(model=model_id, prompt="ready?", max_tokens=1), None
            )
        return await first_answer_problem(call)


async def first_answer_problem(call, timeout_s: float = READY_TIMEOUT_S) -> str | None:
    """Await the first item of a streaming LLMServer call (a readiness probe), then cancel the
    rest: None when the model answered, else why not (a timeout, backpressure, an engine error)."""
    try:
        first = await asyncio.wait_for(call.__anext__(), timeout_s)
    except Exception as exc:  # noqa: BLE001 - any failure is "not ready"
        call.cancel()
        return f"{type(exc).__name__}: {exc}"
    call.cancel()
    first = first[0] if isinstance(first, list) else first
    return first.error.message if isinstance(first, ErrorResponse) else None


def build_ingress_cls(api_key_env: str | None = API_KEY_ENV):
    """Ray's OpenAI routes plus /ready on Ray's FastAPI app (its exception, CORS, metrics and
    request-id middleware), with `ServingMiddleware` outermost."""
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init

    app = init()
    app.add_middleware(ServingMiddleware, api_key_env=api_key_env)
    endpoints = {**DEFAULT_ENDPOINTS, "ready": lambda a: a.get("/ready")}
    return make_fastapi_ingress(ServingIngress, endpoint_map=endpoints, app=app)
