"""The overview's numbers are the ledger's: totals, percentiles, errors, cache hit rate, spend."""

from __future__ import annotations

from pathlib import Path

from deployments.ledger import Ledger, RequestRecord
from serve_app.config import LedgerConfig


def row(i: int, **fields: object) -> RequestRecord:
    base = {"id": f"r{i}", "created_at": 1000.0 + i, "tenant": "acme", "user": "ann", "key_id": "k",
            "requested_model": "m", "model": "m", "latency_ms": float(i + 1), "cost_usd": 0.01,
            "prompt_tokens": 10, "completion_tokens": 5}
    return RequestRecord(**{**base, **fields})


async def test_overview_equals_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    rows = [row(i) for i in range(100)]
    rows[0] = row(0, status=429, error_code="rate_limit_exceeded", cost_usd=0.0)
    rows[1] = row(1, status=503, error_code="upstream_unavailable", cost_usd=0.0)
    rows[2] = row(2, cache_status="hit", saved_usd=0.5, cost_usd=0.0)
    rows[3] = row(3, cache_status="miss")
    rows[4] = row(4, cache_status="bypass")
    rows[5] = row(5, model="big", tenant="globex", user="bob", cost_usd=1.0)
    await ledger.record(rows + [row(999, created_at=5000.0)])  # outside the window
    o = await ledger.store("overview.summary", 1000.0, 1100.0)
    assert (o["requests"], o["errors"], o["error_rate"]) == (100, 2, 0.02)
    assert o["requests_per_minute"] == 60.0
    assert o["latency_ms"] == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert {(e["status"], e["code"]) for e in o["errors_by_type"]} == {(429, "rate_limit_exceeded"),
                                                                         (503, "upstream_unavailable")}
    assert o["cache"] == {"results": {"hit": 1, "miss": 1, "bypass": 1}, "hit_rate": 0.5, "saved_usd": 0.5}
    assert round(o["cost_usd"], 6) == round(0.01 * 96 + 1.0, 6)  # 96 rows at 0.01, one at 1.0
    assert o["cost_by_model"][0] == {"model": "big", "requests": 1, "cost_usd": 1.0}
    assert o["cost_by_tenant"][0]["tenant"] == "globex" and o["cost_by_user"][0]["user"] == "bob"
    assert (o["prompt_tokens"], o["completion_tokens"]) == (1000, 500)


async def test_series_buckets_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    rows = [row(i) for i in range(100)]  # one a second from t=1000, latency i+1 ms
    rows[10] = row(10, status=500, error_code="upstream_error", cost_usd=0.0)
    rows[70] = row(70, cache_status="hit", cost_usd=0.0)
    rows[71] = row(71, cache_status="miss")
    await ledger.record(rows)
    s = await ledger.store("overview.series", 1000.0, 1180.0, 60.0)
    points = s["points"]
    assert [p["t"] for p in points] == [1000.0, 1060.0, 1120.0]
    assert [p["requests"] for p in points] == [60, 40, 0] and [p["errors"] for p in points] == [1, 0, 0]
    assert round(points[0]["cost_usd"], 6) == 0.59 and round(points[1]["cost_usd"], 6) == 0.39
    assert points[0]["p50"] == 30.5 and points[1]["p99"] == 99.61
    assert (points[0]["cache_hit_rate"], points[1]["cache_hit_rate"]) == (None, 0.5)
    assert (points[2]["p95"], points[2]["cache_hit_rate"]) == (None, None)
