"""Admin routes (admin key only): the ledger, API keys, costs, forecasts, recommendations, alerts."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from pydantic import BaseModel, Field

from deployments import reports
from deployments.guard_protocol import Block
from deployments.ledger import AttemptRecord, RequestRecord
from serve_app.alerts import Alert
from serve_app.auth import APIKey, Plan
from serve_app.constants import LEDGER_CALL_TIMEOUT_S
from serve_app.deps import get_gateway, require_admin
from serve_app.handles import call

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])

DEFAULT_REPORT_DAYS = 30
# SQLite's INTEGER is a signed 64-bit value; a larger LIMIT/OFFSET would fail in the Ledger, not here.
MAX_SQLITE_INT = 2**63 - 1
# Report bounds, in Unix seconds: finite (answers echo them as JSON) and dates Python can render.
MAX_TIMESTAMP_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z


class BlockRequest(BaseModel):
    key_id: str = Field(min_length=1)
    seconds: float = Field(gt=0, le=30 * 86_400)
    reason: str = Field("blocked by an admin", max_length=200)


class KeyCreateRequest(BaseModel):
    # Constrained strings also refuse lone surrogates, which Redis cannot store.
    tenant: str = Field(min_length=1, max_length=256)
    user: str = Field(min_length=1, max_length=256)
    plan: Plan = "free"
    admin: bool = False


async def _ledger(gateway: "Gateway", method: str, *args: Any, **kwargs: Any) -> Any:
    """Call the Ledger after sending this replica's buffered rows, so answers include them."""
    await gateway.ledger_buffer.flush()
    return await call(getattr(gateway.ledger, method).remote(*args, **kwargs), LEDGER_CALL_TIMEOUT_S, "Ledger")


@router.get("/requests", response_model=list[RequestRecord])
async def list_requests(
    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_SQLITE_INT),
    tenant: str | None = None, gateway: "Gateway" = Depends(get_gateway),
) -> list[RequestRecord]:
    """The ledger's request rows, newest first."""
    rows: list[RequestRecord] = await _ledger(gateway, "list_requests", limit=limit, offset=offset, tenant=tenant)
    return rows


@router.get("/requests/{request_id}/attempts", response_model=list[AttemptRecord])
async def request_attempts(request_id: str, gateway: "Gateway" = Depends(get_gateway)) -> list[AttemptRecord]:
    """Every model call made for one request (retries and fallbacks included)."""
    rows: list[AttemptRecord] = await _ledger(gateway, "list_attempts", request_id)
    return rows


