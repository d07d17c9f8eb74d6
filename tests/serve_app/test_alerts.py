"""Budget alerts against a real Valkey and a real local webhook receiver (``serve_app.alerts``).

Every test has its own key prefix. Waits are awaits on the tasks the code hands back
(``Alerter.notify``, ``WebhookSender.submit``), each bounded by ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

import serve_app.alerts
from deployments.cost_guard_protocol import BudgetStatus, ThresholdCrossing
from serve_app.alerts import Alert, Alerter, AlertsConfig, AlertStore, WebhookSender
from tests.serve_app.conftest import Receiver

DEADLINE_S = 10.0
PERIOD = datetime(2025, 1, 15, tzinfo=timezone.utc)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:{{alerts}}"


def crossing(budget: str = "daily", threshold: float = 0.8, period: datetime = PERIOD) -> ThresholdCrossing:
    return ThresholdCrossing(budget_id=budget, threshold=threshold, period_start=period)


def alert(budget: str = "daily", threshold: float = 0.8, created_at: float = 1000.0) -> Alert:
    return Alert.from_crossing(crossing(budget, threshold), spent_fraction=None, now=created_at, delivery="pending")


def config(url: str | None, **kwargs: Any) -> AlertsConfig:
    return AlertsConfig(webhook_url=url, backoff_s=0.0, **kwargs)


async def done(task: asyncio.Task[Any] | None) -> Any:
    assert task is not None
    return await asyncio.wait_for(task, DEADLINE_S)


def test_exported_members() -> None:
    assert sorted(serve_app.alerts.__all__) == ["Alert", "AlertStore", "Alerter", "AlertsConfig", "WebhookSender"]


def test_config_refuses_bad_urls_and_unknown_keys() -> None:
    assert AlertsConfig().webhook_url is None
    with pytest.raises(ValidationError, match="http"):
        AlertsConfig(webhook_url="ftp://example.com/hook")
    with pytest.raises(ValidationError):
        AlertsConfig.model_validate({"webhook": "http://x"})


# -- store -------------------------------------------------------------------------------------


async def test_alert_is_stored_once_per_crossing(redis: aioredis.Redis, prefix: str) -> None:
    store = AlertStore(redis, key_prefix=prefix)
    assert await store.record(alert(created_at=1000.0))
    assert not await store.record(alert(created_at=2000.0))  # the same crossing reported again
    assert await store.record(alert(threshold=1.0, created_at=1500.0))
    assert await store.record(alert(budget="weekly", created_at=1200.0))
    listed = await store.list(10)
    assert [(a.budget_id, a.threshold, a.created_at) for a in listed] == [
        ("daily", 1.0, 1500.0), ("weekly", 0.8, 1200.0), ("daily", 0.8, 1000.0),
    ]
    assert listed[2].id == "budget_threshold:daily:2025-01-15T00:00:00+00:00:0.8"
    assert [a.budget_id for a in await store.list(1)] == ["daily"]


async def test_store_keeps_the_last_alerts(redis: aioredis.Redis, prefix: str) -> None:
    store = AlertStore(redis, key_prefix=prefix, keep_last=3)
    for i in range(5):
        assert await store.record(alert(budget=f"b{i}", created_at=1000.0 + i))
    assert [a.budget_id for a in await store.list(10)] == ["b4", "b3", "b2"]
    assert await store.get(alert(budget="b0").id) is None
    assert await redis.zcard(f"{prefix}:order") == 3 and await redis.hlen(f"{prefix}:alerts") == 3


async def test_alerter_without_webhook_records_in_the_background(redis: aioredis.Redis, prefix: str) -> None:
    async def budget_status() -> list[BudgetStatus]:
        return [BudgetStatus(
            id="daily", scope="global", scope_value=None, period="day", period_start=PERIOD, resets_at=PERIOD,
            used_tokens=0, reserved_tokens=0, limit_tokens=None, used_usd=8.5, reserved_usd=0.0, limit_usd=10.0,
            spent_fraction=0.85,
        )]

    alerter = Alerter(config(None), redis, budget_status=budget_status, key_prefix=prefix)
    assert alerter.sender is None and alerter.notify([]) is None
    task = alerter.notify([crossing(), crossing(), crossing(budget="other")])
    assert task is not None and not task.done()  # notify returns before any Redis work
    new = await done(task)
    assert [(a.budget_id, a.delivery, a.spent_fraction) for a in new] == [("daily", "unsent", 0.85),
                                                                          ("other", "unsent", None)]
    assert "85% spent" in new[0].message
    assert await done(alerter.notify([crossing()])) == []
    assert len(await alerter.store.list()) == 2
    await alerter.close()


# -- webhook -----------------------------------------------------------------------------------


async def test_webhook_receives_the_alert_json(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    alerter = Alerter(config(receiver.url), redis, key_prefix=prefix)
    [sent] = await done(alerter.notify([crossing()]))
    assert sent.delivery == "delivered" and sent.delivered and sent.delivery_attempts == 1
    [(headers, body)] = receiver.posts
    assert headers["x-raygate-alert-id"] == sent.id
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "text": "raygate: budget 'daily' reached 80% of its limit for the period starting 2025-01-15.",
        "id": sent.id, "kind": "budget_threshold", "budget_id": "daily", "threshold": 0.8,
        "period_start": "2025-01-15T00:00:00Z", "spent_fraction": None, "created_at": sent.created_at,
        "message": "raygate: budget 'daily' reached 80% of its limit for the period starting 2025-01-15.",
    }
    stored = await alerter.store.get(sent.id)
    assert stored is not None and stored.delivered and stored.model_dump()["delivered"] is True
    assert await done(alerter.notify([crossing()])) == []  # known: not sent again
    assert len(receiver.posts) == 1
    await alerter.close()


async def test_webhook_retries_server_errors(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    receiver.statuses = [500, 500, 200]
    alerter = Alerter(config(receiver.url, max_attempts=5), redis, key_prefix=prefix)
    [sent] = await done(alerter.notify([crossing()]))
    assert len(receiver.posts) == 3
    assert (sent.delivery, sent.delivery_attempts, sent.last_error) == ("delivered", 3, None)
    assert {p[0]["x-raygate-alert-id"] for p in receiver.posts} == {sent.id}
    stored = await alerter.store.get(sent.id)
    assert stored is not None and (stored.delivery, stored.delivery_attempts) == ("delivered", 3)
    await alerter.close()


async def test_webhook_gives_up_after_max_attempts(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    receiver.statuses = [503] * 10
    store = AlertStore(redis, key_prefix=prefix)
    sender = WebhookSender(AlertsConfig(webhook_url=receiver.url, max_attempts=3, backoff_s=0.001), store)
    assert await store.record(alert())
    task = sender.submit(alert())
    assert sender.submit(alert()) is task  # an alert in flight is not sent twice
    failed = await done(task)
    assert len(receiver.posts) == 3
    assert (failed.delivery, failed.delivery_attempts, failed.last_error) == ("failed", 3, "HTTP 503")
    stored = await store.get(failed.id)
    assert stored is not None and stored.delivery == "failed" and not stored.delivered
    await sender.close()


async def test_webhook_does_not_retry_a_refusal(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    receiver.statuses = [400]
    sender = WebhookSender(config(receiver.url), AlertStore(redis, key_prefix=prefix))
    failed = await done(sender.submit(alert()))
    assert (failed.delivery, failed.delivery_attempts, failed.last_error) == ("failed", 1, "HTTP 400")
    assert len(receiver.posts) == 1
    await sender.close()


async def test_webhook_retries_timeouts(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    receiver.statuses = [0, 200]  # the first POST hangs past the timeout
    sender = WebhookSender(config(receiver.url, webhook_timeout_s=0.2), AlertStore(redis, key_prefix=prefix))
    sent = await done(sender.submit(alert()))
    assert (sent.delivery, sent.delivery_attempts) == ("delivered", 2)
    assert len(receiver.posts) == 2
    await sender.close()


async def test_webhook_unreachable_fails_after_retries(redis: aioredis.Redis, prefix: str) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = WebhookSender(config(f"http://127.0.0.1:{port}/hook", max_attempts=2), AlertStore(redis, key_prefix=prefix))
    failed = await done(sender.submit(alert()))
    assert (failed.delivery, failed.delivery_attempts) == ("failed", 2)
    assert failed.last_error is not None and "Connect" in failed.last_error
    await sender.close()


async def test_close_waits_for_alerts_in_flight(redis: aioredis.Redis, prefix: str, receiver: Receiver) -> None:
    receiver.statuses = [500, 200]
    alerter = Alerter(config(receiver.url), redis, key_prefix=prefix)
    task = alerter.notify([crossing()])
    await alerter.close(timeout_s=DEADLINE_S)
    assert task is not None and task.done()
    assert [a.delivery for a in task.result()] == ["delivered"]
