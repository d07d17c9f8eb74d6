"""A batch's input file, checked line by line before anything runs (as OpenAI's ``validating`` step).

Each non-blank line is ``{"custom_id": ..., "method": "POST", "url": <the batch's endpoint>,
"body": <a chat completion request>}``. Problems are reported with their line number in the
batch's ``errors`` (the first ``MAX_ERRORS``), and a batch with any problem runs nothing.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from pydantic import ValidationError

from serve_app.errors import InvalidRequestError
from serve_app.protocol import ChatCompletionRequest

BATCH_ENDPOINTS = ("/v1/chat/completions",)
MAX_ERRORS = 100
MAX_CUSTOM_ID = 512
_WINDOW = re.compile(r"^([1-9][0-9]{0,3})h$")


def completion_window_s(window: str, accepted: list[str]) -> float:
    """Seconds of a ``completion_window`` such as ``24h``.

    Raises:
        InvalidRequestError: a window this gateway does not accept.
    """
    match = _WINDOW.match(window)
    if window not in accepted or match is None:
        raise InvalidRequestError(f"completion_window must be one of {accepted}.", param="completion_window",
                                  code="invalid_completion_window")
    return int(match.group(1)) * 3600.0


def check_endpoint(endpoint: str) -> None:
    """Raises InvalidRequestError for an endpoint batches cannot run."""
    if endpoint not in BATCH_ENDPOINTS:
        raise InvalidRequestError(f"endpoint must be one of {list(BATCH_ENDPOINTS)}.", param="endpoint",
                                  code="unsupported_endpoint")


def _error(line: int | None, code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def _check_line(number: int, raw: bytes, endpoint: str, seen: set[str]) -> tuple[str, str] | dict[str, Any]:
    """The line's (custom_id, body as compact JSON), or the error that rejects it."""
    try:
        request = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(number, "invalid_json_line", "This line is not valid JSON.")
    if not isinstance(request, dict):
        return _error(number, "invalid_request", "Each line must be a JSON object.")
    custom_id = request.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= MAX_CUSTOM_ID:
        return _error(number, "invalid_custom_id", f"custom_id must be a string of 1 to {MAX_CUSTOM_ID} characters.",
                      "custom_id")
    if custom_id in seen:
        return _error(number, "duplicate_custom_id", f"custom_id '{custom_id}' is used more than once.", "custom_id")
    seen.add(custom_id)
    if request.get("method") != "POST":
        return _error(number, "invalid_method", "method must be 'POST'.", "method")
    if request.get("url") != endpoint:
        return _error(number, "mismatched_url", f"url must be the batch's endpoint, '{endpoint}'.", "url")
    body = request.get("body")
    if not isinstance(body, dict):
        return _error(number, "invalid_request", "body must be a JSON object.", "body")
    try:
        parsed = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(["body", *(str(p) for p in first["loc"])])
        return _error(number, "invalid_request", f"Invalid body: {first['msg']}", param)
    if parsed.stream:
        return _error(number, "invalid_request", "Batch requests cannot be streamed (stream must be false).",
                      "body.stream")
    return custom_id, orjson.dumps(body).decode()


def parse_input(content: bytes, endpoint: str, max_requests: int) -> tuple[list[tuple[int, str, str]],
                                                                          list[dict[str, Any]]]:
    """The requests of an input file as ``(line, custom_id, body)``, and its errors (empty when it may run)."""
    if not content.strip():
        return [], [_error(None, "empty_file", "The input file holds no requests.")]
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return [], [_error(None, "invalid_file", "The input file must be UTF-8 JSONL.")]
    items: list[tuple[int, str, str]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        checked = _check_line(number, raw, endpoint, seen)
        if isinstance(checked, dict):
            errors.append(checked)
        else:
            items.append((number, *checked))
    if len(items) + len(errors) > max_requests:
        errors.insert(0, _error(None, "too_many_requests", f"A batch holds at most {max_requests} requests."))
    return items, errors[:MAX_ERRORS]
