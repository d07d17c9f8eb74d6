"""Circuit breakers, one per upstream model, shared by every gateway replica through Redis.

States: ``closed`` (calls go through) → ``open`` after ``failure_threshold``
consecutive failures or an error rate over the window → after ``cooldown_s``,
``half_open``: one probe call goes through; its success closes the circuit, its
failure opens it again. Each transition is one Lua script, so replicas never
disagree about a transition. A replica that last saw a circuit closed trusts that for
``state_cache_s`` and lets calls go without asking Redis: the check costs nothing while
the upstream is healthy, and another replica's opening reaches it that much later. Its
successes on a circuit it trusts closed are counted in memory and sent together, within
``state_cache_s`` or before its next failure on that circuit (whichever comes first): a
healthy upstream costs one Redis script per replica every ``state_cache_s``, not one per
call; another replica's failures meet these successes that much later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Literal

import redis.asyncio as aioredis

from serve_app.config import CircuitBreakerConfig
from serve_app.errors import RaygateError
from serve_app.pipelining import AutoPipeline
from serve_app.stores import map_redis_errors

logger = logging.getLogger(__name__)

Permission = Literal["allow", "probe", "skip"]
KEY_PREFIX = "raygate:circuit:"

# KEYS[1] circuit hash. ARGV: now, cooldown_s. Returns 1 allow, 2 probe, 0 skip.
_ALLOW = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return 1 end
local now = tonumber(ARGV[1])
local since = tonumber(redis.call('HGET', KEYS[1], 'since') or '0')
if now - since >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'since', now)
  return 2
end
redis.call('HINCRBY', KEYS[1], 'skipped', 1)
return 0
"""

# KEYS[1] circuit hash. ARGV: ok(1/0), now, failure_threshold, error_rate, min_requests, window_s,
# successes (ok: the successes recorded, this call's included; a failure: those counted before it).
# Returns the state after the call.
_RECORD = """
local now = tonumber(ARGV[2])
local window = tonumber(ARGV[6])
local successes = tonumber(ARGV[7])
local wstart = tonumber(redis.call('HGET', KEYS[1], 'window_start') or '0')
if now - wstart >= window then
  redis.call('HSET', KEYS[1], 'window_start', now, 'calls', 0, 'failures', 0)
end
if successes > 0 then
  redis.call('HINCRBY', KEYS[1], 'calls', successes)
  redis.call('HSET', KEYS[1], 'consecutive', 0)
end
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[1] == '1' then
  if state ~= 'closed' then redis.call('HSET', KEYS[1], 'state', 'closed', 'since', now) end
  return 'closed'
end
local calls = redis.call('HINCRBY', KEYS[1], 'calls', 1)
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
if state == 'half_open' or consecutive >= tonumber(ARGV[3])
   or (calls >= tonumber(ARGV[5]) and failures / calls >= tonumber(ARGV[4])) then
  if state ~= 'open' then redis.call('HINCRBY', KEYS[1], 'opened', 1) end
  redis.call('HSET', KEYS[1], 'state', 'open', 'since', now)
  return 'open'
end
return state
"""


