"""CostGuard's configuration: plans (per-user daily quotas), budgets and reservation housekeeping.

These models hang under ``GatewayConfig.cost_guard``. They check what can be
checked without the model list (ids, scopes, limits, thresholds); the
``GatewayConfig`` validator checks that every model they name is served.
"""

from __future__ import annotations

import zoneinfo
from typing import Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from serve_app.config_base import BaseConfig, PlanTable, base_model_name

BudgetScope = Literal["global", "tenant", "user", "model", "tag"]
BudgetPeriod = Literal["day", "week", "month"]


class PlanConfig(BaseConfig):
    """What one plan grants each of its users."""

    daily_tokens: PositiveInt | None = Field(
        None, description="Tokens (prompt + completion) a user may spend per day; None is unlimited."
    )
    allowed_models: list[str] | None = Field(None, description="Models the plan may call; None allows all.")
    downgrade_model: str | None = Field(
        None, description="Cheaper model used when the requested one does not fit a quota or budget."
    )
    max_tokens_cap: PositiveInt | None = Field(
        None, description="Upper bound on a request's max_tokens (output tokens); None keeps the request's."
    )

    @model_validator(mode="after")
    def _check_downgrade_allowed(self) -> "PlanConfig":
        if (
            self.downgrade_model is not None
            and self.allowed_models is not None
            and self.downgrade_model not in self.allowed_models
        ):
            raise ValueError(f"downgrade_model {self.downgrade_model!r} is not in allowed_models")
        return self

    def allows(self, model: str) -> bool:
        """Return whether the plan may call ``model`` (an adapter, ``<base>:<name>``, when it may call the base)."""
        return self.allowed_models is None or model in self.allowed_models or (
            base_model_name(model) in self.allowed_models)


class PlansConfig(PlanTable):
    """One ``PlanConfig`` per plan an API key can carry (``serve_app.auth.Plan``)."""

    free: PlanConfig = Field(default_factory=lambda: PlanConfig(daily_tokens=50_000))
    premium: PlanConfig = Field(default_factory=lambda: PlanConfig(daily_tokens=200_000))
    enterprise: PlanConfig = Field(default_factory=PlanConfig)



class BudgetConfig(BaseConfig):
    """A spending limit over one period, shared by every request in its scope."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$", description="Name in Redis keys, alerts, denials.")
    scope: BudgetScope = Field("global", description="Which requests count: all, or one tenant/user/model/tag.")
    scope_value: str | None = Field(None, description="The tenant, user, model or tag; none for a global budget.")
    period: BudgetPeriod = Field("day", description="Window the limit applies to, in CostGuardConfig.timezone.")
    limit_tokens: PositiveInt | None = Field(None, description="Tokens allowed per period.")
    limit_usd: PositiveFloat | None = Field(None, description="Spend allowed per period, in USD.")
    downgrade_below_fraction: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Downgrade to the plan's cheaper model once the remaining share falls under this fraction.",
    )
    alert_thresholds: list[float] = Field(
        default_factory=lambda: [0.8, 1.0], description="Spent fractions reported once per period when crossed."
    )

    @field_validator("alert_thresholds")
    @classmethod
    def _check_thresholds(cls, thresholds: list[float]) -> list[float]:
        if any(t <= 0 for t in thresholds):
            raise ValueError("alert thresholds must be positive fractions")
        return sorted(set(thresholds))

    @model_validator(mode="after")
    def _check_scope_and_limits(self) -> "BudgetConfig":
        if self.scope == "global" and self.scope_value is not None:
            raise ValueError(f"budget {self.id}: a global budget takes no scope_value")
        if self.scope != "global" and not self.scope_value:
            raise ValueError(f"budget {self.id}: scope {self.scope!r} needs a scope_value")
        if self.limit_tokens is None and self.limit_usd is None:
            raise ValueError(f"budget {self.id}: set limit_tokens, limit_usd or both")
        return self

    def applies(self, tenant: str, user: str, model: str, tags: list[str]) -> bool:
        """Return whether a request with these attributes counts against this budget."""
        if self.scope == "global":
            return True
        if self.scope == "tenant":
            return tenant == self.scope_value
        if self.scope == "user":
            return user == self.scope_value
        if self.scope == "model":
            return model == self.scope_value
        return self.scope_value in tags


class CostGuardConfig(BaseConfig):
    """Plans, budgets and the housekeeping of reservations."""

    plans: PlansConfig = Field(default_factory=PlansConfig)
    budgets: list[BudgetConfig] = Field(default_factory=list, description="Budgets checked on every request.")
    reservation_ttl_s: PositiveFloat = Field(
        900.0,
        description="A reservation not settled by then (crashed replica) is released; outlast the model call.",
    )
    counter_retention_s: PositiveInt = Field(
        8 * 86_400, description="How long a period's counters outlive the period (late settles, reports)."
    )
    reclaim_per_reserve: NonNegativeInt = Field(
        2, description="Expired reservations released inside each reserve call (0: rely on reclaim_expired)."
    )
    timezone: str = Field("UTC", description="IANA zone whose midnights, Mondays and 1sts start the periods.")
    redis_max_connections: PositiveInt = Field(
        64, description="Connections per CostGuard instance; callers past this wait instead of failing."
    )
    config_refresh_s: PositiveFloat = Field(
        1.0,
        description="How often each CostGuard instance checks Redis for plans and budgets changed by the admin API.",
    )

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, timezone: str) -> str:
        try:
            zoneinfo.ZoneInfo(timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {timezone!r}") from exc
        return timezone

    @model_validator(mode="after")
    def _check_budgets(self) -> "CostGuardConfig":
        ids = [b.id for b in self.budgets]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"cost_guard.budgets: duplicate budget ids {duplicates}")
        if self.counter_retention_s < self.reservation_ttl_s:
            raise ValueError("cost_guard: counter_retention_s must be at least reservation_ttl_s")
        return self

    def model_names(self) -> set[str]:
        """Return every model named by a plan or a model-scoped budget (for GatewayConfig's check)."""
        names: set[str] = set()
        for name in PlansConfig.model_fields:
            plan = self.plans.get(name)
            names.update(plan.allowed_models or [])
            if plan.downgrade_model:
                names.add(plan.downgrade_model)
        names.update(b.scope_value for b in self.budgets if b.scope == "model" and b.scope_value)
        return names
