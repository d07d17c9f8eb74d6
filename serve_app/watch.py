"""Periodic work, and flood alerts: the Guard's findings as alerts, alert rules, experiments' promotion.

Every Gateway replica runs an ``AnomalyWatcher``, but a Redis lock per interval lets one
of them do the work; alert ids name the key and the minute (or the rule and the time it
fired), so the alert store records (and the webhook receives) each finding once
whichever replica reports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from deployments.guard_protocol import GuardDecision
from serve_app.alerts import Alert, Alerter
from serve_app.auth import APIKey
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.handles import call
from serve_app.placement import Placed

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

logger = logging.getLogger(__name__)


def flood_alert(alerter: Alerter, key: APIKey, decision: GuardDecision) -> None:
    """Alert on the request that got its key blocked for a flood (the Guard reports it once)."""
    if decision.reason == "flood" and decision.blocked_until is not None:
        alerter.emit([Alert.for_flood(key.key_id, decision.checked_at, decision.blocked_until,
                                      delivery=alerter.delivery)])


def periodic_work(gateway: "Gateway") -> list[Callable[[], Awaitable[object]]]:
    """The Gateway's work for each interval besides the anomaly scan: experiments' promotion, budget
    gauges, alert rules (its attributes are read when the work runs, after the Gateway is built)."""

    async def promote_experiments() -> None:
        """Evaluate running experiments set to promote (the Ledger completes one with a significant winner)."""
        for experiment in await gateway.experiments.live():
            if experiment.status == "running" and experiment.promote:
                result = await call(gateway.ledger.store.remote("experiments.evaluate", experiment.id),
                                    LEDGER_CALL_TIMEOUT_S, "Ledger")
                if result.get("promoted"):
                    gateway.experiments.forget()

    async def budget_gauges() -> None:
        """What is left of each USD budget, as gauges."""
        for budget in await gateway.spend.cost_guard("budget_status"):
            if budget.limit_usd is not None:
                left = max(budget.limit_usd - budget.used_usd - budget.reserved_usd, 0.0)
                gateway.metrics.set("raygate_budget_remaining_usd", left, budget=budget.id)

    async def alert_rules() -> None:
        await gateway.thresholds.evaluate()

    return [promote_experiments, budget_gauges, alert_rules]


class AnomalyWatcher:
    """Scores every active key's last minute (``Guard.anomalies``) and alerts on the outliers, then runs ``also``.

    Args:
        guard: the Guard, placed; None skips the anomaly scan (anomalies off) but not ``also``.
        alerter: where alerts go.
        redis: for the once-a-minute lock.
        interval_s: how often to look; 0 turns the watcher off.
        lock_key: the lock's name (tests use their own).
        also: more work for the replica that holds the interval's lock (alert rules, promotion, gauges).
    """

    def __init__(self, guard: Placed | None, alerter: Alerter, redis: aioredis.Redis, interval_s: float,
                 lock_key: str = "raygate:guard:anomaly-scan",
                 also: list[Callable[[], Awaitable[object]]] | None = None) -> None:
        self.guard, self.alerter, self.redis = guard, alerter, redis
        self.also = also or []
        self.interval_s = interval_s
        self.lock_key = lock_key
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background loop once (called from a request, so a loop is running)."""
        if self._task is None and self.interval_s > 0:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def scan_once(self, now: float | None = None) -> list[Alert]:
        """Do this interval's work if no other replica has: the other tasks, then score the last full minute."""
        now = time.time() if now is None else now
        interval = max(self.interval_s, 1.0)
        slot = int(now // interval)
        if not await self.redis.set(f"{self.lock_key}:{slot}", "1", nx=True, ex=max(int(2 * interval), 2)):
            return []
        for work in self.also:
            try:
                await work()
            except Exception as exc:  # noqa: BLE001 - one failing task must not stop the scan
                logger.warning("Periodic task failed: %s", type(exc).__name__)
        if self.guard is None:
            return []
        anomalies = await self.guard("anomalies", now)
        alerts = [Alert.for_anomaly(a, now=now, delivery=self.alerter.delivery) for a in anomalies]
        task = self.alerter.emit(alerts)
        return await task if task is not None else []

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.scan_once()
            except Exception as exc:  # noqa: BLE001 - Redis or the Guard down: the next minute tries again
                logger.warning("Anomaly scan failed: %s", type(exc).__name__)
