"""AutoPipeline against a real Valkey: concurrent commands share pipelines; each reply and error reaches its caller."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError, DataError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from serve_app.pipelining import AutoPipeline
from serve_app.stores import redis_client

SCRIPT = "return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[1])}"


class Counted(AutoPipeline):
    """Records the size of each batch it sends."""

    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__(redis)
        self.batches: list[int] = []

    async def _send(self, conn: Any, batch: list[Any]) -> None:
        self.batches.append(len(batch))
        await super()._send(conn, batch)


def fresh() -> str:
    return f"test:pipe:{uuid.uuid4().hex[:8]}"


async def test_concurrent_scripts_share_pipelines_and_keep_their_replies(redis: aioredis.Redis) -> None:
    pipeline = Counted(redis)
    script = pipeline.register_script(SCRIPT)
    await redis.script_load(SCRIPT)
    keys = [fresh() for _ in range(40)]
    replies = await asyncio.gather(*(script(keys=[k], args=[i]) for i, k in enumerate(keys)))
    assert replies == [[k, i] for i, k in enumerate(keys)]
    assert sum(pipeline.batches) == 40 and len(pipeline.batches) <= 2  # not one round trip each


async def test_a_lone_command_goes_out_alone(redis: aioredis.Redis) -> None:
    pipeline = Counted(redis)
    key = fresh()
    assert await pipeline.execute("SET", key, "v") == "OK"  # Redis's reply, no redis-py callback
    assert await pipeline.execute("GET", key) == "v"
    assert pipeline.batches == [1, 1]


@pytest.mark.parametrize("connections", [1, 2])
async def test_a_second_connection_sends_while_a_pipeline_waits(redis: aioredis.Redis, connections: int) -> None:
    """A pipeline waiting for its replies (a BLPOP here) holds its connection; a second one sends meanwhile."""
    pipeline = AutoPipeline(redis, connections=connections)
    key = fresh()
    await redis.set(key, "v")
    loop = asyncio.get_running_loop()
    started = loop.time()
    blocked = asyncio.ensure_future(pipeline.execute("BLPOP", fresh(), 0.5))
    while (await redis.info("clients"))["blocked_clients"] == 0:  # until Valkey holds the BLPOP
        assert loop.time() - started < 0.4
    assert await pipeline.execute("GET", key) == "v"
    waited = loop.time() - started
    assert await blocked is None
    assert (waited < 0.4) == (connections == 2), waited
    await pipeline.close()


async def test_one_commands_error_reaches_only_its_caller(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis)
    text, counter = fresh(), fresh()
    await redis.set(text, "not a number")
    results = await asyncio.gather(pipeline.execute("INCR", text), pipeline.execute("INCR", counter),
                                   return_exceptions=True)
    assert isinstance(results[0], ResponseError) and results[1] == 1


async def test_an_argument_redis_cannot_take_fails_only_its_caller(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis)
    key = fresh()
    results = await asyncio.gather(pipeline.execute("SET", fresh(), None), pipeline.execute("SET", key, "é 1.5"),
                                   pipeline.execute("INCRBYFLOAT", fresh(), 0.1), return_exceptions=True)
    assert isinstance(results[0], DataError), results[0]
    assert results[1:] == ["OK", "0.1"]
    assert await redis.get(key) == "é 1.5"


async def test_a_flushed_script_is_loaded_once_again(redis: aioredis.Redis) -> None:
    """A restarted Redis has no scripts: NOSCRIPT loads it (once for concurrent callers) and each call answers."""
    script = AutoPipeline(redis).register_script(SCRIPT)
    key = fresh()
    assert await script(keys=[key], args=[2]) == [key, 2]
    await redis.script_flush()
    loads = await script_loads(redis)
    replies = await asyncio.gather(*(script(keys=[key], args=[1]) for _ in range(10)))
    assert sorted(r[1] for r in replies) == list(range(3, 13))  # each ran once
    assert await script_loads(redis) == loads + 1


async def script_loads(redis: aioredis.Redis) -> int:
    """SCRIPT LOAD commands the server has run so far (INFO commandstats)."""
    return int((await redis.info("commandstats")).get("cmdstat_script|load", {}).get("calls", 0))


async def test_a_cancelled_caller_leaves_the_others_their_replies(redis: aioredis.Redis) -> None:
    pipeline = AutoPipeline(redis)
    key = fresh()
    first = asyncio.ensure_future(pipeline.execute("INCR", key))
    second = asyncio.ensure_future(pipeline.execute("INCR", key))
    await asyncio.sleep(0)  # both queued
    first.cancel()
    assert await second in (1, 2)
    assert first.cancelled()


async def test_an_unreachable_redis_fails_every_caller_of_the_batch() -> None:
    dead = redis_client("redis://127.0.0.1:1/0")
    pipeline = AutoPipeline(dead)
    try:
        results = await asyncio.gather(*(pipeline.execute("GET", "k") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results)
        with pytest.raises(RedisConnectionError):  # and the next call tries again
            await pipeline.execute("GET", "k")
    finally:
        await dead.aclose()


async def test_a_killed_connection_is_replaced_and_the_batch_runs_once(redis: aioredis.Redis) -> None:
    """Redis dropped the pipeline's connection (a restart does): a fresh one sends the batch, once."""
    pipeline = AutoPipeline(redis)
    key = fresh()
    connection_id = await pipeline.execute("CLIENT", "ID")
    await redis.execute_command("CLIENT", "KILL", "ID", connection_id)
    assert await asyncio.gather(pipeline.execute("INCR", key), pipeline.execute("INCR", key)) == [1, 2]
    assert await redis.get(key) == "2"
    assert await pipeline.execute("CLIENT", "ID") != connection_id
    await pipeline.close()


async def test_a_silent_redis_times_out_within_the_deadline() -> None:
    """A server that accepts and never answers: the callers get Redis's TimeoutError after ``timeout_s``."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    client = redis_client(f"redis://127.0.0.1:{port}/0")
    pipeline = AutoPipeline(client, timeout_s=0.3)
    started = asyncio.get_running_loop().time()
    try:
        results = await asyncio.gather(*(pipeline.execute("GET", "k") for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, RedisTimeoutError) for r in results), results
        assert asyncio.get_running_loop().time() - started < 2.0
    finally:
        await pipeline.close()
        await client.aclose()
        silent.close()
