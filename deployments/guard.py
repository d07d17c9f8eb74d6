"""Guard: per-key rate limits, flood blocks and anomaly scoring, enforced cluster-wide through Redis.

``check`` is the request path's only call: one Lua script (``deployments.guard_lua``)
that, atomically, rejects a blocked key, counts the attempt for flood and anomaly
detection, blocks a key whose burst is ``flood.factor`` times its own baseline,
and applies the plan's requests- and tokens-per-minute limits (a sliding window,
``deployments.guard_protocol``). The counters live in Redis, never in a replica's
memory, so N Gateway replicas enforce the configured limit, not N times it, and
the class works embedded in each Gateway replica or as its own Serve deployment.

Off the request path: ``record_tokens`` corrects the token estimate with the
real usage; ``anomalies`` scores each active key's last minute against its own
history (for alerts, or blocks); ``list_blocks``/``block``/``lift_block`` serve
the admin API.

Rate limits follow the replicas' clocks (``now``), which must agree to well
under a second (NTP). In Redis Cluster, give a ``{hash tag}`` prefix: the
scripts need every key in one slot.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from typing import Any

from deployments.guard_lua import GUARD_LUA
from deployments.guard_protocol import (
    WINDOW_S, Anomaly, Block, GuardDecision, Reason, remaining, reset_s, usage, wait_s,
)
from serve_app.auth import APIKey
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.guard_config import GuardConfig
from serve_app.pipelining import AutoPipeline
from serve_app.protocol import ChatCompletionRequest
from serve_app.stores import map_redis_errors, redis_client

logger = logging.getLogger(__name__)

__all__ = ["Anomaly", "Block", "Guard", "GuardDecision", "check_request_size"]

_STATUS: dict[int, Reason | None] = {1: None, 2: "rate_requests", 3: "rate_tokens", 4: "blocked", 5: "flood"}
_HISTORY_BATCH = 256  # keys scored per script call, so one call never holds Redis for long


def check_request_size(config: GuardConfig, body: ChatCompletionRequest) -> None:
    """Reject a chat request with more messages or content than the config allows (no Redis).

    Kept out of ``Guard`` so the Gateway checks it in process wherever Guard runs.

    Raises:
        InvalidRequestError: too many messages, or too much content (400).
    """
    if config.max_messages is not None and len(body.messages) > config.max_messages:
        raise InvalidRequestError(
            f"Too many messages: {len(body.messages)}; at most {config.max_messages} are allowed.",
            param="messages", code="too_many_messages",
        )
    if config.max_content_chars is not None:
        chars = sum(len(m.text()) for m in body.messages)
        if chars > config.max_content_chars:
            raise InvalidRequestError(
                f"The messages are too long: {chars} characters; at most {config.max_content_chars} are allowed.",
                param="messages", code="content_too_long",
            )


class Guard:
    """Rate limits, flood blocks and anomaly scores per API key; embedded or as a Serve deployment.

    Args:
        config: plan limits and detection settings.
        redis_url: the Redis/Valkey holding the counters and blocks.
        key_prefix: namespace of every key (tests use one per test).
        pipeline: the embedding Gateway's, shared with its other components; None: one of its own.
    """

    def __init__(self, config: GuardConfig, redis_url: str, *, key_prefix: str = "raygate:guard",
                 pipeline: AutoPipeline | None = None) -> None:
        self.config = config
        self.redis = redis_client(redis_url, config.redis_max_connections)
        self._script = (pipeline or AutoPipeline(self.redis)).register_script(GUARD_LUA)
        self._prefix = key_prefix
        self._blocks = f"{key_prefix}:blocks"
        self._active = f"{key_prefix}:active"
        self._ttl_s = config.counter_ttl_s()
        flood = config.flood
        # Per short window, the baseline keeps this share of itself: half of it is gone after a half-life.
        self._flood_keep = 0.5 ** (flood.window_s / flood.baseline_half_life_s)
        # After 20 half-lives the baseline is ~1e-6 of what it was: the state can go.
        self._flood_ttl_s = math.ceil(20 * flood.baseline_half_life_s) if flood.enabled else 0

    async def check(self, key: APIKey, estimated_tokens: int, now: float | None = None) -> GuardDecision:
        """Admit or reject one request, counting it against the key's limits cluster-wide.

        Args:
            key: the caller (its ``key_id`` is the rate-limited identity, its ``plan`` picks the limits).
            estimated_tokens: the request's worst case (prompt estimate + max output tokens); counted
                now and corrected later by ``record_tokens``.
            now: epoch seconds (tests); default the clock.

        Returns:
            The decision, with the headers to send (``headers()``) and, when rejected, the 429
            (``to_error()``).

        Raises:
            ServiceUnavailableError: Redis is unreachable.
        """
        now = time.time() if now is None else now
        tokens = max(0, int(estimated_tokens))
        limits = self.config.plans.get(key.plan)
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        minute = int(now // WINDOW_S)
        elapsed = now - minute * WINDOW_S
        flood = self.config.flood
        args: list[Any] = [
            "check", key.key_id, repr(now), repr(1 - elapsed / WINDOW_S), -1 if rpm is None else rpm,
            -1 if tpm is None else tpm, tokens, self._ttl_s, int(now // flood.window_s), repr(self._flood_keep),
            repr(flood.factor), max(flood.min_requests, rpm + 1 if rpm is not None else 0),
            Block(key_id=key.key_id, reason="flood", until=now + flood.block_s, created_at=now).entry(),
            self._flood_ttl_s, 1 if self.config.anomaly.enabled else 0,
        ]
        keys = [self._blocks, self._active, self._minute_key(key.key_id, minute),
                self._minute_key(key.key_id, minute - 1), f"{self._prefix}:f:{key.key_id}"]
        async with map_redis_errors("guard check"):
            status, cr, ct, pr, pt, entry = await self._script(keys=keys, args=args)
        reason = _STATUS[int(status)]
        decision = self._decision(reason, now, elapsed, tokens, rpm, tpm, int(cr), int(ct), int(pr), int(pt))
        if entry:
            block = Block.from_entry(key.key_id, entry)
            decision.blocked_until, decision.retry_after_s = block.until, max(0.0, block.until - now)
        if reason == "flood":
            logger.warning("Guard blocked key %s for a flood until %s", key.key_id, decision.blocked_until)
        return decision

    async def record_tokens(
        self, key: APIKey, actual_tokens: int, estimated_tokens: int, now: float | None = None
    ) -> None:
        """Replace a request's token estimate with its real usage (call off the request path).

        Args:
            key: the caller given to ``check``.
            actual_tokens: prompt + completion tokens the model reported.
            estimated_tokens: what ``check`` counted.
            now: the decision's ``checked_at``, so the correction lands in the minute the estimate
                was counted in; default the clock. A minute already expired is left alone.
        """
        delta = int(actual_tokens) - max(0, int(estimated_tokens))
        if delta == 0 or self.config.plans.get(key.plan).tokens_per_minute is None:
            return
        now = time.time() if now is None else now
        async with map_redis_errors("guard record tokens"):
            await self._script(keys=[self._minute_key(key.key_id, int(now // WINDOW_S))], args=["tokens", delta])

    async def list_blocks(self, now: float | None = None) -> list[Block]:
        """Return the active blocks, soonest to end first (expired ones are deleted on the way)."""
        now = time.time() if now is None else now
        async with map_redis_errors("guard list blocks"):
            flat = await self._script(keys=[self._blocks], args=["blocks", repr(now)])
        blocks = [Block.from_entry(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return sorted(blocks, key=lambda b: (b.until, b.key_id))

    async def block(self, key_id: str, seconds: float, reason: str, now: float | None = None) -> Block:
        """Block a key for ``seconds`` from now, replacing any block it has.

        Raises:
            InvalidRequestError: ``seconds`` is not positive, or ``reason`` is empty.
        """
        if not seconds > 0:
            raise InvalidRequestError("A block needs a positive duration in seconds.", param="seconds")
        if not reason.strip():
            raise InvalidRequestError("A block needs a reason.", param="reason")
        now = time.time() if now is None else now
        block = Block(key_id=key_id, reason=reason.strip(), until=now + seconds, created_at=now)
        async with map_redis_errors("guard block"):
            await self.redis.hset(self._blocks, key_id, block.entry())
        logger.warning("Guard blocked key %s until %s (%s)", key_id, block.until, block.reason)
        return block

    async def lift_block(self, key_id: str, now: float | None = None) -> Block:
        """End a key's block now, and return it.

        Raises:
            NotFoundError: the key has no active block.
        """
        now = time.time() if now is None else now
        async with map_redis_errors("guard lift block"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hget(self._blocks, key_id)
                pipe.hdel(self._blocks, key_id)
                entry, _ = await pipe.execute()
        if entry is None or Block.from_entry(key_id, entry).until <= now:
            raise NotFoundError(f"The key '{key_id}' is not blocked.")
        logger.info("Guard lifted the block on key %s", key_id)
        return Block.from_entry(key_id, entry)

    async def anomalies(self, now: float | None = None) -> list[Anomaly]:
        """Score each key active in the last full minute against its own per-minute history.

        A key's score is the z-score of its attempts in the last full minute against the
        ``anomaly.history_minutes`` before it (idle minutes count as zero; the standard
        deviation is floored at ``min_stddev``). With ``action: block`` the keys found are
        blocked for ``block_s`` unless already blocked. Meant for one periodic caller (e.g.
        each minute); the Gateway turns the answers into alerts.

        Returns:
            The keys at or over ``z_threshold`` with at least ``min_requests`` attempts, highest
            score first.
        """
        config = self.config.anomaly
        if not config.enabled:
            return []
        now = time.time() if now is None else now
        minute = int(now // WINDOW_S) - 1
        first = minute - config.history_minutes
        async with map_redis_errors("guard anomalies"):
            await self.redis.zremrangebyscore(self._active, "-inf", now - self._ttl_s)
            key_ids: list[str] = await self.redis.zrangebyscore(self._active, minute * WINDOW_S, "+inf")
            counts: list[list[int]] = []
            for i in range(0, len(key_ids), _HISTORY_BATCH):
                batch = key_ids[i:i + _HISTORY_BATCH]
                counts += await self._script(
                    keys=[], args=["history", f"{self._prefix}:m:", first, config.history_minutes + 1, *batch]
                )
        found: list[Anomaly] = []
        for key_id, series in zip(key_ids, counts):
            history, last = [int(c) for c in series[:-1]], int(series[-1])
            mean, stddev = statistics.fmean(history), statistics.pstdev(history)
            z = (last - mean) / max(stddev, config.min_stddev)
            if last >= config.min_requests and z >= config.z_threshold:
                found.append(Anomaly(key_id=key_id, minute_start=minute * WINDOW_S, requests=last, mean=mean,
                                     stddev=stddev, z_score=z))
        found.sort(key=lambda a: (-a.z_score, a.key_id))
        if found and config.action == "block":
            blocked = {b.key_id for b in await self.list_blocks(now)}
            for anomaly in found:
                if anomaly.key_id not in blocked:
                    await self.block(anomaly.key_id, config.block_s, "anomaly", now)
                    anomaly.blocked = True
        for anomaly in found:
            logger.warning("Guard anomaly: key %s made %s requests in a minute (z=%.1f)", anomaly.key_id,
                           anomaly.requests, anomaly.z_score)
        return found

    async def ping(self) -> None:
        """Raise ServiceUnavailableError when Redis does not answer (for the Gateway's GET /health)."""
        async with map_redis_errors("guard ping"):
            await self.redis.ping()

    async def close(self) -> None:
        """Close the Redis connections."""
        await self._script.pipeline.close()
        await self.redis.aclose()

    # -- helpers -------------------------------------------------------------------------------

    def _decision(
        self, reason: Reason | None, now: float, elapsed: float, tokens: int, rpm: int | None, tpm: int | None,
        cr: int, ct: int, pr: int, pt: int,
    ) -> GuardDecision:
        """Turn the script's counts into a decision (counts include the request when it was admitted)."""
        allowed = reason is None
        d = GuardDecision(allowed=allowed, reason=reason, checked_at=now, requested_tokens=tokens)
        if rpm is not None:
            d.limit_requests, d.remaining_requests = rpm, remaining(rpm, pr, cr, elapsed)
            d.reset_requests_s = reset_s(pr, cr, elapsed)
            d.used_requests = math.ceil(usage(pr, cr - allowed, elapsed) - 1e-9)
        if tpm is not None:
            d.limit_tokens, d.remaining_tokens = tpm, remaining(tpm, pt, ct, elapsed)
            d.reset_tokens_s = reset_s(pt, ct, elapsed)
            d.used_tokens = math.ceil(usage(pt, ct - tokens * allowed, elapsed) - 1e-9)
        if reason in ("rate_requests", "rate_tokens"):
            waits = [wait_s(rpm, 1, pr, cr, elapsed) if rpm is not None else 0.0,
                     wait_s(tpm, tokens, pt, ct, elapsed) if tpm is not None else 0.0]
            d.retry_after_s = None if None in waits else max(w for w in waits if w is not None)
        return d

    def _minute_key(self, key_id: str, minute: int) -> str:
        return f"{self._prefix}:m:{key_id}:{minute}"
