"""The HTTP edge: request ids, body-size limits and the one error renderer.

Order matters: ``RequestContextMiddleware`` wraps the whole app so every
response, errors included, carries ``x-request-id``, and oversized bodies are
refused before any route parses them.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.constants import REQUEST_ID_HEADER
from serve_app.errors import InvalidRequestError, RaygateError, RequestTooLargeError, error_for_status
from serve_app.errors import render_error_body

logger = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
# On every answer: no MIME sniffing, never framed, no referrer leaking URLs (keys never go in URLs).
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
CORS_METHODS = ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
CORS_HEADERS = ["authorization", "content-type", "x-raygate-tag", "x-request-id", "cache-control", "x-raygate-brief"]


def error_response(error: RaygateError) -> Response:
    """Render a raygate error as OpenAI's JSON error with its status and headers."""
    return Response(render_error_body(error), status_code=error.status_code, headers=error.headers,
                    media_type="application/json")


class RequestContextMiddleware:
    """Gives each request an id and enforces the body-size limit.

    Args:
        app: the wrapped ASGI app.
        max_body_bytes: returns the limit for a request path; larger bodies are refused with 413.
            A callable, because the limit comes from config that the Gateway receives after
            import, and document uploads may be larger than API calls.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: Callable[[str], int]) -> None:
        self.app = app
        self._limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        # Serve's proxy gives every request an x-request-id (the client's, or a new one) and
        # echoes it on the response; outside Serve this middleware does both.
        given = headers.get(REQUEST_ID_HEADER, "")[:MAX_REQUEST_ID_CHARS]
        request_id = given or f"req-{uuid.uuid4().hex}"
        # arrived: when the request reached the app, so latency and time to first byte include the wait
        # for the body and the event loop (what batch work's pause watches, serve_app.batching).
        scope.setdefault("state", {}).update(request_id=request_id, arrived=time.perf_counter())
        extra_headers = [*SECURITY_HEADERS, *([] if given else [(REQUEST_ID_HEADER.encode(), request_id.encode())])]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra_headers]
            await send(message)

        length = headers.get("content-length", "")
        limit = self._limit(scope.get("path", ""))
        if length.isdigit() and int(length) > limit:
            await error_response(self._too_large(limit))(scope, receive, send_with_id)
            return
        await self.app(scope, self._limited(receive, limit), send_with_id)

    def _limited(self, receive: Receive, limit: int) -> Receive:
        """Count body bytes of chunked uploads, which carry no Content-Length."""
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise self._too_large(limit)
            return message

        return limited_receive

    @staticmethod
    def _too_large(limit: int) -> RequestTooLargeError:
        return RequestTooLargeError(f"Request body is larger than the limit of {limit} bytes.")


def _validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """Describe the first validation problem, naming the field (never echoing its value)."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("Invalid request body.")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):  # where it was, not what it is called
        loc = loc[1:]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return InvalidRequestError("We could not parse the JSON body of your request.")
    message = str(first.get("msg", "invalid value"))
    return InvalidRequestError(f"Invalid value for '{param}': {message}" if param else message, param=param)


def install_cors(app: FastAPI, origins: list[str]) -> None:
    """Allow browsers on ``origins`` to call the API. No origins (the default): no CORS at all.

    Must run before the app serves its first request (Starlette builds its stack then).
    """
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=CORS_METHODS,
                           allow_headers=CORS_HEADERS, expose_headers=["x-request-id", "x-raygate-model"],
                           allow_credentials=False)


def install_error_handlers(app: FastAPI) -> None:
    """Render every error, including framework ones, in OpenAI's shape."""

    def request_id(request: Request) -> str | None:
        return getattr(request.state, "request_id", None)

    @app.exception_handler(RaygateError)
    async def _raygate(request: Request, exc: RaygateError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, RaygateError):  # FastAPI wraps body-read errors in a 400
            return error_response(exc.__cause__)
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return error_response(error_for_status(exc.status_code, message, dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("Unhandled error in request %s", request_id(request))
        return error_response(RaygateError("The server had an error while processing your request."))
