"""Small pieces of the Gateway's HTTP surface: its OpenAPI document, health probes, answer headers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import numpy as np
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.routing import request_response

from serve_app.constants import HEALTH_CHECK_TIMEOUT_S, MODEL_HEADER
from serve_app.deps import authenticate, get_gateway
from serve_app.dispatch import Answer
from serve_app.protocol import ChatCompletionRequest


def _drop_placeholder_examples(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_placeholder_examples(v) for k, v in node.items() if not (k == "example" and v == {})}
    if isinstance(node, list):
        return [_drop_placeholder_examples(v) for v in node]
    return node


HOT_PATHS = ("/v1/chat/completions",)  # matched first: Starlette tries the 80 routes in order
Model = TypeVar("Model", bound=BaseModel)


class GatewayAPI(FastAPI):
    """FastAPI whose OpenAPI document survives ``@serve.ingress``'s pickled copy of the app.

    The copy loses the identity of FastAPI's "unset" sentinel, so every parameter and body
    would document ``"example": {}``; those placeholders are dropped. Its routes are put in
    order when the first request builds the middleware stack: ``@serve.ingress`` re-mounts
    the class's routes after every other one, and a chat request then tried 79 admin routes
    first (~0.07 ms of CPU each time).
    """

    def build_middleware_stack(self) -> Any:
        """Starlette's stack, built once per app; the hot routes go first (their paths are unique)."""
        self.router.routes.sort(key=lambda route: getattr(route, "path", None) not in HOT_PATHS)
        return super().build_middleware_stack()

    def serve_lean(self, path: str, method: str, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        """Answer ``method path`` with ``endpoint(request)`` instead of FastAPI's request handler.

        FastAPI solves a route's dependencies and reads, parses and validates its body in
        Python on every request: ~0.06 ms of CPU per chat request. ``endpoint`` does the
        same work directly (``json_body``); the route stays, with its OpenAPI entry, and
        errors reach the app's handlers as before.
        """
        for route in self.router.routes:
            if isinstance(route, APIRoute) and route.path == path and method in route.methods:
                route.app = request_response(endpoint)
                return
        raise LookupError(f"no {method} {path} route")

    def openapi(self) -> dict[str, Any]:
        """The OpenAPI document, without placeholder examples."""
        if self.openapi_schema is None:
            self.openapi_schema = _drop_placeholder_examples(super().openapi())
        return self.openapi_schema


async def probe(check: Any) -> str:
    """Await one health check; 'ok' or 'down'."""
    try:
        await asyncio.wait_for(check, HEALTH_CHECK_TIMEOUT_S)
        return "ok"
    except Exception:  # noqa: BLE001 - any failure means down
        return "down"


def encode_vectors(vectors: list[list[float]], encoding_format: str) -> list[list[float]] | list[str]:
    """Return vectors as floats, or as base64 of little-endian float32 (what the SDKs decode)."""
    if encoding_format != "base64":
        return vectors
    return [base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode("ascii") for v in vectors]


def client_language(request: Request) -> str | None:
    """The primary tag of the client's first preferred language ("fr-FR,fr;q=0.9" -> "fr")."""
    header = request.headers.get("accept-language", "")
    tag = header.split(",", 1)[0].split(";", 1)[0].strip()
    return tag.split("-", 1)[0].lower() or None


def answer_headers(answer: Answer, started: float) -> dict[str, str]:
    """Which model answered, after how many calls, and what the gateway itself cost."""
    overhead_ms = (time.perf_counter() - started - answer.upstream_s) * 1000
    return {
        MODEL_HEADER: answer.model.name,
        "x-raygate-attempts": str(len(answer.attempts)),
        "x-raygate-fallback": "true" if answer.model.name != answer.attempts[0].model else "false",
        "x-raygate-overhead-ms": f"{max(overhead_ms, 0.0):.2f}",
    }


async def json_body(request: Request, model: type[Model]) -> Model:
    """The request's JSON body as ``model``, accepted and refused as a FastAPI body parameter is.

    The common case is one pass of pydantic's own JSON parser. Anything it refuses is
    done again FastAPI's way (``json.loads``, then validation from Python objects) so that
    what passes and each error's wording are FastAPI's: no body is a missing field, a body
    not declared JSON (``Content-Type``) is validated as bytes and fails. Errors are
    ``RequestValidationError``s located under ``body``, for the app's handler to render.
    """
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}])
    declared_json = _is_json(request.headers.get("content-type"))
    if declared_json:
        with contextlib.suppress(ValidationError):
            return model.model_validate_json(raw)
    try:
        data: Any = json.loads(raw) if declared_json else raw
    except json.JSONDecodeError as exc:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": exc.msg}}]) from None
    except ValueError as exc:  # not UTF-8
        raise HTTPException(status_code=400, detail="There was an error parsing the body") from exc
    try:
        return model.model_validate(data, from_attributes=True)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]) from None


async def lean_chat_completions(request: Request) -> Response:
    """``POST /v1/chat/completions`` without FastAPI's request handler (``GatewayAPI.serve_lean``).

    What the route's declaration asks for, done directly: the key first (so 401 wins over
    400, as with the dependency), then the body.
    """
    key = await authenticate(request)
    body = await json_body(request, ChatCompletionRequest)
    return await get_gateway(request).chat_completions(body, request, key)


def _is_json(content_type: str | None) -> bool:
    """``application/json`` or ``application/*+json`` (parameters such as a charset allowed)."""
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))
