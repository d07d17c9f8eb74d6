"""``GET /admin/overview`` (admin key): the numbers an operator looks at first, in one answer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query

from serve_app.admin import MAX_TIMESTAMP_S, _ledger
from serve_app.api_routes import component_health
from serve_app.deps import get_gateway, require_admin
from serve_app.errors import InvalidRequestError

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
DEFAULT_WINDOW_S = 86_400
MAX_WINDOW_S = 30 * 86_400
MAX_BUCKETS = 1440
_EXPERIMENT_FIELDS = {"id", "name", "status", "match_model", "traffic", "metric", "winner"}


@router.get("/overview")
async def overview(from_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                   to_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                   gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Totals, throughput, latency p50/p95/p99, errors by type, cache hit rate and spend by model, tenant
    and user (from the ledger, last 24 h by default), budgets, live experiments, component health and
    the latest alerts."""
    to_ts = time.time() if to_ts is None else to_ts
    return await overview_of(gateway, to_ts - DEFAULT_WINDOW_S if from_ts is None else from_ts, to_ts)


@router.get("/overview/series")
async def overview_series(window_s: int = Query(3600, ge=60, le=MAX_WINDOW_S),
                          bucket_s: int = Query(60, ge=10, le=MAX_WINDOW_S),
                          gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The last ``window_s`` in ``bucket_s`` buckets: requests, errors, cost, latency percentiles and cache
    hit rate per bucket (the dashboard's charts)."""
    return await series_of(gateway, window_s, bucket_s)


async def overview_of(gateway: "Gateway", from_ts: float, to_ts: float) -> dict[str, Any]:
    """The overview's body (the route's, and the dashboard's)."""
    traffic = await _ledger(gateway, "store", "overview.summary", from_ts, to_ts)
    budgets = await gateway.spend.cost_guard("budget_status")
    experiments = [e.model_dump(include=_EXPERIMENT_FIELDS) for e in await gateway.experiments.live()]
    alerts = await gateway.alerter.store.list(20)
    return {"object": "overview", **traffic, "budgets": [b.model_dump(mode="json") for b in budgets],
            "experiments": experiments, "health": await component_health(gateway),
            "alerts": [a.model_dump(mode="json") for a in alerts]}


async def series_of(gateway: "Gateway", window_s: int, bucket_s: int) -> dict[str, Any]:
    """The buckets of the last ``window_s`` (at most ``MAX_BUCKETS`` of them), from the ledger."""
    if window_s / bucket_s > MAX_BUCKETS:
        raise InvalidRequestError(f"window_s / bucket_s must be at most {MAX_BUCKETS}.", param="bucket_s")
    now = time.time()
    start = (now // bucket_s + 1) * bucket_s - window_s  # buckets aligned to the clock
    return await _ledger(gateway, "store", "overview.series", start, start + window_s, float(bucket_s))
