"""SSE framing: usage chunk placement, mid-stream errors, [DONE] always last."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest

from deployments.models.base import ChunkFactory
from serve_app.errors import RaygateError, UpstreamUnavailableError
from serve_app.protocol import ChatCompletionStreamResponse, UsageInfo
from serve_app.streaming import DONE_FRAME, sse_events


def engine_chunks(words: list[str]) -> list[ChatCompletionStreamResponse]:
    factory = ChunkFactory("m")
    chunks = [factory.chunk(w, role=i == 0) for i, w in enumerate(words)]
    chunks.append(factory.chunk(finish_reason="stop", usage=UsageInfo.of(3, len(words))))
    return chunks


async def run(items: list[ChatCompletionStreamResponse | RaygateError], include_usage: bool) -> tuple[list[bytes], list]:
    ended: list[tuple[UsageInfo | None, RaygateError | None]] = []

    async def rest() -> AsyncIterator[ChatCompletionStreamResponse | RaygateError]:
        for item in items[1:]:
            yield item

    frames = [f async for f in sse_events(items[0], rest, include_usage=include_usage,  # type: ignore[arg-type]
                                          on_end=lambda u, e: ended.append((u, e)))]
    return frames, ended


def payloads(frames: list[bytes]) -> list[dict]:
    return [orjson.loads(f[len(b"data: "):]) for f in frames if f != DONE_FRAME]


@pytest.mark.parametrize("include_usage", [True, False])
async def test_usage_chunk_only_when_asked(include_usage: bool) -> None:
    frames, ended = await run(engine_chunks(["a", "b"]), include_usage)  # type: ignore[arg-type]
    assert frames[-1] == DONE_FRAME
    bodies = payloads(frames)
    assert all(b["usage"] is None for b in bodies[:3])
    if include_usage:
        assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["completion_tokens"] == 2
    else:
        assert len(bodies) == 3
    assert ended == [(UsageInfo.of(3, 2), None)]


async def test_mid_stream_error_becomes_one_error_event_then_done() -> None:
    chunks = engine_chunks(["a", "b"])
    error = UpstreamUnavailableError("Model m failed.")
    frames, ended = await run([chunks[0], error, chunks[1]], include_usage=True)
    bodies = payloads(frames)
    assert bodies[-1] == {"error": {"message": "Model m failed.", "type": "service_unavailable", "param": None,
                                    "code": "upstream_unavailable"}}
    assert frames[-1] == DONE_FRAME and len(bodies) == 2
    assert ended[0][1] is error
