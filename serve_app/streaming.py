"""Server-sent events: chunks become ``data: {json}`` frames here and nowhere else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from deployments.cache_protocol import CacheHit, completion_from, replay_chunks
from serve_app.errors import ErrorResponse, RaygateError
from serve_app.protocol import ChatCompletionStreamResponse, UsageInfo

DONE_FRAME = b"data: [DONE]\n\n"
StreamItem = ChatCompletionStreamResponse | RaygateError


def sse_frame(payload: BaseModel) -> bytes:
    """Frame one payload as an SSE ``data:`` event."""
    return b"data: " + orjson.dumps(payload.model_dump(mode="json")) + b"\n\n"


async def sse_events(
    first: ChatCompletionStreamResponse,
    rest: Callable[[], AsyncIterator[StreamItem]],
    *,
    include_usage: bool,
    on_end: Callable[[UsageInfo | None, RaygateError | None], Any],
    extension: dict[str, Any] | None = None,
) -> AsyncIterator[bytes]:
    """Turn an engine's chunks into the client's SSE stream.

    The engine puts usage on its last chunk; the client gets it, if it asked
    (``stream_options.include_usage``), as a separate final chunk with empty
    choices, as OpenAI sends it. A failure after the first byte becomes one
    error event; the stream always ends with ``data: [DONE]``.

    Args:
        first: the chunk already received (peeked before the response started).
        rest: returns the remaining items.
        include_usage: whether to send the usage chunk.
        on_end: called once with the usage and the error, if any, however the stream ends.
        extension: raygate's extension object (citations), sent on the final chunk: the usage
            chunk when there is one, else a chunk of its own with empty choices.
    """
    usage: UsageInfo | None = None
    error: RaygateError | None = None
    last = first
    try:
        chunk: StreamItem = first
        items = rest()
        while True:
            if isinstance(chunk, RaygateError):
                error = chunk
                yield sse_frame(ErrorResponse(error=error.to_info()))
                break
            last = chunk
            if chunk.usage is not None:
                usage, chunk = chunk.usage, chunk.model_copy(update={"usage": None})
            if chunk.choices:
                yield sse_frame(chunk)
            try:
                chunk = await anext(items)
            except StopAsyncIteration:
                break
            except RaygateError as exc:
                chunk = exc
        if error is None and ((include_usage and usage is not None) or extension):
            final = {"choices": [], "usage": usage if include_usage else None, "raygate": extension}
            yield sse_frame(last.model_copy(update=final))
        yield DONE_FRAME
    finally:
        on_end(usage, error)


def cached_answer(hit: CacheHit, request_id: str, stream: bool, include_usage: bool, headers: dict[str, str],
                  extension: dict[str, Any] | None) -> Response:
    """A cache hit as the client asked for it: one completion, or its chunks replayed as SSE."""
    if not stream:
        payload = completion_from(hit, request_id).model_dump(mode="json") | {
            "raygate": {**hit.extension(), **(extension or {})}}
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    first, *rest = replay_chunks(hit, request_id)

    async def replay() -> AsyncIterator[ChatCompletionStreamResponse]:
        for chunk in rest:
            yield chunk

    events = sse_events(first, replay, include_usage=include_usage, on_end=lambda usage, error: None,
                        extension=extension)
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)
