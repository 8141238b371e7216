"""What the RAG and agent apps' FastAPI routes share: OpenAI-shaped JSON errors and a body check."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

INVALID = "invalid_request_error"


def error_response(status: int, message: str, kind: str = INVALID) -> JSONResponse:
    """`{"error": {"message", "type", "code"}}`, the shape OpenAI's API (and its clients) use."""
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


async def json_object(request: Request) -> dict[str, Any] | JSONResponse:
    """The request's body as a dict, or the 400 to answer with when it is not a JSON object."""
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, "the body is not JSON")
    if not isinstance(body, dict):
        return error_response(400, "the body must be a JSON object")
    return body