class CircuitBreakers:
    """The circuits of all upstream models.

    Args:
        redis: an asyncio client (``decode_responses=True``).
        pipeline: the Gateway's, shared with its other components; None: one of its own.
    """

    def __init__(self, redis: aioredis.Redis, pipeline: AutoPipeline | None = None) -> None:
        self.redis = redis
        self._pipeline = pipeline or AutoPipeline(redis)  # concurrent commands share round trips
        self._allow = self._pipeline.register_script(_ALLOW)
        self._record = self._pipeline.register_script(_RECORD)
        self._closed_until: dict[str, float] = {}  # by model: when this replica's sight of "closed" expires
        self._successes: dict[str, tuple[int, float]] = {}  # by model: successes not sent yet, the last one's time
        self._flushes: dict[str, tuple[asyncio.TimerHandle, CircuitBreakerConfig]] = {}  # by model: when they go
        self._sending: set[asyncio.Task[None]] = set()  # held here: the loop keeps only weak references

    async def permission(self, model: str, config: CircuitBreakerConfig, now: float | None = None) -> Permission:
        """Return whether a call to ``model`` may go: allow, probe (half-open) or skip (open)."""
        if not config.enabled:
            return "allow"
        now = _now(now)
        if self._closed_until.get(model, 0.0) > now:
            return "allow"
        async with map_redis_errors("circuit check"):
            result = await self._allow(keys=[KEY_PREFIX + model], args=[now, config.cooldown_s])
        permission: Permission = {1: "allow", 2: "probe", 0: "skip"}[int(result)]
        self._saw(model, "closed" if permission == "allow" else "open", config, now)
        return permission

    async def record(self, model: str, ok: bool, config: CircuitBreakerConfig, now: float | None = None) -> str:
        """Record a call's outcome; return the circuit's state after it."""
        if not config.enabled:
            return "closed"
        now = _now(now)
        if ok and self._closed_until.get(model, 0.0) > now:  # trusted closed: sent with the next ones
            self._count_success(model, config, now)
            return "closed"
        return await self._send(model, ok, self._take_successes(model) + int(ok), config, now)

    async def _send(self, model: str, ok: bool, successes: int, config: CircuitBreakerConfig, now: float) -> str:
        args = [1 if ok else 0, now, config.failure_threshold, config.error_rate_threshold,
                config.min_requests, config.window_s, successes]
        async with map_redis_errors("circuit record"):
            state = str(await self._record(keys=[KEY_PREFIX + model], args=args))
        self._saw(model, state, config, now)
        return state

    def _count_success(self, model: str, config: CircuitBreakerConfig, now: float) -> None:
        count, _ = self._successes.get(model, (0, now))
        self._successes[model] = (count + 1, now)
        if model not in self._flushes:
            timer = asyncio.get_running_loop().call_later(config.state_cache_s, self._flush, model, config)
            self._flushes[model] = timer, config

    def _take_successes(self, model: str) -> int:
        """The successes not sent yet (a failure carries them: they came first)."""
        if (flush := self._flushes.pop(model, None)) is not None:
            flush[0].cancel()
        return self._successes.pop(model, (0, 0.0))[0]

    def _flush(self, model: str, config: CircuitBreakerConfig) -> None:
        self._flushes.pop(model, None)
        count, now = self._successes.pop(model, (0, 0.0))
        if count:
            task = asyncio.ensure_future(self._send_quietly(model, count, config, now))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send_quietly(self, model: str, count: int, config: CircuitBreakerConfig, now: float) -> None:
        try:
            await self._send(model, True, count, config, now)
        except RaygateError as exc:  # Redis down: successes are only counts, and the next ones will go
            logger.debug("Circuit successes of %s not recorded: %s", model, exc)

    def _saw(self, model: str, state: str, config: CircuitBreakerConfig, now: float) -> None:
        """Remember a sight of ``model``'s circuit: closed is trusted for ``state_cache_s``, anything else not."""
        if state == "closed":
            self._closed_until[model] = now + config.state_cache_s
        else:
            self._closed_until.pop(model, None)

    async def close(self) -> None:
        """Send the successes still counted here, then close the pipeline's connection (the client is the caller's)."""
        for model, (timer, config) in list(self._flushes.items()):
            timer.cancel()
            self._flush(model, config)
        await asyncio.gather(*self._sending, return_exceptions=True)
        await self._pipeline.close()

    async def state(self, model: str) -> dict[str, str]:
        """Return a circuit's stored fields (state, counters), for admin views and tests."""
        async with map_redis_errors("circuit state"):
            fields: dict[str, str] = await self.redis.hgetall(KEY_PREFIX + model)
        return fields

    async def cooldown_left_s(self, model: str, config: CircuitBreakerConfig, now: float | None = None) -> float:
        """Seconds until an open circuit lets a probe through (for Retry-After)."""
        since = float((await self.state(model)).get("since", 0))
        return max(0.0, since + config.cooldown_s - _now(now))


def _now(now: float | None) -> float:
    return time.time() if now is None else now
