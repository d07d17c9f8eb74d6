"""``python -m bench.upstream_calls``: CPU per upstream chat call, alone and 32 at a time, by client path.

What one call to an OpenAI-compatible upstream costs the Gateway's process, answered and
streamed: the ``openai`` SDK's typed ``chat.completions.create()``, its low-level
``post()`` (raw bytes, or chunks as dicts), and ``UpstreamHTTP``
(``deployments/models/upstream_http.py``: aiohttp with the SDK's headers and errors), which
``RemoteEngine`` uses. All on aiohttp, against the fake upstream in its own process, so
only the client's CPU is counted (``time.process_time``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx2
import openai
import orjson

from bench.harness import start_upstream
from bench.redis_calls import CALLS, CONCURRENT, Call, cpu_us_per_call
from deployments.models.upstream_http import UpstreamHTTP

BODY: dict[str, Any] = {"model": "echo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 16}
STREAM_BODY = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
BEARER: Any = {"security": {"bearer_auth": True}}


def paths(client: openai.AsyncOpenAI, http: UpstreamHTTP) -> list[tuple[str, Call]]:
    """(name, one call) for each client path, answered then streamed."""
    async def create() -> object:
        return await client.chat.completions.create(**BODY)

    async def post() -> object:
        return orjson.loads(await client.post("/chat/completions", cast_to=bytes, body=BODY, options=BEARER))

    async def direct() -> object:
        return orjson.loads(await http.post("/chat/completions", BODY))

    async def create_stream() -> object:
        return [chunk async for chunk in await client.chat.completions.create(**STREAM_BODY)]

    async def post_stream() -> object:
        stream = await client.post("/chat/completions", cast_to=object, body=STREAM_BODY, options=BEARER,
                                   stream=True, stream_cls=openai.AsyncStream[dict[str, Any]])
        return [chunk async for chunk in stream]

    async def direct_stream() -> object:
        return [event async for event in http.events("/chat/completions", STREAM_BODY)]

    return [("SDK create()", create), ("SDK post(), bytes", post), ("UpstreamHTTP.post", direct),
            ("SDK create(), streamed", create_stream), ("SDK post(), dict chunks", post_stream),
            ("UpstreamHTTP.events", direct_stream)]


async def measure(base_url: str) -> list[tuple[str, float, float]]:
    """(path, µs alone, µs when ``CONCURRENT`` run at once) for each client path."""
    limits = httpx2.Limits(max_connections=64, max_keepalive_connections=64)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0,
                                http_client=openai.DefaultAioHttpClient(limits=limits, timeout=30))
    http = UpstreamHTTP(client, timeout_s=30, max_connections=64)
    try:
        return [(name, await cpu_us_per_call(call, 1), await cpu_us_per_call(call, CONCURRENT))
                for name, call in paths(client, http)]
    finally:
        await http.close()
        await client.close()


def main() -> None:
    upstream, base_url = start_upstream("--words", "16")
    try:
        rows = asyncio.run(measure(base_url))
    finally:
        upstream.terminate()
        upstream.wait(10)
    print(f"CPU per chat call to the fake upstream ({CALLS} calls each; streamed: 16 chunks), µs:")
    print(f"{'path':26} {'alone':>8} {f'{CONCURRENT} at once':>12} {'vs SDK':>8}")
    for i, (name, alone, together) in enumerate(rows):
        base = rows[0 if i < 3 else 3][2]
        print(f"{name:26} {alone:8.0f} {together:12.0f} {base / together:7.1f}x")


if __name__ == "__main__":
    main()
