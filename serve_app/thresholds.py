"""Threshold alerts: rules from config (error rate, p95 latency, cost per request, budget) checked periodically.

Each rule names a metric measured over a trailing window (the ledger's overview
summary, or CostGuard's budget status) and a limit. When the value goes above the
limit the rule *fires*: an alert is stored (``AlertStore``) and sent to the webhook.
While it keeps firing nothing more is sent; once the value is back at or under the
limit the same alert is marked *resolved* and the webhook hears that too.

Which rules are firing lives in one Redis hash beside the alerts, so every Gateway
replica agrees and a restarted replica resolves what an earlier one fired. One
replica evaluates at a time (the periodic work's Redis lock, ``serve_app.watch``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from deployments.cost_guard_protocol import BudgetStatus
from serve_app.alerts import Alert, Alerter
from serve_app.alerts_config import AlertRule
from serve_app.stores import map_redis_errors

logger = logging.getLogger(__name__)

__all__ = ["ThresholdEvaluator"]

_TRAFFIC_METRICS = {"error_rate", "latency_p95_ms", "cost_per_request_usd"}
_UNITS = {"error_rate": "{:.1%}", "latency_p95_ms": "{:.0f} ms", "cost_per_request_usd": "${:.6f}",
          "budget_spent_fraction": "{:.0%}"}


def _format(metric: str, value: float) -> str:
    return _UNITS[metric].format(value)


class ThresholdEvaluator:
    """Measures every rule, fires the ones above their limit and resolves the ones back under it.

    Args:
        rules: the configured rules.
        alerter: stores and sends the alerts.
        summary: the ledger's overview summary over ``(from_ts, to_ts)``.
        budget_status: CostGuard's budget status.
    """

    def __init__(self, rules: list[AlertRule], alerter: Alerter,
                 summary: Callable[[float, float], Awaitable[dict[str, Any]]],
                 budget_status: Callable[[], Awaitable[list[BudgetStatus]]]) -> None:
        self.rules = rules
        self.alerter = alerter
        self._summary, self._budget_status = summary, budget_status
        self._firing_key = f"{alerter.store.key_prefix}:firing"

    async def evaluate(self, now: float | None = None) -> list[Alert]:
        """Check every rule once.

        Returns:
            The alerts fired or resolved by this evaluation, after their webhook delivery.
        """
        if not self.rules:
            return []
        now = time.time() if now is None else now
        values = await self.measure(now)
        async with map_redis_errors("alert rules"):
            firing: dict[str, str] = await self.alerter.store.redis.hgetall(self._firing_key)
        changed = []
        for rule in self.rules:
            value = values[rule.name]
            if value is not None and value > rule.above and rule.name not in firing:
                changed.append(await self._fire(rule, value, now))
            elif (value is None or value <= rule.above) and rule.name in firing:
                changed.append(await self._resolve(rule, firing[rule.name], value, now))
        return [alert for alert in changed if alert is not None]

    async def measure(self, now: float) -> dict[str, float | None]:
        """Each rule's current value; None when there is too little traffic (or no budget) to judge."""
        summaries: dict[int, dict[str, Any]] = {}
        budgets: list[BudgetStatus] | None = None
        values: dict[str, float | None] = {}
        for rule in self.rules:
            if rule.metric in _TRAFFIC_METRICS:
                if rule.window_s not in summaries:
                    summaries[rule.window_s] = await self._summary(now - rule.window_s, now)
                values[rule.name] = self._traffic_value(rule, summaries[rule.window_s])
            else:
                budgets = await self._budget_status() if budgets is None else budgets
                fractions = [b.spent_fraction for b in budgets if rule.budget_id in (None, b.id)]
                values[rule.name] = max(fractions) if fractions else None
        return values

    @staticmethod
    def _traffic_value(rule: AlertRule, summary: dict[str, Any]) -> float | None:
        requests = summary["requests"]
        if requests == 0 or requests < rule.min_requests:
            return None
        if rule.metric == "error_rate":
            return float(summary["error_rate"])
        if rule.metric == "latency_p95_ms":
            return float(summary["latency_ms"]["p95"])
        return float(summary["cost_usd"]) / requests

    async def _fire(self, rule: AlertRule, value: float, now: float) -> Alert | None:
        alert = Alert(
            id=f"threshold:{rule.name}:{now!r}", kind="threshold", rule=rule.name, metric=rule.metric,
            value=value, limit=rule.above, state="firing", created_at=now, delivery=self.alerter.delivery,
            message=f"raygate: {rule.metric} is {_format(rule.metric, value)}, above "
                    f"{_format(rule.metric, rule.above)} (rule '{rule.name}').")
        async with map_redis_errors("alert rules"):
            if not await self.alerter.store.redis.hsetnx(self._firing_key, rule.name, alert.id):
                return None  # another evaluation fired it first
        task = self.alerter.emit([alert])
        sent = await task if task is not None else []
        logger.info("Alert rule %s fired", rule.name)
        return sent[0] if sent else alert

    async def _resolve(self, rule: AlertRule, alert_id: str, value: float | None, now: float) -> Alert | None:
        async with map_redis_errors("alert rules"):
            if not await self.alerter.store.redis.hdel(self._firing_key, rule.name):
                return None  # another evaluation resolved it first
        alert = await self.alerter.store.get(alert_id)
        if alert is None:  # trimmed from the store: nothing left to update
            return None
        now_text = "too little traffic to judge" if value is None else _format(rule.metric, value)
        alert = alert.model_copy(update={
            "state": "resolved", "resolved_at": now, "value": value, "delivery": self.alerter.delivery,
            "message": f"raygate: resolved: {rule.metric} is back to {now_text} (rule '{rule.name}', limit "
                       f"{_format(rule.metric, rule.above)})."})
        await self.alerter.store.update(alert)
        logger.info("Alert rule %s resolved", rule.name)
        if self.alerter.sender is None:
            return alert
        return await self.alerter.sender.submit(alert)
