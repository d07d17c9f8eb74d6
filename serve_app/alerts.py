"""Alerts (budget thresholds, flood blocks, usage anomalies): stored once in Redis, sent to a webhook.

CostGuard's ``settle`` reports each threshold crossing once (its Lua script
decides, so exactly one Gateway replica learns of it). The Gateway hands the
crossings to ``Alerter.notify``, which returns at once: a background task records
each alert in the ``AlertStore`` (idempotent by budget, period start and
threshold, so a repeated report changes nothing) and gives the alerts that were
new to the ``WebhookSender``, which POSTs each one with retries and marks it
delivered or failed. Nothing here runs on a request's path.

Redis layout (one ``{hash tag}`` prefix, so the record script's keys share a slot):

* ``<prefix>:alerts`` hash: alert id -> the alert as JSON.
* ``<prefix>:order`` sorted set: alert id scored by ``created_at``; the oldest
  past ``keep_last`` are dropped with their JSON.

The webhook URL is treated as a secret (Slack-style URLs carry a token): it is
never logged.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Literal, cast

import aiohttp
import orjson
import redis.asyncio as aioredis
from pydantic import BaseModel, Field, computed_field

from deployments.cost_guard_protocol import BudgetStatus, ThresholdCrossing
from deployments.guard_protocol import Anomaly
from serve_app.alerts_config import AlertsConfig
from serve_app.errors import RaygateError
from serve_app.stores import map_redis_errors

logger = logging.getLogger(__name__)

__all__ = ["Alert", "AlertStore", "Alerter", "AlertsConfig", "WebhookSender"]

Delivery = Literal["pending", "delivered", "failed", "unsent"]
_RETRYABLE_STATUSES = frozenset({408, 425, 429})
_COMMON_FIELDS = {"id", "kind", "created_at", "message"}
_KIND_FIELDS = {  # what a webhook body carries besides the common fields
    "budget_threshold": {"budget_id", "threshold", "period_start", "spent_fraction"},
    "flood_block": {"key_id"}, "anomaly": {"key_id"},
    "threshold": {"rule", "metric", "value", "limit", "state", "resolved_at"},
}
AlertKind = Literal["budget_threshold", "flood_block", "anomaly", "threshold"]

# KEYS: alerts hash, order zset. ARGV: id, json, created_at, keep_last. Returns 1 if stored, 0 if known.
_RECORD_LUA = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local extra = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[4])
if extra > 0 then
  local old = redis.call('ZRANGE', KEYS[2], 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, extra - 1)
  redis.call('HDEL', KEYS[1], unpack(old))
end
return 1
"""
# KEYS: alerts hash. ARGV: id, json. Rewrites a stored alert, never brings back a trimmed one.
_UPDATE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class Alert(BaseModel):
    """One alert as stored and listed (GET /admin/alerts)."""

    id: str = Field(description="kind:subject:when; the same event always gets the same id, so it is sent once.")
    kind: AlertKind = "budget_threshold"
    budget_id: str | None = None
    threshold: float | None = Field(None, description="The spent fraction crossed, e.g. 0.8 (budget alerts).")
    period_start: datetime | None = None
    key_id: str | None = Field(None, description="The API key (flood and anomaly alerts).")
    spent_fraction: float | None = Field(None, description="The budget's spent fraction when the alert was raised.")
    rule: str | None = Field(None, description="The alert rule (threshold alerts).")
    metric: str | None = Field(None, description="The rule's metric (threshold alerts).")
    value: float | None = Field(None, description="The metric's value when fired, then when resolved.")
    limit: float | None = Field(None, description="The rule's threshold.")
    state: Literal["firing", "resolved"] | None = Field(None, description="Threshold alerts only.")
    resolved_at: float | None = Field(None, description="Epoch seconds the condition cleared.")
    created_at: float = Field(description="Epoch seconds.")
    message: str
    delivery: Delivery = Field("pending", description="'unsent' when no webhook is configured.")
    delivery_attempts: int = 0
    last_error: str | None = Field(None, description="Why the last POST failed: an HTTP status or error type.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def delivered(self) -> bool:
        """Whether the webhook accepted the alert."""
        return self.delivery == "delivered"

    @classmethod
    def from_crossing(
        cls, crossing: ThresholdCrossing, *, spent_fraction: float | None, now: float, delivery: Delivery
    ) -> "Alert":
        """Build the alert for a budget threshold crossing."""
        day = crossing.period_start.date().isoformat()
        spent = "" if spent_fraction is None else f" ({spent_fraction:.0%} spent)"
        return cls(
            id=f"budget_threshold:{crossing.budget_id}:{crossing.period_start.isoformat()}:{crossing.threshold:g}",
            budget_id=crossing.budget_id, threshold=crossing.threshold, period_start=crossing.period_start,
            spent_fraction=spent_fraction, created_at=now, delivery=delivery,
            message=f"raygate: budget '{crossing.budget_id}' reached {crossing.threshold:.0%} of its limit "
                    f"for the period starting {day}{spent}.",
        )

    @classmethod
    def for_flood(cls, key_id: str, created_at: float, until: float, *, delivery: Delivery) -> "Alert":
        """Build the alert for a key the Guard blocked for a flood."""
        ends = datetime.fromtimestamp(until).isoformat(timespec="seconds")
        return cls(id=f"flood_block:{key_id}:{created_at!r}", kind="flood_block", key_id=key_id,
                   created_at=created_at, delivery=delivery,
                   message=f"raygate: key {key_id} sent a burst far above its usual rate and is blocked until {ends}.")

    @classmethod
    def for_anomaly(cls, anomaly: Anomaly, *, now: float, delivery: Delivery) -> "Alert":
        """Build the alert for a key whose last minute stood out from its own history."""
        action = " It is blocked." if anomaly.blocked else ""
        return cls(id=f"anomaly:{anomaly.key_id}:{anomaly.minute_start!r}", kind="anomaly", key_id=anomaly.key_id,
                   created_at=now, delivery=delivery,
                   message=f"raygate: key {anomaly.key_id} made {anomaly.requests} requests in a minute, against "
                           f"{anomaly.mean:.1f} usually (z-score {anomaly.z_score:.1f}).{action}")


class AlertStore:
    """Alerts in Redis: recorded once each, listed newest first, capped at ``keep_last``.

    Args:
        redis: client (``serve_app.stores.redis_client``), shared with the caller.
        key_prefix: namespace of the keys (tests use one per test).
        keep_last: how many alerts are kept. An alert dropped from the cap is forgotten, so
            the same crossing reported again after ``keep_last`` newer alerts would be stored anew.
    """

    def __init__(self, redis: aioredis.Redis, *, key_prefix: str = "raygate:{alerts}", keep_last: int = 1000) -> None:
        self.redis, self.key_prefix = redis, key_prefix
        self._hash, self._order = f"{key_prefix}:alerts", f"{key_prefix}:order"
        self._keep_last = keep_last
        self._record = redis.register_script(_RECORD_LUA)
        self._update = redis.register_script(_UPDATE_LUA)

    async def record(self, alert: Alert) -> bool:
        """Store an alert unless one with its id exists.

        Returns:
            True when the alert is new (the caller should send it), False when it was known.
        """
        async with map_redis_errors("alert record"):
            created = await self._record(
                keys=[self._hash, self._order],
                args=[alert.id, alert.model_dump_json(), repr(alert.created_at), self._keep_last],
            )
        if int(created):
            logger.info("Alert %s recorded", alert.id)
        return bool(int(created))

    async def update(self, alert: Alert) -> bool:
        """Rewrite a stored alert (delivery state); False when it is no longer stored."""
        async with map_redis_errors("alert update"):
            return bool(int(await self._update(keys=[self._hash], args=[alert.id, alert.model_dump_json()])))

    async def get(self, alert_id: str) -> Alert | None:
        """Return one alert, or None."""
        async with map_redis_errors("alert get"):
            raw = await self.redis.hget(self._hash, alert_id)
        return None if raw is None else Alert.model_validate_json(raw)

    async def list(self, limit: int = 50) -> builtins.list[Alert]:
        """Return up to ``limit`` alerts, newest first."""
        if limit < 1:
            return []
        async with map_redis_errors("alert list"):
            ids = cast("builtins.list[str]", await self.redis.zrevrange(self._order, 0, limit - 1))
            raws = await self.redis.hmget(self._hash, ids) if ids else []
        return [Alert.model_validate_json(raw) for raw in raws if raw is not None]


class WebhookSender:
    """POSTs alerts as JSON to the configured URL in background tasks, with retries.

    A 2xx answer delivers the alert. Timeouts, connection errors, 408, 425, 429 and
    5xx are retried after ``backoff_s``, doubling up to ``max_backoff_s``, until
    ``max_attempts``; another status fails the alert at once (the receiver refuses it).
    The body is the alert's fields plus ``text`` (its message, which Slack-style
    webhooks display); the ``x-raygate-alert-id`` header lets a receiver drop duplicates.

    Args:
        config: the alerts config; ``webhook_url`` must be set.
        store: where delivery state is written.
    """

    def __init__(self, config: AlertsConfig, store: AlertStore) -> None:
        if config.webhook_url is None:
            raise ValueError("WebhookSender needs alerts.webhook_url")
        self.config = config
        self.url: str = config.webhook_url
        self.store = store
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[Alert]] = {}

    def submit(self, alert: Alert) -> asyncio.Task[Alert]:
        """Start sending an alert in the background; an alert already being sent is not sent twice.

        Returns:
            The sending task; it ends with the alert's final delivery state and never raises.
        """
        key = f"{alert.id}:{alert.state}"  # a resolution is sent even while its firing is
        task = self._tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self.deliver(alert))
            self._tasks[key] = task
            task.add_done_callback(lambda _: self._tasks.pop(key, None))
        return task

    async def deliver(self, alert: Alert) -> Alert:
        """Send one alert now, retrying as configured, and store the outcome.

        Returns:
            The alert with ``delivery`` set to 'delivered' or 'failed'.
        """
        alert = alert.model_copy(update={"delivery": "pending"})
        for attempt in range(1, self.config.max_attempts + 1):
            error, retryable = await self._post(alert)
            alert.delivery_attempts, alert.last_error = attempt, error
            if error is None:
                alert.delivery = "delivered"
                logger.info("Alert %s delivered after %d attempt(s)", alert.id, attempt)
                break
            if not retryable or attempt == self.config.max_attempts:
                alert.delivery = "failed"
                logger.warning("Alert %s not delivered after %d attempt(s): %s", alert.id, attempt, error)
                break
            await self._save(alert)
            await asyncio.sleep(min(self.config.backoff_s * 2 ** (attempt - 1), self.config.max_backoff_s))
        await self._save(alert)
        return alert

    async def drain(self, timeout_s: float) -> None:
        """Wait up to ``timeout_s`` for the alerts being sent, then cancel the rest."""
        tasks = list(self._tasks.values())
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning("%d alert(s) still unsent at shutdown stay pending", len(pending))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Finish (or give up on) in-flight alerts and close the HTTP session."""
        await self.drain(timeout_s)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(self, alert: Alert) -> tuple[str | None, bool]:
        """POST once; return (error or None, whether the error is worth a retry)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.webhook_timeout_s))
        fields = _COMMON_FIELDS | _KIND_FIELDS[alert.kind]
        body = {"text": alert.message, **alert.model_dump(mode="json", include=fields)}
        try:
            async with self._session.post(
                self.url, data=orjson.dumps(body),
                headers={"content-type": "application/json", "x-raygate-alert-id": alert.id},
            ) as response:
                if 200 <= response.status < 300:
                    return None, False
                return f"HTTP {response.status}", response.status in _RETRYABLE_STATUSES or response.status >= 500
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__, True

    async def _save(self, alert: Alert) -> None:
        try:
            await self.store.update(alert)
        except RaygateError:
            logger.warning("Could not store the delivery state of alert %s", alert.id)


