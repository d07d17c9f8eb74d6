"""Admin routes for judge scores (``serve_app.judging``): the ledger's evaluations, this replica's counts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Query

from deployments.evaluations import EvaluationRecord
from serve_app.admin import MAX_SQLITE_INT, _ledger
from serve_app.deps import get_gateway, require_admin

if TYPE_CHECKING:
    from serve_app.gateway import Gateway

router = APIRouter(prefix="/admin/evaluations", dependencies=[Depends(require_admin)])


@router.get("", response_model=list[EvaluationRecord])
async def list_evaluations(
    request_id: str | None = Query(None, description="One request's scores (its sync retry's included)."),
    limit: int = Query(100, ge=1, le=1000), offset: int = Query(0, ge=0, le=MAX_SQLITE_INT),
    gateway: "Gateway" = Depends(get_gateway),
) -> list[EvaluationRecord]:
    """Judge scores, newest first."""
    rows: list[EvaluationRecord] = await _ledger(gateway, "store", "evaluations.listing", request_id, limit, offset)
    return rows


@router.get("/stats")
async def evaluation_stats(gateway: "Gateway" = Depends(get_gateway)) -> dict[str, Any]:
    """This replica's judge calls since it started: scored, unparsed (no score in the reply), failed, retried."""
    counts = gateway.evaluator.counts
    return {"judge_model": gateway.config.evaluation.judge_model, "sample_rate": gateway.config.evaluation.sample_rate,
            **{k: counts.get(k, 0) for k in ("scored", "unparsed", "failed", "unstored", "retried")}}