@router.post("/keys")
async def create_key(body: KeyCreateRequest, gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Create an API key; the key itself is shown only in this answer."""
    secret, record = await gateway.keys.create(body.tenant, body.user, body.plan, admin=body.admin)
    return {"key": secret, **record.model_dump()}


@router.get("/keys", response_model=list[APIKey])
async def list_keys(gateway: "Gateway" = Depends(get_gateway)) -> list[APIKey]:
    """Every key's record (never the keys)."""
    return await gateway.keys.list()


@router.delete("/keys/{key_id}", response_model=APIKey)
async def revoke_key(key_id: str, gateway: "Gateway" = Depends(get_gateway)) -> APIKey:
    """Revoke a key by its id."""
    return await gateway.keys.revoke(key_id)


@router.get("/costs", response_model=None)
async def costs(
    group_by: reports.GroupBy = "model",
    from_ts: float | None = Query(None, alias="from", ge=0, le=MAX_TIMESTAMP_S,
                                  description="Unix seconds; default 30 days ago."),
    to_ts: float | None = Query(None, alias="to", ge=0, le=MAX_TIMESTAMP_S, description="Unix seconds; default now."),
    tenant: str | None = None,
    format: Literal["json", "csv"] = "json",
    gateway: "Gateway" = Depends(get_gateway),
) -> Any:
    """Spend grouped by model, tenant, user, tag or day; JSON with budgets and forecasts, or CSV."""
    to_ts = to_ts if to_ts is not None else time.time()
    from_ts = from_ts if from_ts is not None else to_ts - DEFAULT_REPORT_DAYS * 86_400
    rows: list[reports.CostRow] = await _ledger(gateway, "cost_report", group_by, from_ts, to_ts, tenant)
    if format == "csv":
        return Response(reports.to_csv(rows), media_type="text/csv",
                        headers={"content-disposition": f'attachment; filename="raygate-costs-{group_by}.csv"'})
    return {"group_by": group_by, "from": from_ts, "to": to_ts, "rows": rows,
            "budgets": await _budget_forecasts(gateway, tenant)}


async def _budget_forecasts(gateway: "Gateway", tenant: str | None) -> list[dict[str, Any]]:
    """Every budget's spend so far; global and tenant budgets also get a forecast to the period's end.

    The ledger can filter spend by tenant only, so user, model and tag budgets get no forecast.
    """
    answers = []
    for budget in await gateway.spend.cost_guard("budget_status"):
        if tenant and budget.scope == "tenant" and budget.scope_value != tenant:
            continue
        forecast: reports.Forecast | None = None
        if budget.scope in ("global", "tenant"):
            forecast = await _ledger(
                gateway, "spend_forecast", budget.resets_at.timestamp(), spent_usd=budget.used_usd,
                tenant=budget.scope_value if budget.scope == "tenant" else None)
        projected = forecast.projected_usd if forecast is not None else None
        answers.append({"budget": budget, "forecast": forecast,
                        "will_exceed": bool(budget.limit_usd and projected is not None and projected > budget.limit_usd)})
    return answers


@router.get("/costs/recommendations", response_model=list[reports.Recommendation])
async def recommendations(
    from_ts: float | None = Query(None, alias="from", ge=0, le=MAX_TIMESTAMP_S),
    to_ts: float | None = Query(None, alias="to", ge=0, le=MAX_TIMESTAMP_S),
    tenant: str | None = None, cheap_model: str | None = None, gateway: "Gateway" = Depends(get_gateway),
) -> list[reports.Recommendation]:
    """Savings the data shows: premium spend on simple requests, fallback spend."""
    to_ts = to_ts if to_ts is not None else time.time()
    from_ts = from_ts if from_ts is not None else to_ts - DEFAULT_REPORT_DAYS * 86_400
    result: list[reports.Recommendation] = await _ledger(
        gateway, "recommendations", from_ts, to_ts, gateway.config.prices(), cheap_model=cheap_model, tenant=tenant)
    return result


@router.get("/alerts", response_model=list[Alert])
async def alerts(limit: int = Query(50, ge=1, le=1000), gateway: "Gateway" = Depends(get_gateway)) -> list[Alert]:
    """Alerts (budget thresholds, alert rules firing or resolved, floods, anomalies), newest first, with their
    webhook delivery state."""
    return await gateway.alerter.store.list(limit)


@router.post("/alerts/evaluate", response_model=list[Alert])
async def evaluate_alerts(gateway: "Gateway" = Depends(get_gateway)) -> list[Alert]:
    """Check the alert rules now instead of at the next interval; returns the alerts fired or resolved."""
    return await gateway.thresholds.evaluate()


@router.get("/blocks", response_model=list[Block])
async def list_blocks(gateway: "Gateway" = Depends(get_gateway)) -> list[Block]:
    """Keys blocked now (floods, anomalies, admins), soonest to end first."""
    blocks: list[Block] = await gateway.guard("list_blocks")
    return blocks


@router.post("/blocks", response_model=Block)
async def block_key(body: BlockRequest, gateway: "Gateway" = Depends(get_gateway)) -> Block:
    """Block a key for a while (every gateway replica refuses it at once)."""
    block: Block = await gateway.guard("block", body.key_id, body.seconds, body.reason)
    return block


@router.delete("/blocks/{key_id}", response_model=Block)
async def lift_block(key_id: str, gateway: "Gateway" = Depends(get_gateway)) -> Block:
    """Lift a key's block (404 when it is not blocked)."""
    block: Block = await gateway.guard("lift_block", key_id)
    return block