class Alerter:
    """What the Gateway holds: turns CostGuard's threshold crossings into stored, sent alerts.

    Args:
        config: the alerts config.
        redis: client shared with the caller.
        budget_status: CostGuard's ``budget_status`` (embedded method or handle call), read
            to put the spent fraction in each alert; None leaves it out.
        key_prefix: namespace of the store's keys.
    """

    def __init__(
        self,
        config: AlertsConfig,
        redis: aioredis.Redis,
        *,
        budget_status: Callable[[], Awaitable[builtins.list[BudgetStatus]]] | None = None,
        key_prefix: str = "raygate:{alerts}",
    ) -> None:
        self.store = AlertStore(redis, key_prefix=key_prefix, keep_last=config.keep_last)
        self.sender = WebhookSender(config, self.store) if config.webhook_url else None
        self._budget_status = budget_status
        self._tasks: set[asyncio.Task[list[Alert]]] = set()

    def notify(self, crossings: list[ThresholdCrossing]) -> asyncio.Task[list[Alert]] | None:
        """Record and send alerts for these crossings in the background; returns at once.

        Returns:
            None without crossings, else the task, which ends once the new alerts are sent
            (or given up on) with their final state, and never raises.
        """
        if not crossings:
            return None
        return self._spawn(self._notify(crossings))

    async def close(self, timeout_s: float = 5.0) -> None:
        """Give in-flight alerts up to ``timeout_s`` to be recorded and sent, then stop."""
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
        if self.sender is not None:
            await self.sender.close(timeout_s=0)

    @property
    def delivery(self) -> Delivery:
        """The state a new alert starts in."""
        return "pending" if self.sender else "unsent"

    def emit(self, alerts: builtins.list[Alert]) -> asyncio.Task[builtins.list[Alert]] | None:
        """Record and send ready-made alerts (flood, anomaly) in the background; returns at once."""
        if not alerts:
            return None
        return self._spawn(self._emit(alerts))

    def _spawn(self, work: Awaitable[builtins.list[Alert]]) -> asyncio.Task[builtins.list[Alert]]:
        task = asyncio.get_running_loop().create_task(work)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _notify(self, crossings: list[ThresholdCrossing]) -> list[Alert]:
        fractions = await self._fractions()
        now = time.time()
        return await self._emit([
            Alert.from_crossing(c, spent_fraction=fractions.get((c.budget_id, c.period_start)), now=now,
                                delivery=self.delivery) for c in crossings])

    async def _emit(self, alerts: builtins.list[Alert]) -> builtins.list[Alert]:
        new, sends = [], []
        for alert in alerts:
            try:
                created = await self.store.record(alert)
            except RaygateError:
                # Only this replica heard of the crossing: sending beats losing it, even unrecorded.
                logger.warning("Alert %s could not be recorded; sending it anyway", alert.id)
                created = True
            if created:
                new.append(alert)
                if self.sender is not None:
                    sends.append(self.sender.submit(alert))
        return [*await asyncio.gather(*sends)] if sends else new

    async def _fractions(self) -> dict[tuple[str, datetime], float]:
        if self._budget_status is None:
            return {}
        try:
            statuses = await self._budget_status()
        except Exception:  # noqa: BLE001 - the alert matters more than its spent fraction
            logger.warning("Budget status unavailable; alerts go out without the spent fraction")
            return {}
        return {(s.id, s.period_start): s.spent_fraction for s in statuses}
