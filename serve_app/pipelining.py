"""Auto-pipelining: the Redis commands of concurrent requests go out together, one pipeline at a time.

A replica under load runs a few Redis commands per request (rate limits, reserve/settle,
circuits, the cache), each of them alone: a pooled connection checked out, a write, a
timed read, a wake-up. ``AutoPipeline`` queues every command and has one drain task send
what queued up while the previous pipeline was in flight, so at 32 clients a command costs
its packing and parsing and little else; a lone command goes out on the next loop turn, as
before. Replies come back in order; one command's error reaches only its caller. Commands
are packed by hiredis's C encoder as they queue (redis-py's asyncio connection packs in
Python: ~6 us a script call, hiredis ~1), so an argument that cannot be sent fails its caller alone.

Each pipeline in flight holds one of the pipeline's own connections (no pool checkout), and
each whole round trip has one deadline instead of a timer per reply. With one connection,
one pipeline is in flight at a time; the Gateway shares one ``AutoPipeline`` with a few
connections among its embedded components, so a request's guard, cost guard and cache
commands due in the same loop turn go out in one write, and under load a pipeline need
not wait for another's replies. A connection found dead (Redis restarted) is replaced and
the batch sent once more, as the pooled client's retry does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript

from serve_app.constants import REDIS_TIMEOUT_S

MAX_BATCH = 256  # commands in one pipeline: bounds the write and the wait of the first caller
RECONNECT_DELAY_S = 0.05
# The Gateway's shared pipeline: a connection for each embedded component that sends commands (guard,
# cost guard, circuits, cache), so under load none waits on the others more than with one pipeline each.
SHARED_CONNECTIONS = 4


class AutoPipeline:
    """Queue Redis commands and send them in pipelines (no MULTI: each command stays atomic on its own).

    Replies are Redis's own (decoded as ``redis`` decodes), without redis-py's per-command
    response callbacks: scripts' replies, which have none, are the same either way.

    Args:
        redis: the client whose server and settings the pipeline's own connection copies (and
            which loads scripts).
        timeout_s: the deadline of one round trip (a pipeline written and all its replies read).
        connections: how many pipelines may be in flight at once (one connection each).
    """

    def __init__(self, redis: aioredis.Redis, timeout_s: float = REDIS_TIMEOUT_S, connections: int = 1) -> None:
        self.redis = redis
        self.timeout_s = timeout_s
        pool = redis.connection_pool
        self._conns: list[AbstractConnection] = [
            pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None}) for _ in range(connections)]
        self._idle = list(self._conns)  # the connections no pipeline holds
        self._queue: list[tuple[bytes, asyncio.Future[Any]]] = []  # packed commands
        self._starting = False  # a sender is about to take the queue: what joins it now goes with it
        self._senders: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references
        self._loading: dict[str, asyncio.Future[Any]] = {}  # by SHA: concurrent NOSCRIPTs load it once

    def register_script(self, source: str) -> "PipelinedScript":
        """A Lua script called like redis-py's (``await script(keys=..., args=...)``), through this pipeline."""
        return PipelinedScript(self, self.redis.register_script(source))

    async def execute(self, *args: Any) -> Any:
        """Run one command (``execute_command``'s arguments) in the next pipeline; return its reply."""
        packed = pack(args)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((packed, future))
        if not self._starting and self._idle:
            self._starting = True
            sender = asyncio.create_task(self._run(self._idle.pop()))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
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

    async def _run(self, conn: AbstractConnection) -> None:
        """Send what is queued on ``conn``, a pipeline at a time, until the queue is empty."""
        self._starting = False
        try:
            while self._queue:
                batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                await self._send(conn, batch)
        finally:
            self._idle.append(conn)

    async def _send(self, conn: AbstractConnection, batch: list[tuple[bytes, asyncio.Future[Any]]]) -> None:
        try:
            replies = await self._round_trip(conn, [packed for packed, _ in batch])
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

    async def _round_trip(self, conn: AbstractConnection, commands: list[bytes]) -> list[Any]:
        """Write the commands, read every reply (a Redis error as a value); one retry on a dead connection."""
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    return await self._write_and_read(conn, commands)
                except _NothingRead:  # a dead connection ran none of them: a fresh one runs them once
                    await conn.disconnect()
                    await asyncio.sleep(RECONNECT_DELAY_S)
                    return await self._write_and_read(conn, commands)
        except TimeoutError as exc:
            await conn.disconnect(nowait=True)  # replies may still be on their way: start clean
            raise redis.exceptions.TimeoutError(f"Redis did not answer in {self.timeout_s} s") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise

    @staticmethod
    async def _write_and_read(conn: AbstractConnection, commands: list[bytes]) -> list[Any]:
        replies: list[Any] = []
        try:
            await conn.connect()  # at once when connected
            await conn.send_packed_command(b"".join(commands), check_health=False)
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
        except (redis.exceptions.ConnectionError, OSError) as exc:
            if not replies:
                raise _NothingRead() from exc
            raise
        return replies

    async def close(self) -> None:
        """Close the pipeline's connections (a later command opens one again)."""
        for conn in self._conns:
            await conn.disconnect()


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in the Redis protocol, as redis-py packs it (str as UTF-8, numbers as their repr)."""
    try:
        return hiredis.pack_command(args)
    except TypeError as exc:  # what redis-py's encoder refuses (None, bool, ...) it refuses too
        raise redis.exceptions.DataError(f"Invalid Redis command argument: {exc}") from None


class _NothingRead(redis.exceptions.ConnectionError):
    """The connection failed before any reply of the batch was read."""


class PipelinedScript:
    """A registered script whose calls go through an ``AutoPipeline`` (see ``AutoPipeline.register_script``)."""

    def __init__(self, pipeline: AutoPipeline, script: AsyncScript) -> None:
        self.pipeline = pipeline
        self.script = script

    async def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None) -> Any:
        return await self.pipeline.script(self.script, list(keys or ()), list(args or ()))

