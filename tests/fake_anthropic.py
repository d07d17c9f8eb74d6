"""The Anthropic side of the fake upstream: ``POST /v1/messages`` answers, events and checks.

Kept apart from ``fake_upstream.py`` (the server, faults, the OpenAI routes) so each stays small.

``/v1/messages`` honours ``stop_sequences``: the text ends before the first one
(``stop_reason`` ``"stop_sequence"``). It is stricter than Anthropic about roles:
``user`` and ``assistant`` must alternate, starting with ``user``, so tests catch a
translation that forgot to merge turns. Content blocks must be non-empty ``text`` or
``image`` (a ``base64`` or ``url`` source), so an untranslated OpenAI part is a 400. Like Anthropic, it refuses sampling
parameters under ``anthropic-version`` 2026-10-21 (SDK 2.x's default) and later, and
a ``temperature`` above 1 under older versions.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from tests.fake_common import PHRASE, _text_of, count_prompt_words

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 402: "billing_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
    504: "timeout_error", 529: "overloaded_error",
}


# The first Anthropic API version that refuses sampling parameters (versions are ISO dates).
_NO_SAMPLING_API_VERSION = "2026-10-21"


def anthropic_error_type(status: int) -> str:
    """Return the error ``type`` Anthropic sends with ``status``."""
    return _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_response(status: int, message: str, retry_after_s: float | None = None) -> web.Response:
    """An error in Anthropic's shape (``{"type": "error", "error": {...}}``)."""
    body = {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    headers = {"Retry-After": f"{retry_after_s:g}"} if retry_after_s is not None else None
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def count_input_words(body: dict[str, Any]) -> int:
    """Return the fake's Anthropic ``input_tokens``: whitespace words of ``system`` and all messages."""
    return len(_text_of(body.get("system")).split()) + count_prompt_words(body)


def _sse_event(event: bytes, data: bytes) -> bytes:
    return b"event: " + event + b"\ndata: " + data + b"\n\n"


def _pieces(n_words: int) -> list[str]:
    words = [PHRASE[i % len(PHRASE)] for i in range(n_words)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def _cut_at_stop(pieces: list[str], stops: list[str]) -> tuple[list[str], str | None]:
    """Return the pieces before the first stop sequence (the last one cut short) and that sequence."""
    text = "".join(pieces)
    cut, hit = min(((text.find(s), s) for s in stops if s and s in text), default=(-1, None))
    if hit is None:
        return pieces, None
    kept: list[str] = []
    pos = 0
    for piece in pieces:
        if pos >= cut:
            break
        kept.append(piece[: cut - pos])
        pos += len(piece)
    return kept, hit


class _MessagesAnswer:
    """Precomputed bytes of one Anthropic ``/v1/messages`` answer."""

    def __init__(self, model: str, pieces: list[str], stop_reason: str, stop_sequence: str | None) -> None:
        self.n_words = len(pieces)
        self.text = "".join(pieces)
        m = orjson.dumps(model)
        message = b'{"id":"msg_fake","type":"message","role":"assistant","model":' + m
        stop = b'"stop_reason":"' + stop_reason.encode() + b'","stop_sequence":' + orjson.dumps(stop_sequence)
        content = b'[{"type":"text","text":' + orjson.dumps(self.text) + b"}]" if self.text else b"[]"
        self.json_head = message + b',"content":' + content + b"," + stop
        self.start_head = message + b',"content":[],"stop_reason":null,"stop_sequence":null'
        self.body_frames = [
            _sse_event(b"content_block_start",
                       b'{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}'),
            _sse_event(b"ping", b'{"type":"ping"}'),
            *(_sse_event(b"content_block_delta", b'{"type":"content_block_delta","index":0,"delta":'
                         b'{"type":"text_delta","text":' + orjson.dumps(p) + b"}}") for p in pieces),
            _sse_event(b"content_block_stop", b'{"type":"content_block_stop","index":0}'),
        ]
        delta = b'{"type":"message_delta","delta":{' + stop + b"}"
        self.delta_frames = {
            True: _sse_event(b"message_delta", delta + b',"usage":{"output_tokens":%d}}' % self.n_words),
            False: _sse_event(b"message_delta", delta + b"}"),
        }
        self.stop_frame = _sse_event(b"message_stop", b'{"type":"message_stop"}')

    def frames(self, input_tokens: int | None) -> list[bytes]:
        """Return the SSE events; without usage when ``input_tokens`` is None."""
        # Anthropic's message_start reports output_tokens 1; the final count is in message_delta.
        usage = b',"usage":{"input_tokens":%d,"output_tokens":1}' % input_tokens if input_tokens is not None else b""
        start = _sse_event(b"message_start", b'{"type":"message_start","message":' + self.start_head + usage + b"}}")
        return [start, *self.body_frames, self.delta_frames[input_tokens is not None], self.stop_frame]

    def json(self, input_tokens: int | None) -> bytes:
        """Return the non-stream body; without usage when ``input_tokens`` is None."""
        if input_tokens is None:
            return self.json_head + b"}"
        return self.json_head + b',"usage":{"input_tokens":%d,"output_tokens":%d}}' % (input_tokens, self.n_words)


def _sampling_error(api_version: str, body: dict[str, Any]) -> str | None:
    """Return why Anthropic would refuse these sampling parameters under ``api_version``, or None."""
    sampling = [name for name in ("temperature", "top_p", "top_k") if name in body]
    if sampling and api_version >= _NO_SAMPLING_API_VERSION:
        return f"{sampling[0]}: Extra inputs are not permitted"
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not 0 <= temperature <= 1:
        return "temperature: Input should be less than or equal to 1"
    return None


_IMAGE_MEDIA_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


def _content_error(messages: list[Any]) -> str | None:
    """Return why Anthropic would refuse a content block (non-empty text and image blocks pass), or None."""
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else ()):
            kind = block.get("type") if isinstance(block, dict) else None
            source = block.get("source") if kind == "image" else None
            if kind == "text" and isinstance(block.get("text"), str) and block["text"]:
                continue
            if isinstance(source, dict) and (
                    (source.get("type") == "base64" and source.get("media_type") in _IMAGE_MEDIA_TYPES
                     and isinstance(source.get("data"), str))
                    or (source.get("type") == "url" and isinstance(source.get("url"), str))):
                continue
            return f"messages.{i}.content.{j}: not a valid text or image block (type {kind!r})"
    return None


def _roles_error(messages: list[Any]) -> str | None:
    """Return why Anthropic would refuse these messages' roles, or None."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if not roles:
        return "messages: at least one message is required"
    for i, role in enumerate(roles):
        if role != ("user" if i % 2 == 0 else "assistant"):
            return 'messages: roles must alternate between "user" and "assistant", starting with "user"'
    return None
