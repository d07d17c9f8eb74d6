"""The response cache: exact answers in Redis, paraphrases through the semantic layer.

``ResponseCache`` runs embedded in each Gateway replica (the exact layer only
needs Redis: no hop) and reaches the ``SemanticCache`` deployment only when the
exact key misses. Every failure of either store is a bypass — logged, counted —
never a failed request.

Redis layout under ``prefix``: ``e:<tenant>:<model>:<hash>`` the entries (with
their TTL), ``lru`` a sorted set of entry keys by last use (the size bound evicts
its oldest), ``meta`` entry key -> what invalidation selects on, ``stats`` counters.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions

from deployments.cache_protocol import (
    CacheEntry, CacheHit, CacheScope, CacheStatus, Selector, cache_control, last_user_text,
)
from deployments.cache_match import same_question
from serve_app.cache_config import CacheConfig
from serve_app.pipelining import AutoPipeline
from serve_app.placement import Placed
from serve_app.protocol import ChatCompletionRequest, FinishReason, UsageInfo
from serve_app.stores import redis_client
from serve_app.tasks import BackgroundTasks

logger = logging.getLogger(__name__)

_STORED_FINISHES = ("stop", "length")
_SCAN_BATCH = 500
COUNT_FLUSH_S = 1.0  # how often a replica's lookup counters reach the shared ones

# KEYS: entry, lru, meta, stats. ARGV: value, ttl, now, meta, max entries. Returns the evicted keys.
_PUT_LUA = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], ARGV[4])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
local evicted = {}
if over > 0 then
  local popped = redis.call('ZPOPMIN', KEYS[2], over)
  for i = 1, #popped, 2 do
    local key = popped[i]
    evicted[#evicted + 1] = key
    redis.call('HDEL', KEYS[3], key)
    if redis.call('DEL', key) == 1 then redis.call('HINCRBY', KEYS[4], 'evictions', 1) end
  end
end
return evicted
"""
# KEYS: entry, lru, meta. ARGV: now. The entry, its use recorded; an expired one's index rows go.
_GET_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  redis.call('ZADD', KEYS[2], 'XX', ARGV[1], KEYS[1])
elseif redis.call('ZREM', KEYS[2], KEYS[1]) == 1 then
  redis.call('HDEL', KEYS[3], KEYS[1])
