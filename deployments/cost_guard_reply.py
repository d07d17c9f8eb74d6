"""Reading the cost guard script's reserve reply: which candidate model it chose, or what blocked it."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

from deployments.cost_guard_protocol import NANO_USD, PLAN_QUOTA, Outcome, Reason, ReserveDecision, ReserveRequest, utc
from serve_app.cost_config import PlanConfig

logger = logging.getLogger("deployments.cost_guard")  # the cost guard's own decisions


class Check(NamedTuple):
    """Python's view of one counter in a candidate's reservation, by the index the script reports."""

    limit: str
    resets_at: float


def decision(
    reply: list[Any], request: ReserveRequest, plan: PlanConfig, models: list[str],
    cands: list[dict[str, Any]], views: list[list[Check]], base: dict[str, Any],
) -> ReserveDecision:
    """Turn the script's reply into a decision (see the script's reserve() for the reply shape)."""
    status = int(reply[0])
    if status == 2:  # the id was reserved before: answer with that reservation
        model = str(reply[1])
        outcome: Outcome = "allow" if model == request.model else "downgrade"
        return ReserveDecision(outcome=outcome, model=model, reserved_tokens=int(reply[2]),
                               reserved_usd=int(reply[3]) / NANO_USD, **base)
    if status == 0:
        # Report the candidate that can fit soonest, and the latest-resetting limit blocking it.
        blocked = [max((views[i][j - 1] for j in fails), key=lambda c: c.resets_at)
                   for i, fails in enumerate(reply[3:3 + len(models)]) if fails]
        check = min(blocked, key=lambda c: c.resets_at)
        logger.info("Cost guard denied request %s: %s until %s", request.request_id, check.limit, check.resets_at)
        return ReserveDecision(outcome="deny", reason=_reason(check.limit), limit=check.limit,
                               resets_at=utc(check.resets_at), **base)
    chosen, floor, fails = int(reply[1]) - 1, int(reply[2]), reply[3]
    cand = cands[chosen]
    amounts = {"model": cand["m"], "reserved_tokens": cand["t"], "reserved_usd": cand["u"] / NANO_USD}
    if cand["m"] == request.model:
        return ReserveDecision(outcome="allow", **amounts, **base)
    reason: Reason
    if not plan.allows(request.model):
        reason, limit = "model_not_allowed", None
    elif fails:
        limit = max((views[0][j - 1] for j in fails), key=lambda c: c.resets_at).limit
        reason = _reason(limit)
    else:
        reason, limit = "budget_floor", views[0][floor - 1].limit
    logger.info("Cost guard downgraded request %s from %s to %s (%s)", request.request_id, request.model,
                cand["m"], reason)
    return ReserveDecision(outcome="downgrade", reason=reason, limit=limit, **amounts, **base)


def _reason(limit: str) -> Reason:
    return "plan_quota" if limit == PLAN_QUOTA else "budget"
