"""Flood blocks and usage anomalies become alerts, once each, whichever replica finds them (real Valkey)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments.guard import Guard
from serve_app.alerts import Alerter, AlertsConfig
from serve_app.placement import Placed
from serve_app.stores import redis_client
from serve_app.watch import AnomalyWatcher, flood_alert
from tests.deployments.test_guard import ANOMALY, FLOOD, NOW, api_key, checks, config, craft


@pytest.fixture
async def parts(valkey_url: str) -> AsyncIterator[dict[str, Any]]:
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    guard = Guard(config(flood=FLOOD, anomaly=ANOMALY), valkey_url, key_prefix=f"{prefix}:guard")
    redis = redis_client(valkey_url)
    alerter = Alerter(AlertsConfig(), redis, key_prefix=f"{prefix}:{{alerts}}")
    yield {"guard": guard, "redis": redis, "alerter": alerter, "prefix": prefix}
    await alerter.close()
    await guard.close()
    await redis.aclose()


async def test_a_flood_block_is_alerted_once(parts: dict[str, Any]) -> None:
    guard, alerter = parts["guard"], parts["alerter"]
    for window in range(30):
        await checks(guard, 2, NOW + 10 * window)
    burst = await checks(guard, 22, NOW + 300)
    for d in burst:
        flood_alert(alerter, api_key(), d)
    assert [d.reason for d in burst][-3:] == ["flood", "blocked", "blocked"]
    await alerter.close()  # waits for the background recording
    alerts = await alerter.store.list()
    assert [(a.kind, a.key_id, a.delivery) for a in alerts] == [("flood_block", "k1", "unsent")]
    assert "blocked until" in alerts[0].message


async def test_anomalies_are_alerted_by_one_replica_per_minute(parts: dict[str, Any]) -> None:
    guard, alerter, redis = parts["guard"], parts["alerter"], parts["redis"]
    scored = NOW + 3600
    await craft(guard, "spiky", [4, 6] * 5, 20, scored)
    await craft(guard, "steady", [4, 6] * 5, 6, scored)
    lock = f"{parts['prefix']}:scan"
    replicas = [AnomalyWatcher(Placed("Guard", guard, remote=False), alerter, redis, 60, lock) for _ in range(2)]
    first = await replicas[0].scan_once(scored + 65)
    assert [(a.kind, a.key_id) for a in first] == [("anomaly", "spiky")]
    assert "20 requests in a minute" in first[0].message
    assert await replicas[1].scan_once(scored + 70) == []  # same minute: the other replica scanned it
    assert [a.kind for a in await alerter.store.list()] == ["anomaly"]
