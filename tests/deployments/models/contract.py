"""The Engine.chat contract, checked the same way for every engine's tests."""

from __future__ import annotations

from typing import Any

import pytest

from deployments.models.base import Engine
from serve_app.errors import UpstreamTimeoutError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse


async def run(engine: Engine, request: ChatCompletionRequest) -> list[Any]:
    """Every output of one ``chat`` call."""
    return [output async for output in engine.chat(request)]


async def check_hang_times_out(engine: Engine, request: ChatCompletionRequest) -> None:
    """A call to an upstream that hangs (``FakeUpstream.hang``) ends in ``upstream_timeout``; closes ``engine``."""
    try:
        with pytest.raises(UpstreamTimeoutError) as info:
            await run(engine, request)
    finally:
        await engine.close()
    assert info.value.code == "upstream_timeout"


async def complete(engine: Engine, request: ChatCompletionRequest) -> ChatCompletionResponse:
    """A non-streaming call: exactly one completion."""
    outputs = await run(engine, request.model_copy(update={"stream": False}))
    assert len(outputs) == 1 and isinstance(outputs[0], ChatCompletionResponse)
    return outputs[0]


async def stream(engine: Engine, request: ChatCompletionRequest) -> list[ChatCompletionStreamResponse]:
    """A streaming call: chunks only."""
    chunks = await run(engine, request.model_copy(update={"stream": True}))
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in chunks)
    return chunks


def text(chunks: list[ChatCompletionStreamResponse]) -> str:
    """The streamed text."""
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def check_stream(chunks: list[Any], model: str) -> tuple[str, ChatCompletionStreamResponse]:
    """Assert the Engine.chat stream contract; return the text and the last chunk."""
    assert chunks and all(isinstance(c, ChatCompletionStreamResponse) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert len({c.id for c in chunks}) == 1 and all(c.model == model for c in chunks)
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.usage is not None and last.choices[0].finish_reason is not None
    return text(chunks), last
