"""CostGuard's picklable arguments and answers, shared by the embedded and the deployment placements.

USD amounts cross the Redis boundary as integer nano-dollars (``NANO_USD`` per
dollar) and come back here as floats for reports and records.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.auth import Plan
from serve_app.cost_config import BudgetConfig, BudgetPeriod, BudgetScope
from serve_app.errors import PermissionDeniedError, QuotaExceededError, RaygateError

PLAN_QUOTA = "plan daily quota"
NANO_USD = 1_000_000_000
Outcome = Literal["allow", "downgrade", "deny", "forbidden"]
Reason = Literal["plan_quota", "budget", "budget_floor", "model_not_allowed"]


class ReserveRequest(BaseModel):
    """What CostGuard needs to know about a request before the model call."""

    request_id: str = Field(min_length=1)
    tenant: str
    user: str
    plan: Plan
    model: str
    tags: list[str] = Field(default_factory=list)
    prompt_tokens_estimate: int = Field(ge=0)
    max_tokens: int = Field(ge=0, description="Requested output tokens, before the plan's cap.")


class ReserveDecision(BaseModel):
    """The answer to ``reserve``; ``model`` and ``max_tokens`` are what the Gateway must call with."""

    outcome: Outcome
    request_id: str
    requested_model: str
    model: str | None = Field(None, description="Model the reservation is on; None when nothing was reserved.")
    max_tokens: int = Field(description="Output tokens after the plan's cap; send this upstream.")
    reason: Reason | None = Field(None, description="Why a downgrade or denial happened.")
    limit: str | None = Field(None, description="The limit behind ``reason``: a budget id or 'plan daily quota'.")
    resets_at: datetime | None = Field(None, description="When a denied request can fit again.")
    reserved_tokens: int = 0
    reserved_usd: float = 0.0

    @property
    def allowed(self) -> bool:
        """Whether the model call may go ahead (allow or downgrade)."""
        return self.outcome in ("allow", "downgrade")

    def to_error(self, now: float | None = None) -> RaygateError | None:
        """Return the client error for a deny (429) or forbidden (403) decision, else None."""
        if self.outcome == "forbidden":
            return PermissionDeniedError(
                f"Your plan does not allow the model '{self.requested_model}'.", param="model",
                code="model_not_allowed",
            )
        if self.outcome != "deny":
            return None
        headers: dict[str, str] = {}
        when = ""
        if self.resets_at is not None:
            retry_s = max(1, int(self.resets_at.timestamp() - (time.time() if now is None else now)) + 1)
            headers["retry-after"] = str(retry_s)
            when = f"; it resets at {self.resets_at.isoformat()}"
        what = "your plan's daily token quota" if self.reason == "plan_quota" else f"the '{self.limit}' budget"
        return QuotaExceededError(f"This request does not fit {what}{when}.", headers=headers)


class ThresholdCrossing(BaseModel):
    """A budget's spent fraction reached an alert threshold, reported once per period."""

    budget_id: str
    threshold: float
    period_start: datetime


class SettleResult(BaseModel):
    """The answer to ``settle``."""

    settled: bool = Field(description="False when there was no reservation (already settled or released).")
    crossings: list[ThresholdCrossing] = Field(default_factory=list)


class UsageReport(BaseModel):
    """A user's plan quota today (GET /v1/usage)."""

    tenant: str
    user: str
    plan: Plan
    used_tokens: int
    reserved_tokens: int
    limit_tokens: int | None = Field(description="None: the plan is unlimited.")
    remaining_tokens: int | None
    used_usd: float
    resets_at: datetime


class BudgetStatus(BaseModel):
    """One budget in its current period (reports, alerts)."""

    id: str
    scope: BudgetScope
    scope_value: str | None
    period: BudgetPeriod
    period_start: datetime
    resets_at: datetime
    used_tokens: int
    reserved_tokens: int
    limit_tokens: int | None
    used_usd: float
    reserved_usd: float
    limit_usd: float | None
    spent_fraction: float = Field(description="Settled use over the limit; the larger of tokens and USD.")


def utc(ts: float) -> datetime:
    """Return an epoch timestamp as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, timezone.utc)


def budget_status_from_counters(
    b: BudgetConfig, period_start: float, period_end: float, c: dict[str, str]
) -> BudgetStatus:
    """Return a budget's status from its counter hash (fields as in ``deployments.cost_guard_lua``)."""
    used_tokens, used_nano = int(c.get("ut", 0)), int(c.get("uu", 0))
    fractions = []
    if b.limit_tokens is not None:
        fractions.append(used_tokens / b.limit_tokens)
    if b.limit_usd is not None:
        fractions.append(used_nano / round(b.limit_usd * NANO_USD))
    return BudgetStatus(
        id=b.id, scope=b.scope, scope_value=b.scope_value, period=b.period, period_start=utc(period_start),
        resets_at=utc(period_end), used_tokens=used_tokens, reserved_tokens=int(c.get("rt", 0)),
        limit_tokens=b.limit_tokens, used_usd=used_nano / NANO_USD, reserved_usd=int(c.get("ru", 0)) / NANO_USD,
        limit_usd=b.limit_usd, spent_fraction=max(fractions),
    )
