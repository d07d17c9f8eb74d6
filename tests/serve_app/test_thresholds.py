"""Alert rules fire above their threshold and resolve when the condition clears (real Valkey, real webhook).

The evaluator reads the ledger's overview summary and CostGuard's budget status through
two callables; here they return what each test sets, so the thresholds' edges are exact.
(The real ledger summary is tested in tests/deployments/test_overview.py, the wiring in
tests/integration/test_metrics.py.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from deployments.cost_guard_protocol import BudgetStatus
from serve_app.alerts import Alerter
from serve_app.alerts_config import AlertRule, AlertsConfig
from serve_app.thresholds import ThresholdEvaluator
from serve_app.watch import AnomalyWatcher
from tests.serve_app.conftest import Receiver

NOW = 1_800_000_000.0
RULES = [
    {"name": "errors", "metric": "error_rate", "above": 0.05, "min_requests": 20},
    {"name": "slow", "metric": "latency_p95_ms", "above": 2000, "window_s": 60},
    {"name": "pricey", "metric": "cost_per_request_usd", "above": 0.01},
    {"name": "budget", "metric": "budget_spent_fraction", "above": 0.9, "budget_id": "daily"},
]


class Inputs:
    """What the ledger and CostGuard report; tests change it between evaluations."""

    def __init__(self) -> None:
        self.requests, self.errors, self.p95_ms, self.cost_usd = 100, 0, 300.0, 0.1
        self.spent = {"daily": 0.5, "monthly": 0.99}
        self.windows: list[float] = []

    async def summary(self, from_ts: float, to_ts: float) -> dict[str, Any]:
        self.windows.append(to_ts - from_ts)
        return {"requests": self.requests, "error_rate": self.errors / self.requests if self.requests else 0.0,
                "latency_ms": {"p95": self.p95_ms}, "cost_usd": self.cost_usd}

    async def budgets(self) -> list[BudgetStatus]:
        start = datetime(2027, 1, 15, tzinfo=timezone.utc)
        return [BudgetStatus(id=b, scope="global", scope_value=None, period="day", period_start=start,
                             resets_at=start, used_tokens=0, reserved_tokens=0, limit_tokens=None, used_usd=f,
                             reserved_usd=0.0, limit_usd=1.0, spent_fraction=f) for b, f in self.spent.items()]


@pytest.fixture
async def setup(redis: aioredis.Redis, receiver: Receiver) -> AsyncIterator[tuple[ThresholdEvaluator, Inputs]]:
    config = AlertsConfig(webhook_url=receiver.url, backoff_s=0.0, rules=RULES)
    alerter = Alerter(config, redis, key_prefix=f"test-{uuid.uuid4().hex[:12]}:{{alerts}}")
    inputs = Inputs()
    yield ThresholdEvaluator(config.rules, alerter, inputs.summary, inputs.budgets), inputs
    await alerter.close()


def states(alerts: list[Any]) -> list[tuple[str, str, str]]:
    return sorted((a.rule, a.state, a.delivery) for a in alerts)


def test_rules_are_validated() -> None:
    with pytest.raises(ValidationError, match="unique"):
        AlertsConfig(rules=[RULES[0], RULES[0]])
    with pytest.raises(ValidationError):
        AlertRule(name="x", metric="queue_depth", above=1)
    with pytest.raises(ValidationError):
        AlertRule(name="bad name", metric="error_rate", above=1)


async def test_nothing_fires_under_the_thresholds(setup: tuple[ThresholdEvaluator, Inputs],
                                                  receiver: Receiver) -> None:
    evaluator, inputs = setup
    assert await evaluator.evaluate(NOW) == []
    assert sorted(set(inputs.windows)) == [60, 300]  # one summary per window, not per rule
    assert receiver.posts == []


async def test_each_metric_fires_once_and_resolves(setup: tuple[ThresholdEvaluator, Inputs],
                                                   receiver: Receiver) -> None:
    evaluator, inputs = setup
    inputs.errors, inputs.p95_ms, inputs.cost_usd, inputs.spent["daily"] = 6, 2500.0, 1.5, 0.95
    fired = await evaluator.evaluate(NOW)
    assert states(fired) == [(r, "firing", "delivered") for r in ("budget", "errors", "pricey", "slow")]
    by_rule = {a.rule: a for a in fired}
    assert by_rule["errors"].value == pytest.approx(0.06) and by_rule["errors"].limit == 0.05
    assert by_rule["pricey"].value == pytest.approx(0.015)
    assert "6.0%, above 5.0%" in by_rule["errors"].message
    assert await evaluator.evaluate(NOW + 60) == []  # still firing: nothing new is sent
    assert len(receiver.posts) == 4

    inputs.errors = 5  # exactly at the threshold: clears
    resolved = await evaluator.evaluate(NOW + 120)
    assert states(resolved) == [("errors", "resolved", "delivered")]
    assert resolved[0].resolved_at == NOW + 120 and resolved[0].id == by_rule["errors"].id
    stored = {a.rule: a for a in await evaluator.alerter.store.list()}
    assert (stored["errors"].state, stored["slow"].state) == ("resolved", "firing")
    headers, body = receiver.posts[-1]
    assert body["state"] == "resolved" and body["rule"] == "errors" and "resolved" in body["text"]
    assert headers["x-raygate-alert-id"] == by_rule["errors"].id

    inputs.errors = 10  # fires again: a new alert, not the resolved one
    again = await evaluator.evaluate(NOW + 180)
    assert states(again) == [("errors", "firing", "delivered")] and again[0].id != by_rule["errors"].id


async def test_too_little_traffic_neither_fires_nor_keeps_firing(setup: tuple[ThresholdEvaluator, Inputs]) -> None:
    evaluator, inputs = setup
    inputs.requests, inputs.errors = 19, 19  # under the rule's min_requests of 20
    assert await evaluator.evaluate(NOW) == []
    assert "errors" not in {a.rule for a in await evaluator.alerter.store.list()}
    inputs.requests, inputs.errors = 40, 20
    assert "errors" in {a.rule for a in await evaluator.evaluate(NOW + 60)}
    inputs.requests = 0
    assert ("errors", "resolved") in {(a.rule, a.state) for a in await evaluator.evaluate(NOW + 120)}


async def test_budget_rule_reads_only_its_budget(setup: tuple[ThresholdEvaluator, Inputs]) -> None:
    evaluator, inputs = setup
    assert inputs.spent["monthly"] > 0.9  # another budget over the limit does not count
    assert await evaluator.evaluate(NOW) == []
    inputs.spent["daily"] = 0.91
    assert [a.rule for a in await evaluator.evaluate(NOW + 60)] == ["budget"]


async def test_two_replicas_fire_a_rule_once(setup: tuple[ThresholdEvaluator, Inputs], receiver: Receiver) -> None:
    evaluator, inputs = setup
    other = ThresholdEvaluator(evaluator.rules, evaluator.alerter, inputs.summary, inputs.budgets)
    inputs.errors = 50
    results = await asyncio.gather(evaluator.evaluate(NOW), other.evaluate(NOW + 1))
    assert sorted(a.rule for r in results for a in r) == ["errors"]
    assert [body["rule"] for _, body in receiver.posts] == ["errors"]


async def test_the_watcher_runs_the_rules_each_interval(setup: tuple[ThresholdEvaluator, Inputs],
                                                        redis: aioredis.Redis) -> None:
    evaluator, inputs = setup
    inputs.errors = 50
    lock = f"test-{uuid.uuid4().hex[:12]}:periodic"
    watcher = AnomalyWatcher(None, evaluator.alerter, redis, 30, lock, also=[evaluator.evaluate])
    assert await watcher.scan_once(NOW) == []  # no Guard: no anomaly scan, but the rules ran
    assert [a.rule for a in await evaluator.alerter.store.list()] == ["errors"]
    assert inputs.windows  # the rules were measured
    count = len(inputs.windows)
    await watcher.scan_once(NOW + 10)  # same 30 s slot: another replica's turn was taken
    assert len(inputs.windows) == count
    await watcher.scan_once(NOW + 31)
    assert len(inputs.windows) > count
