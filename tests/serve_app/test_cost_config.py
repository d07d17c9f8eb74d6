"""CostGuard's config: defaults, and the rules that refuse a bad plan or budget at build time."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from serve_app.cost_config import BudgetConfig, CostGuardConfig, PlanConfig


def test_default_plans() -> None:
    config = CostGuardConfig()
    assert [config.plans.get(p).daily_tokens for p in ("free", "premium", "enterprise")] == [50_000, 200_000, None]
    assert config.timezone == "UTC" and config.budgets == []
    with pytest.raises(KeyError):
        config.plans.get("gold")


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"id": "t", "scope": "tenant"}, "needs a scope_value"),
        ({"id": "g", "scope_value": "acme"}, "takes no scope_value"),
        ({"id": "g", "limit_tokens": None}, "set limit_tokens, limit_usd or both"),
        ({"id": "g", "alert_thresholds": [0.0]}, "positive"),
        ({"id": "g", "downgrade_below_fraction": 1.0}, "less than 1"),
        ({"id": "bad id"}, "pattern"),
        ({"id": "g", "period": "year"}, "'day', 'week' or 'month'"),
        ({"id": "g", "limit": 5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_budgets_are_refused(budget: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        BudgetConfig.model_validate({"limit_tokens": 10, **budget})


def test_cross_field_rules() -> None:
    with pytest.raises(ValidationError, match=r"duplicate budget ids \['a'\]"):
        CostGuardConfig.model_validate({"budgets": [{"id": "a", "limit_usd": 1}, {"id": "a", "limit_usd": 2}]})
    with pytest.raises(ValidationError, match="counter_retention_s must be at least reservation_ttl_s"):
        CostGuardConfig(reservation_ttl_s=100, counter_retention_s=10)
    with pytest.raises(ValidationError, match="unknown timezone"):
        CostGuardConfig(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="not in allowed_models"):
        PlanConfig(allowed_models=["a"], downgrade_model="b")


def test_thresholds_are_sorted_and_unique() -> None:
    budget = BudgetConfig(id="g", limit_usd=1, alert_thresholds=[1.0, 0.5, 1.0])
    assert budget.alert_thresholds == [0.5, 1.0]


@pytest.mark.parametrize(
    ("scope", "value", "hit", "miss"),
    [
        ("global", None, {}, None),
        ("tenant", "acme", {"tenant": "acme"}, {"tenant": "globex"}),
        ("user", "ann", {"user": "ann"}, {"user": "bob"}),
        ("model", "big", {"model": "big"}, {"model": "mini"}),
        ("tag", "batch", {"tags": ["batch"]}, {"tags": ["chat"]}),
    ],
)
def test_budget_scope(scope: str, value: str | None, hit: dict[str, Any], miss: dict[str, Any] | None) -> None:
    budget = BudgetConfig.model_validate({"id": "b", "scope": scope, "scope_value": value, "limit_tokens": 1})
    base: dict[str, Any] = {"tenant": "t", "user": "u", "model": "m", "tags": []}
    assert budget.applies(**{**base, **hit})
    if miss is not None:
        assert not budget.applies(**{**base, **miss})


def test_model_names_for_the_gateway_check() -> None:
    config = CostGuardConfig.model_validate({
        "plans": {"free": {"allowed_models": ["mini"], "downgrade_model": "mini"},
                  "premium": {"downgrade_model": "small"}},
        "budgets": [{"id": "b", "scope": "model", "scope_value": "big", "limit_usd": 5}],
    })
    assert config.model_names() == {"mini", "small", "big"}
