"""UpstreamHTTP: the SSE reader, the SDK's exceptions, and connection reuse, against the fake upstream."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from deployments.models.upstream_http import UpstreamHTTP, _sse_data
from tests.fake_upstream import FakeUpstream

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _lines(*lines: bytes) -> AsyncIterator[bytes]:
    for line in lines:
        yield line


async def test_sse_data_joins_data_lines_and_skips_the_rest() -> None:
    lines = _lines(b": keep-alive\n", b"\n", b"event: message\r\n", b"id: 7\n", b"data: {\"a\":\n", b"data:1}\r\n",
                   b"\n", b"retry: 10\n", b"data: [DONE]\n")  # the last event has no blank line after it
    assert [data async for data in _sse_data(lines)] == ['{"a":\n1}', "[DONE]"]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.started(words=4) as fake:
        yield fake


@pytest.fixture
async def http(upstream: FakeUpstream) -> AsyncIterator[UpstreamHTTP]:
    client = openai.AsyncOpenAI(base_url=upstream.base_url, api_key="sk-test", default_headers={"X-Title": "t"})
    http = UpstreamHTTP(client, timeout_s=10, max_connections=4)
    yield http
    await http.close()
    await client.close()


async def test_headers_are_the_sdks(http: UpstreamHTTP, upstream: FakeUpstream) -> None:
    await http.post("/chat/completions", BODY)
    headers = upstream.last_headers
    assert headers["authorization"] == "Bearer sk-test" and headers["x-title"] == "t"
    assert headers["user-agent"].startswith("AsyncOpenAI/Python")


async def test_status_errors_are_the_sdks(http: UpstreamHTTP, upstream: FakeUpstream) -> None:
    upstream.fail(429, retry_after_s=3)
    with pytest.raises(openai.RateLimitError) as info:
        await http.post("/chat/completions", BODY)
    assert info.value.response.headers["retry-after"] == "3" and "fake upstream" in info.value.message
    upstream.fail(503)
    with pytest.raises(openai.InternalServerError):
        async for _ in http.events("/chat/completions", {**BODY, "stream": True}):
            pass


async def test_streams_reuse_their_connection(http: UpstreamHTTP, upstream: FakeUpstream) -> None:
    """One pooled connection serves call after call, streamed or not."""
    for _ in range(5):
        events = [event async for event in http.events("/chat/completions", {**BODY, "stream": True})]
        assert events and events[-1]["choices"][0]["finish_reason"] == "stop"
        await http.post("/chat/completions", BODY)
    assert upstream.request_count == 10 and len(upstream.client_ports) == 1
