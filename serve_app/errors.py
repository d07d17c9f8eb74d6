"""raygate's errors, and the one place that renders them for clients.

Hierarchy (each carries the HTTP status and OpenAI's error ``type``/``code``):

* RaygateError ........................ 500 ``internal_error``
  * InvalidRequestError ............... 400 ``invalid_request_error``
    * MethodNotAllowedError ........... 405
    * RequestTooLargeError ............ 413
  * AuthenticationError ............... 401 ``invalid_api_key``
  * PermissionDeniedError ............. 403
  * NotFoundError ..................... 404
    * ModelNotFoundError .............. 404 ``model_not_found``
  * RateLimitError .................... 429 ``rate_limit_exceeded``
    * QuotaExceededError .............. 429 ``insufficient_quota``
  * UpstreamError ..................... 502 (an upstream answered with an error)
  * UpstreamUnavailableError .......... 503 ``upstream_unavailable``
    * UpstreamTimeoutError ............ 503 ``upstream_timeout``
  * ServiceUnavailableError ........... 503 (a raygate component is down)

Messages are written for clients: they never carry prompts, keys or stack
traces. Internals are logged by the code that raises.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel


class ErrorInfo(BaseModel):
    """The body of OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, as OpenAI returns it."""

    error: ErrorInfo


class RaygateError(Exception):
    """Base of every error raygate raises on purpose."""

    status_code: int = 500
    type: str = "internal_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross Ray process boundaries; keep keyword state when pickled.
        return (_rebuild_error, (type(self), self.message, self.param, self.code, self.headers))

    def to_info(self) -> ErrorInfo:
        """Return the OpenAI-shaped error body."""
        return ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code)


def _rebuild_error(
    cls: type[RaygateError], message: str, param: str | None, code: str | None, headers: dict[str, str]
) -> RaygateError:
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequestError(RaygateError):
    status_code = 400
    type = "invalid_request_error"
    code = None


class MethodNotAllowedError(InvalidRequestError):
    status_code = 405
    code = "method_not_allowed"


class RequestTooLargeError(InvalidRequestError):
    status_code = 413
    code = "request_too_large"


class AuthenticationError(RaygateError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(RaygateError):
    status_code = 403
    type = "permission_error"
    code = "permission_denied"


class NotFoundError(RaygateError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class RateLimitError(RaygateError):
    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class QuotaExceededError(RateLimitError):
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(RaygateError):
    """The upstream answered, but with an error raygate passes on."""

    status_code = 502
    type = "upstream_error"
    code = "upstream_error"


class UpstreamUnavailableError(RaygateError):
    """No model could answer: worth a retry or a fallback."""

    status_code = 503
    type = "service_unavailable"
    code = "upstream_unavailable"


class UpstreamTimeoutError(UpstreamUnavailableError):
    code = "upstream_timeout"


class ServiceUnavailableError(RaygateError):
    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


STATUS_ERRORS: dict[int, type[RaygateError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    405: MethodNotAllowedError,
    413: RequestTooLargeError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def error_for_status(status_code: int, message: str, headers: dict[str, str] | None = None) -> RaygateError:
    """Return the raygate error that matches an HTTP status.

    An unknown 4xx is the client's mistake (``invalid_request_error``); anything else unknown is a 500.

    Args:
        status_code: the framework's status.
        message: the client-facing message.
        headers: headers the answer must keep (``Allow`` on a 405).
    """
    cls = STATUS_ERRORS.get(status_code)
    if cls is not None:
        return cls(message, headers=headers)
    base = InvalidRequestError if 400 <= status_code < 500 else RaygateError
    err = base(message, headers=headers)
    err.status_code = status_code if 400 <= status_code < 600 else 500
    return err


def render_error_body(error: RaygateError) -> bytes:
    """Serialise an error as OpenAI's ``{"error": {...}}`` JSON."""
    return orjson.dumps(ErrorResponse(error=error.to_info()).model_dump())
