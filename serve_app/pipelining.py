"""Auto-pipelining: the Redis commands of concurrent requests go out together, one pipeline at a time.

A replica under load runs a few Redis commands per request (rate limits, reserve/settle,
circuits, the cache), each of them alone: a pooled connection checked out, a write, a
timed read, a wake-up. ``AutoPipeline`` queues every command and has one drain task send
what queued up while the previous pipeline was in flight, so at 32 clients a command costs
its packing and parsing and little else; a lone command goes out on the next loop turn, as
before. Replies come back in order; one command's error reaches only its caller.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.commands.core import AsyncScript

MAX_BATCH = 256  # commands in one pipeline: bounds the write and the wait of the first caller


class AutoPipeline:
    """Queue Redis commands and send them in pipelines (no MULTI: each command stays atomic on its own).

    Args:
        redis: the client whose pool the pipelines use (its timeouts and retry apply per pipeline).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._drain: asyncio.Task[None] | None = None
        self._loading: dict[str, asyncio.Future[Any]] = {}  # by SHA: concurrent NOSCRIPTs load it once

    def register_script(self, source: str) -> "PipelinedScript":
        """A Lua script called like redis-py's (``await script(keys=..., args=...)``), through this pipeline."""
        return PipelinedScript(self, self.redis.register_script(source))

    async def execute(self, *args: Any) -> Any:
        """Run one command (``execute_command``'s arguments) in the next pipeline; return its reply."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if self._drain is None:
            self._drain = asyncio.create_task(self._run())
        return await future

    async def script(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """Run a registered Lua script by its SHA; on ``NOSCRIPT`` (a restarted Redis) load it and run it again."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            await self._load(script)
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load(self, script: AsyncScript) -> None:
        loading = self._loading.get(script.sha)
        if loading is None:
            loading = self._loading[script.sha] = asyncio.ensure_future(self.redis.script_load(script.script))
            loading.add_done_callback(lambda _: self._loading.pop(script.sha, None))
        await asyncio.shield(loading)

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._send(batch)
        finally:
            self._drain = None

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:  # alone: a plain command costs less than a pipeline of one
                replies = [await _reply(self.redis, batch[0][0])]
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # the connection failed: every caller of the batch gets it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # cancelled (the replica stops): so are the callers
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), reply in zip(batch, replies):
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class PipelinedScript:
    """A registered script whose calls go through an ``AutoPipeline`` (see ``AutoPipeline.register_script``)."""

    def __init__(self, pipeline: AutoPipeline, script: AsyncScript) -> None:
        self.pipeline = pipeline
        self.script = script

    async def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None) -> Any:
        return await self.pipeline.script(self.script, list(keys or ()), list(args or ()))


async def _reply(client: aioredis.Redis, args: tuple[Any, ...]) -> Any:
    """One command's reply, or its Redis error as a value (as a pipeline returns it)."""
    try:
        return await client.execute_command(*args)
    except redis.exceptions.ResponseError as exc:
        return exc
