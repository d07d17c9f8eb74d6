"""Admin routes (admin key only) for the router: explain a decision, count decisions."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, Field

from deployments.router import route_stats
from serve_app.admin import DEFAULT_REPORT_DAYS, MAX_TIMESTAMP_S, _ledger
from serve_app.deps import get_gateway, require_admin
from serve_app.protocol import check_unicode

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/router", dependencies=[Depends(require_admin)])


class ClassifyRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100_000, description="The user's message.")
    tenant: str | None = Field(None, min_length=1, max_length=256, description="Whose routing policy to apply.")

    def model_post_init(self, _: Any) -> None:
        check_unicode(self.text)


@router.post("/classify")
async def classify(body: ClassifyRequest, gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """The route plan ``model: auto`` would get for this text, with the classifier's reasons (never cached)."""
    classification = await gateway.router("classify", body.text, use_cache=False)
    plan = None
    if gateway.config.router.enabled_for(body.tenant or ""):
        fallbacks = {m.name: m.fallbacks for m in gateway.config.models}
        plan = (await gateway.router("route", body.text, body.tenant or "", fallbacks)).model_dump(
            exclude={"classification"})
    return {"object": "router.decision", "classification": classification.model_dump(), "plan": plan}


@router.get("/stats")
async def stats(from_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                to_ts: float | None = Query(None, ge=0, le=MAX_TIMESTAMP_S),
                gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """Routed requests (``model: auto``) by category and by model, over ``from_ts``..``to_ts`` (default 30 days)."""
    to_ts = time.time() if to_ts is None else to_ts
    from_ts = to_ts - DEFAULT_REPORT_DAYS * 86_400 if from_ts is None else from_ts
    rows = await _ledger(gateway, "route_counts", from_ts, to_ts)
    return {"object": "router.stats", "from_ts": from_ts, "to_ts": to_ts, **route_stats(rows)}
