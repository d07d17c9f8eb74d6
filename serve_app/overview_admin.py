"""``GET /admin/overview`` (admin key): the numbers an operator looks at first, in one answer."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query

from serve_app.admin import MAX_TIMESTAMP_S, _ledger
from serve_app.api_routes import component_health
from serve_app.deps import get_gateway, require_admin

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
DEFAULT_WINDOW_S = 86_400
_EXPERIMENT_FIELDS = {"id", "name", "status", "match_model", "traffic", "metric", "winner"}


@router.get("/overview")
async def overview(from_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                   to_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                   gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Totals, throughput, latency p50/p95/p99, errors by type, cache hit rate and spend by model, tenant
    and user (from the ledger, last 24 h by default), budgets, live experiments, component health and
    the latest alerts."""
    to_ts = time.time() if to_ts is None else to_ts
    from_ts = to_ts - DEFAULT_WINDOW_S if from_ts is None else from_ts
    traffic = await _ledger(gateway, "store", "overview.summary", from_ts, to_ts)
    budgets = await gateway.spend.cost_guard("budget_status")
    experiments = [e.model_dump(include=_EXPERIMENT_FIELDS) for e in await gateway.experiments.live()]
    alerts = await gateway.alerter.store.list(20)
    return {"object": "overview", **traffic, "budgets": [b.model_dump(mode="json") for b in budgets],
            "experiments": experiments, "health": await component_health(gateway),
            "alerts": [a.model_dump(mode="json") for a in alerts]}