end
return value
"""


@dataclass
class CachePlan:
    """What the cache does for one request: its keys, and whether to look up and to store."""

    status: CacheStatus
    scope: CacheScope
    key: str = ""
    semantic_scope: str = ""
    text: str | None = None
    lookup: bool = False
    store: bool = False


class ResponseCache:
    """Exact and semantic response cache, embedded in the Gateway.

    Args:
        config: the cache settings.
        redis_url: where entries live.
        semantic: the SemanticCache, placed (None: exact layer only).
        key_prefix: namespace of every key (tests use one per test).
        on_evict: told how many entries each store evicted (metrics).
        pipeline: the Gateway's, shared with its other components; None: one of its own.
    """

    def __init__(self, config: CacheConfig, redis_url: str, semantic: Placed | None, *,
                 key_prefix: str = "raygate:cache", on_evict: Callable[[int], None] | None = None,
                 pipeline: AutoPipeline | None = None) -> None:
        self.config = config
        self.redis = redis_client(redis_url)
        self.semantic = semantic if config.semantic.enabled else None
        self.prefix = key_prefix
        self._lru, self._meta, self._stats = f"{key_prefix}:lru", f"{key_prefix}:meta", f"{key_prefix}:stats"
        self._pipeline = pipeline or AutoPipeline(self.redis)  # concurrent commands share round trips
        self._put = self._pipeline.register_script(_PUT_LUA)
        self._get = self._pipeline.register_script(_GET_LUA)
        self.errors = 0  # store failures seen by this replica (also logged)
        self._on_evict = on_evict
        self._counts: dict[str, float] = {}  # this replica's counters not yet in Redis
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flushes = BackgroundTasks()

    def plan(self, body: ChatCompletionRequest, tenant: str, model: str, cache_control_header: str | None,
             template_version: str | None = None) -> CachePlan:
        """Decide whether this request may be served from and stored into the cache.

        Only deterministic requests (temperature 0) are cached, unless the tenant or model
        is configured to cache any; ``Cache-Control: no-cache`` skips the lookup and
        ``no-store`` the storing.
        """
        scope = CacheScope(tenant=tenant, model=model, template_version=template_version)
        lookup, store = cache_control(cache_control_header)
        deterministic = body.temperature == 0 or tenant in self.config.nondeterministic_tenants \
            or model in self.config.nondeterministic_models
        if not (self.config.enabled and deterministic and (lookup or store)):
            return CachePlan(status="bypass", scope=scope)
        text = last_user_text(body)
        # No semantic layer for requests with images: it compares text, and a text-only neighbour
        # (or another image's) is no answer about this image. The exact key hashes the images.
        if text is not None and (len(text) > self.config.semantic.max_text_chars or body.images()):
            text = None
        return CachePlan(status="miss" if lookup else "bypass", scope=scope, key=scope.exact_key(self.prefix, body),
                         semantic_scope=scope.semantic_scope(body), text=text, lookup=lookup, store=store)

    async def lookup(self, plan: CachePlan) -> CacheHit | None:
        """Return the exact entry, else a paraphrase's entry over the threshold, else None (a miss)."""
        return await self.lookup_exact(plan) or await self.lookup_semantic(plan)

    async def lookup_exact(self, plan: CachePlan) -> CacheHit | None:
        """Return the entry under the request's exact key, else None (one Redis read)."""
        if not plan.lookup:
            return None
        entry = await self._read(plan, plan.key)
        return CacheHit(entry=entry, status="hit") if entry is not None else None

    def may_find_paraphrase(self, plan: CachePlan) -> bool:
        """Whether ``lookup_semantic`` can find anything for ``plan`` (a layer, a text, a lookup not bypassed)."""
        return plan.lookup and self.semantic is not None and plan.text is not None and plan.status != "bypass"

    async def lookup_semantic(self, plan: CachePlan) -> CacheHit | None:
        """Return a paraphrase's entry over the threshold, else None (an Embedder call, then Redis reads)."""
        if not self.may_find_paraphrase(plan):
            return None
        try:
            found = await self.semantic("search", plan.semantic_scope, plan.text)
        except Exception as exc:  # noqa: BLE001 - the semantic layer failing is a bypass, not an error
            self._failed("semantic lookup", exc, plan)
            return None
        for key, similarity in found:
            entry = await self._read(plan, key)  # None when expired or evicted since it was indexed
            if entry is not None and entry.tenant == plan.scope.tenant and self._same(entry, plan.text):
                return CacheHit(entry=entry, status="semantic-hit", similarity=similarity)
        return None

    async def store(self, plan: CachePlan, content: str, finish_reason: FinishReason | None, model: str,
                    usage: UsageInfo, cost_usd: float, user: str, tags: list[str], category: str | None) -> bool:
        """Keep a complete, successful answer (called off the client's path); return whether it was stored."""
        if not plan.store or finish_reason not in _STORED_FINISHES or not content:
            return False
        now = time.time()
        ttl = self.config.ttl_s(category)
        entry = CacheEntry(key=plan.key, question=plan.text, content=content, finish_reason=finish_reason, model=model, usage=usage,
                           cost_usd=cost_usd, tenant=plan.scope.tenant, user=user, tags=tags, category=category,
                           stored_at=now)
        try:
            evicted = await self._put(keys=[plan.key, self._lru, self._meta, self._stats],
                                      args=[entry.model_dump_json(), ttl, repr(now), entry.meta(),
                                            self.config.max_entries])
        except redis.exceptions.RedisError as exc:  # a cache that cannot store only loses a future hit
            self._failed("store", exc)
            return False
        if evicted and self._on_evict is not None:
            self._on_evict(len(evicted))
        if self.semantic is not None and (plan.text is not None or evicted):
            try:
                if plan.text is not None:
                    meta = orjson.loads(entry.meta())
                    await self.semantic("add", plan.semantic_scope, plan.text, plan.key, meta, now + ttl)
                if evicted:
                    await self.semantic("delete", None, list(evicted))
            except Exception as exc:  # noqa: BLE001 - the exact entry is stored; paraphrases will miss
                self._failed("semantic store", exc)
        return True

    def count(self, status: CacheStatus, saved_usd: float = 0.0) -> None:
        """Add one lookup's outcome to this replica's counters; they reach the shared ones in Redis in one
        pipeline within ``COUNT_FLUSH_S`` (a Redis call per request cost the Gateway CPU for a statistic)."""
        self._counts[status] = self._counts.get(status, 0) + 1
        if saved_usd:
            self._counts["saved_usd"] = self._counts.get("saved_usd", 0.0) + saved_usd
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(COUNT_FLUSH_S, self._flush_later)

    async def flush(self) -> None:
        """Send this replica's counters to Redis now; on failure they are dropped (best-effort, logged)."""
        counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name, value in counts.items():
                    if name == "saved_usd":
                        pipe.hincrbyfloat(self._stats, name, value)
                    else:
                        pipe.hincrby(self._stats, name, int(value))
                await pipe.execute()
        except redis.exceptions.RedisError as exc:
            self._failed("count", exc)

    async def invalidate(self, selector: Selector) -> int:
        """Remove every entry the selector matches, from both layers; return how many entries went.

        Raises:
            redis.exceptions.RedisError: Redis is unreachable (the admin API answers 503).
        """
        now, removed, cursor = time.time(), 0, 0
        while True:
            cursor, batch = await self.redis.hscan(self._meta, cursor, count=_SCAN_BATCH)
            keys = [k for k, raw in batch.items() if self._selected(selector, k, raw, now)]
            if keys:
                async with self.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(*keys)
                    pipe.zrem(self._lru, *keys)
                    pipe.hdel(self._meta, *keys)
                    await pipe.execute()
                removed += len(keys)
                if self.semantic is not None:
                    await self.semantic("delete", None, keys)
            if cursor == 0:
                break
        if self.semantic is not None:
            await self.semantic("delete", selector, None)  # points whose entries already expired
        logger.info("Cache invalidated %d entries", removed)
        return removed

    async def stats(self) -> dict[str, Any]:
        """Counters shared by every replica (this one's flushed first), the entry count, and this replica's
        store failures."""
        await self.flush()
        counts = await self.redis.hgetall(self._stats)
        stats: dict[str, Any] = {name: int(counts.get(name, 0)) for name in ("hit", "semantic-hit", "miss",
                                                                              "bypass", "evictions")}
        stats["saved_usd"] = float(counts.get("saved_usd", 0.0))
        stats["entries"] = int(await self.redis.zcard(self._lru))
        stats["errors_this_replica"] = self.errors
        return stats

    async def close(self) -> None:
        """Send the counters still held, then close the connections."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        await self._flushes.wait(COUNT_FLUSH_S)
        await self.flush()
        await self._pipeline.close()
        await self.redis.aclose()

    def _flush_later(self) -> None:
        self._flush_timer = None
        self._flushes.spawn(self.flush())

    # -- helpers -------------------------------------------------------------------------------

    async def _read(self, plan: CachePlan, key: str) -> CacheEntry | None:
        try:
            raw = await self._get(keys=[key, self._lru, self._meta], args=[repr(time.time())])
        except redis.exceptions.RedisError as exc:
            self._failed("lookup", exc, plan)
            return None
        return CacheEntry.model_validate_json(raw) if raw else None

    def _same(self, entry: CacheEntry, asked: str) -> bool:
        """The second opinion on an embedding neighbour (``semantic.match``)."""
        semantic = self.config.semantic
        return semantic.match == "embedding" or (
            entry.question is not None and same_question(entry.question, asked, semantic.small_edit_words))

    def _selected(self, selector: Selector, key: str, raw: str, now: float) -> bool:
        if selector.key_pattern is not None and not fnmatch.fnmatchcase(key, selector.key_pattern):
            return False
        return selector.matches(orjson.loads(raw), now)

    def _failed(self, what: str, exc: BaseException, plan: CachePlan | None = None) -> None:
        """Count and log a store failure; a request that met one is a bypass."""
        if plan is not None:
            plan.status = "bypass"
        self.errors += 1
        logger.warning("Cache bypassed: %s failed (%s)", what, type(exc).__name__)


class CacheService(ResponseCache):
    """The response cache as its own deployment (``placement.cache: deployment``, Serve name ``Cache``).

    The Gateway still plans each request and counts outcomes itself (no state: config and
    Redis counters); lookups and stores come here through a handle. Evictions are counted
    in this replica's metrics, which reach the same ``/metrics`` series.

    Args:
        config: the cache settings.
        redis_url: where entries live.
        semantic_cache: the SemanticCache's handle; None keeps the cache exact-only.
    """

    def __init__(self, config: CacheConfig, redis_url: str, semantic_cache: Any | None = None) -> None:
        from serve_app.metrics import GatewayMetrics

        self.metrics = GatewayMetrics()
        semantic = Placed("SemanticCache", semantic_cache, remote=True) if semantic_cache is not None else None
        super().__init__(config, redis_url, semantic,
                         on_evict=lambda n: self.metrics.inc("raygate_cache_evictions", n))

    async def __del__(self) -> None:
        """Serve calls this when the replica stops: the last second's eviction counts reach Ray, connections close."""
        self.metrics.flush()
        await self.close()
