"""``KeyCache``: API keys a Gateway replica has authenticated, kept in memory for a few seconds.

Without it every request costs one Redis ``GET`` of its key (~10 % of a Gateway
replica's CPU on the hot path, bench/RESULTS.md). Revocation must still take
effect at once on every replica, so:

* ``KeyStore.revoke`` publishes the key's digest on ``REVOKED_CHANNEL``; each
  replica's cache is subscribed and drops the digest when the message arrives;
* entries are served only while that subscription is up (it is emptied each time
  it comes up, redis-py's own reconnections included: messages sent while it was
  down are lost), and never past ``ttl_s``, which bounds a revocation the
  subscription missed without noticing;
* a lookup that raced a revocation (its ``GET`` answered before the message
  arrived) is not kept.

Only keys that authenticated are cached: an unknown key asks Redis every time, so a
key created on another replica works at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

if TYPE_CHECKING:
    from serve_app.auth import APIKey

logger = logging.getLogger(__name__)

REVOKED_CHANNEL = "raygate:keys:revoked"
MAX_ENTRIES = 100_000  # emptied past this: the keys in use come back in one GET each
LISTEN_POLL_S = 1.0
RESUBSCRIBE_S = 1.0


class KeyCache:
    """Authenticated keys by sha256 digest, dropped on revocation by any replica.

    Args:
        redis: the client the subscription uses (one pooled connection, held).
        ttl_s: how long an entry is trusted; 0 turns the cache off.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, redis: aioredis.Redis, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.clock = clock
        self.live = False  # subscribed to REVOKED_CHANNEL right now
        self._entries: dict[str, tuple[float, APIKey]] = {}
        self._generation = 0  # bumped by every revocation seen: lookups that straddle one are not kept
        self._listener: asyncio.Task[None] | None = None

    def get(self, digest: str) -> APIKey | None:
        """The cached record, if it is fresh and the subscription is up; starts the subscription."""
        if not self.live:
            self._start()
            return None
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry[0] <= self.clock():
            del self._entries[digest]
            return None
        return entry[1]

    def token(self) -> int:
        """Taken before a Redis lookup and given back to ``put``."""
        return self._generation

    def put(self, digest: str, record: APIKey, token: int) -> None:
        """Keep an authenticated key, unless a revocation arrived since ``token`` was taken."""
        if self.ttl_s <= 0 or token != self._generation:
            return
        if len(self._entries) >= MAX_ENTRIES:
            self._entries.clear()
        self._entries[digest] = (self.clock() + self.ttl_s, record)

    def drop(self, digest: str) -> None:
        """Forget a key (revoked here, or by another replica)."""
        self._generation += 1
        self._entries.pop(digest, None)

    async def close(self) -> None:
        """Stop the subscription (the Redis client is the caller's to close)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    def _start(self) -> None:
        if self.ttl_s > 0 and self._listener is None:
            self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def _listen(self) -> None:
        """Hold the subscription, re-subscribing after a failure; the cache serves only while it is up."""
        while True:
            pubsub = self.redis.pubsub()
            try:
                await pubsub.subscribe(REVOKED_CHANNEL)
                self._forget_all()
                if pubsub.connection is not None:  # redis-py reconnects and re-subscribes by itself: hear of it
                    pubsub.connection.register_connect_callback(self._reconnected)
                self.live = True
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_POLL_S)
                    if message is not None and message.get("type") == "message":
                        self.drop(str(message["data"]))
            except (RedisError, OSError) as exc:
                if self.live:  # once per outage, not once a retry
                    logger.warning("Key revocation subscription lost (%s); asking Redis for every key meanwhile",
                                   type(exc).__name__)
            finally:
                self.live = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)

    def _reconnected(self, connection: Any) -> None:
        """redis-py re-subscribed on a new connection: revocations sent in between never arrive."""
        self._forget_all()

    def _forget_all(self) -> None:
        self._generation += 1
        self._entries.clear()
