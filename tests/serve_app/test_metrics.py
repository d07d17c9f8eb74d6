"""GatewayMetrics: counters are summed locally and handed to Ray once per series per flush."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from serve_app.metrics import FLUSH_S, METRICS, GatewayMetrics


class Recorder:
    """Stands in for a Ray metric: records each call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict[str, str] | None]] = []

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("inc", value, tags))

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("observe", value, tags))


def recording() -> tuple[GatewayMetrics, dict[str, Any]]:
    metrics = GatewayMetrics()
    metrics._metrics = made = {name: Recorder() for name in METRICS}
    return metrics, made


async def test_counters_reach_ray_summed_within_the_flush_interval() -> None:
    metrics, made = recording()
    for _ in range(100):
        metrics.inc("raygate_tokens", 3, model="m", kind="prompt")
        metrics.inc("raygate_tokens", 2, model="m", kind="completion")
        metrics.inc("raygate_cache_evictions")
        metrics.inc("raygate_retries", 0, model="m")  # nothing to add: no series
    metrics.observe_value("raygate_request_latency_seconds", 0.5, model="m")  # histograms go at once
    assert made["raygate_tokens"].calls == [] and len(made["raygate_request_latency_seconds"].calls) == 1
    deadline = time.monotonic() + FLUSH_S + 5
    while not made["raygate_tokens"].calls:
        assert time.monotonic() < deadline, "the counters were never flushed"
        await asyncio.sleep(0.05)
    assert sorted(made["raygate_tokens"].calls, key=str) == [("inc", 200.0, {"model": "m", "kind": "completion"}),
                                                            ("inc", 300.0, {"model": "m", "kind": "prompt"})]
    assert made["raygate_cache_evictions"].calls == [("inc", 100.0, None)]
    assert made["raygate_retries"].calls == []


async def test_flush_hands_over_at_once_and_outside_a_loop() -> None:
    metrics, made = recording()
    metrics.inc("raygate_fallbacks", model="m")
    metrics.flush()  # what the replica's shutdown does
    assert made["raygate_fallbacks"].calls == [("inc", 1.0, {"model": "m"})]
    await asyncio.to_thread(metrics.inc, "raygate_fallbacks", model="m")  # a thread without a loop
    assert len(made["raygate_fallbacks"].calls) == 2
