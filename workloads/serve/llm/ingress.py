"""The thin layer over `ray.serve.llm`'s OpenAI ingress: what a production endpoint needs and the
library leaves out. Everything else (routing, streaming, LoRA multiplexing, error bodies) is
Ray's `OpenAiIngress`, unchanged.

- `ServingMiddleware` (pure ASGI, so streams pass through untouched): Bearer API-key
  authentication on `/v1/*` when a key is configured (401 otherwise), and `X-Accel-Buffering: no`
  plus `Cache-Control: no-cache` on event streams so proxies (nginx, ingress controllers) do not
  buffer them.
- `ServingIngress.ready`: `GET /ready` runs a real one-token generation on every base model and
  answers 503 until they all return a token (Ray's own health check only asks the engine whether
  it is alive).
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from fastapi import HTTPException, status
from ray.serve.llm.ingress import OpenAiIngress, make_fastapi_ingress

API_KEY_ENV = "LLM_API_KEY"
PROTECTED_PREFIXES = ("/v1/",)


class ServingMiddleware:
    """Bearer authentication and proxy-safe streaming headers, as ASGI middleware.

    The key is read from the environment of the ingress replica (`api_key_env`, set through the
    application's runtime_env or the pod's secret), never from the YAML."""

    def __init__(self, app, api_key_env: str = API_KEY_ENV):
        self.app = app
        self.api_key = os.environ.get(api_key_env) or None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIXES):
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


class ServingIngress(OpenAiIngress):
    async def ready(self) -> dict[str, Any]:
        """A real one-token generation on every base model; 503 until each returns one."""
        from ray.serve.llm.openai_api_models import CompletionRequest

        answered = {}
        for model_id, handle in self._default_serve_handles.items():
            request = CompletionRequest(model=model_id, prompt="ready?", max_tokens=1)
            try:
                stream = handle.options(stream=True).completions.remote(request, None)
                first = await stream.__anext__()
            except Exception as exc:  # noqa: BLE001 - any failure means not ready
                raise HTTPException(
                    status.HTTP_503_SERVICE_UNAVAILABLE, f"{model_id}: {exc}"
                ) from None
            if type(first).__name__ == "ErrorResponse":
                raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"{model_id}: {first}")
            answered[model_id] = "ok"
        return {"ready": True, "models": answered}


def build_ingress_cls(api_key_env: str = API_KEY_ENV):
    """Ray's OpenAI routes plus /ready on Ray's FastAPI app (its exception, CORS, metrics and
    request-id middleware), with `ServingMiddleware` outermost."""
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init

    app = init()
    app.add_middleware(ServingMiddleware, api_key_env=api_key_env)
    endpoints = {**DEFAULT_ENDPOINTS, "ready": lambda a: a.get("/ready")}
    return make_fastapi_ingress(ServingIngress, endpoint_map=endpoints, app=app)
