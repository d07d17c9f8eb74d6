"""CostGuard against a real Valkey: quota and budget arithmetic, downgrades and denials.

Settling, expiry, alerts, concurrency and the Redis boundary: ``test_cost_guard_settle.py``.

Every test gets its own key prefix on the session's Valkey, and passes ``now`` so that
period rollovers are tested without sleeping. Prices are whole nano-dollars per token
(``big``: 10,000 in / 30,000 out; ``mini``: 500 / 1,500) so USD limits can be hit exactly.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest

import deployments.cost_guard
from deployments.cost_guard import CostGuard, ReserveRequest, period_window
from serve_app.cost_config import CostGuardConfig
from serve_app.errors import PermissionDeniedError, QuotaExceededError

NOW = datetime(2025, 1, 15, 12, tzinfo=timezone.utc).timestamp()  # a Wednesday, noon UTC
DAY_S = 86_400
PRICES = {"big": (10.0, 30.0), "mini": (0.5, 1.5)}
MakeGuard = Callable[..., CostGuard]


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()  # type: ignore[misc]


def config(**kwargs: Any) -> CostGuardConfig:
    kwargs.setdefault("plans", {"free": {"daily_tokens": 1000}})
    return CostGuardConfig.model_validate(kwargs)


def req(rid: str, *, prompt: int = 0, max_tokens: int = 0, model: str = "big", plan: str = "free",
        tenant: str = "acme", user: str = "ann", tags: list[str] | None = None) -> ReserveRequest:
    return ReserveRequest(request_id=rid, tenant=tenant, user=user, plan=plan, model=model, tags=tags or [],
                          prompt_tokens_estimate=prompt, max_tokens=max_tokens)


@pytest.fixture
async def make_guard(valkey_url: str) -> AsyncIterator[MakeGuard]:
    """Build CostGuards sharing one fresh key prefix (several instances = several replicas)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:cg"
    guards: list[CostGuard] = []

    def make(cfg: CostGuardConfig, prices: dict[str, tuple[float, float]] = PRICES) -> CostGuard:
        guards.append(CostGuard(cfg, valkey_url, prices, key_prefix=prefix))
        return guards[-1]

    yield make
    for guard in guards:
        await guard.close()


def test_exported_members() -> None:
    assert sorted(deployments.cost_guard.__all__) == [
        "BudgetStatus", "CostGuard", "ReserveDecision", "ReserveRequest", "SettleResult", "ThresholdCrossing",
        "UsageReport", "Window", "period_window",
    ]


# -- plan quota ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("tokens", "outcome"), [(999, "allow"), (1000, "allow"), (1001, "deny")])
async def test_plan_quota_boundary(make_guard: MakeGuard, tokens: int, outcome: str) -> None:
    guard = make_guard(config())
    decision = await guard.reserve(req("r1", prompt=400, max_tokens=tokens - 400), now=NOW)
    assert decision.outcome == outcome
    if outcome == "deny":
        assert (decision.reason, decision.limit) == ("plan_quota", "plan daily quota")
        assert decision.resets_at == datetime(2025, 1, 16, tzinfo=timezone.utc)
        assert decision.model is None and decision.reserved_tokens == 0
    else:
        assert decision.model == "big" and decision.reserved_tokens == tokens
        assert decision.reserved_usd == pytest.approx((400 * 10 + (tokens - 400) * 30) / 1e6)


async def test_quota_is_shared_by_requests_and_resets_at_midnight(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    assert (await guard.reserve(req("a", prompt=600), now=NOW)).allowed
    assert (await guard.reserve(req("b", prompt=400), now=NOW)).allowed
    denied = await guard.reserve(req("c", prompt=1), now=NOW)
    assert denied.outcome == "deny"
    other_user = await guard.reserve(req("d", prompt=1000, user="bob"), now=NOW)
    assert other_user.allowed
    for rid, tokens in (("a", 600), ("b", 400)):  # settled, or they would expire before the evening
        await guard.settle(rid, tokens, 0, "big")
    assert (await guard.reserve(req("e", prompt=1), now=ts(2025, 1, 15, 23, 59, 59))).outcome == "deny"
    assert (await guard.reserve(req("f", prompt=1000), now=ts(2025, 1, 16))).allowed


async def test_unlimited_plan_still_counts_usage(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    assert (await guard.reserve(req("a", prompt=10**7, plan="enterprise"), now=NOW)).allowed
    await guard.settle("a", 10**7, 5, "big")
    usage = await guard.usage("acme", "ann", "enterprise", now=NOW)
    assert (usage.used_tokens, usage.limit_tokens, usage.remaining_tokens) == (10**7 + 5, None, None)


async def test_max_tokens_capped_by_plan(make_guard: MakeGuard) -> None:
    guard = make_guard(config(plans={"free": {"daily_tokens": 1000, "max_tokens_cap": 100}}))
    decision = await guard.reserve(req("a", prompt=50, max_tokens=5000), now=NOW)
    assert (decision.outcome, decision.max_tokens, decision.reserved_tokens) == ("allow", 100, 150)
    below_cap = await guard.reserve(req("b", prompt=50, max_tokens=20), now=NOW)
    assert (below_cap.max_tokens, below_cap.reserved_tokens) == (20, 70)


async def test_user_and_tenant_names_cannot_collide_in_keys(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    assert (await guard.reserve(req("a", prompt=1000, tenant="a:b", user="c"), now=NOW)).allowed
    assert (await guard.reserve(req("b", prompt=1000, tenant="a", user="b:c"), now=NOW)).allowed


# -- budgets ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scope", "scope_value", "matching", "other"),
    [
        ("global", None, {}, None),
        ("tenant", "acme", {}, {"tenant": "globex"}),
        ("user", "ann", {}, {"user": "bob"}),
        ("model", "big", {}, {"model": "mini"}),
        ("tag", "batch", {"tags": ["x", "batch"]}, {"tags": ["x"]}),
    ],
)
async def test_token_budget_per_scope(
    make_guard: MakeGuard, scope: str, scope_value: str | None, matching: dict[str, Any], other: dict[str, Any] | None
) -> None:
    budget = {"id": "b1", "scope": scope, "scope_value": scope_value, "limit_tokens": 500}
    guard = make_guard(config(plans={"free": {}}, budgets=[budget]))
    assert (await guard.reserve(req("a", prompt=200, max_tokens=300, **matching), now=NOW)).outcome == "allow"
    denied = await guard.reserve(req("b", prompt=1, **matching), now=NOW)
    assert (denied.outcome, denied.reason, denied.limit) == ("deny", "budget", "b1")
    if other is not None:
        assert (await guard.reserve(req("c", prompt=500, **other), now=NOW)).outcome == "allow"


@pytest.mark.parametrize(("prompt", "outcome"), [(99, "allow"), (100, "allow"), (101, "deny")])
async def test_usd_budget_boundary(make_guard: MakeGuard, prompt: int, outcome: str) -> None:
    # 100 prompt tokens * 10,000 + 300 output * 30,000 nano-USD = $0.01 exactly.
    guard = make_guard(config(plans={"free": {}}, budgets=[{"id": "usd", "limit_usd": 0.01}]))
    decision = await guard.reserve(req("a", prompt=prompt, max_tokens=300), now=NOW)
    assert decision.outcome == outcome
    if outcome == "allow":
        status = (await guard.budget_status(now=NOW))[0]
        assert status.reserved_usd == pytest.approx((prompt * 10 + 9000) / 1e6)
        assert status.used_usd == 0 and status.spent_fraction == 0


async def test_budget_with_tokens_and_usd_checks_both(make_guard: MakeGuard) -> None:
    budgets = [{"id": "both", "limit_tokens": 1000, "limit_usd": 0.001}]
    guard = make_guard(config(plans={"free": {}}, budgets=budgets))
    # mini: 1000 prompt tokens = $0.0005, tokens hit the limit first.
    assert (await guard.reserve(req("a", prompt=1000, model="mini"), now=NOW)).allowed
    assert (await guard.reserve(req("b", prompt=1, model="mini"), now=NOW)).outcome == "deny"
    # big: 100 prompt tokens = $0.001, USD hits the limit first.
    guard2 = make_guard(config(plans={"free": {}}, budgets=[{**budgets[0], "id": "both2"}]))
    assert (await guard2.reserve(req("c", prompt=100), now=NOW)).allowed
    assert (await guard2.reserve(req("d", prompt=1), now=NOW)).outcome == "deny"


@pytest.mark.parametrize(
    ("period", "last_second", "next_start"),
    [
        ("day", ts(2025, 1, 15, 23, 59, 59), ts(2025, 1, 16)),
        ("week", ts(2025, 1, 19, 23, 59, 59), ts(2025, 1, 20)),  # Sunday night -> Monday
        ("month", ts(2025, 1, 31, 23, 59, 59), ts(2025, 2, 1)),
    ],
)
async def test_budget_period_rollover(
    make_guard: MakeGuard, period: str, last_second: float, next_start: float
) -> None:
    guard = make_guard(config(plans={"free": {}}, budgets=[{"id": "p", "period": period, "limit_tokens": 100}]))
    assert (await guard.reserve(req("a", prompt=100), now=NOW)).allowed
    await guard.settle("a", 100, 0, "big")
    denied = await guard.reserve(req("b", prompt=1), now=last_second)
    assert denied.outcome == "deny" and denied.resets_at is not None
    assert denied.resets_at.timestamp() == next_start
    assert (await guard.reserve(req("c", prompt=100), now=next_start)).allowed
    status = (await guard.budget_status(now=next_start))[0]
    assert (status.period_start.timestamp(), status.reserved_tokens) == (next_start, 100)


def test_period_windows_in_a_timezone() -> None:
    tz = ZoneInfo("America/New_York")
    day = period_window("day", ts(2025, 1, 15, 4, 59, 59), tz)  # still the 14th in New York
    assert (day.label, day.start, day.end) == ("2025-01-14", ts(2025, 1, 14, 5), ts(2025, 1, 15, 5))
    month = period_window("month", ts(2025, 12, 31, 12), ZoneInfo("UTC"))
    assert (month.label, month.end) == ("2025-12-01", ts(2026, 1, 1))
    week = period_window("week", ts(2025, 3, 10, 12), tz)
    assert (week.label, week.end - week.start) == ("2025-03-10", 7 * DAY_S)
    dst_week = period_window("week", ts(2025, 3, 5, 12), tz)  # clocks go forward on Sunday the 9th
    assert (dst_week.label, dst_week.end - dst_week.start) == ("2025-03-03", 7 * DAY_S - 3600)


async def test_quota_day_follows_the_configured_timezone(make_guard: MakeGuard) -> None:
    guard = make_guard(config(timezone="America/New_York"))
    assert (await guard.reserve(req("a", prompt=1000), now=ts(2025, 1, 15, 4, 59, 59))).allowed
    assert (await guard.reserve(req("b", prompt=1000), now=ts(2025, 1, 15, 5))).allowed
    await guard.settle("b", 1000, 0, "big")
    assert (await guard.reserve(req("c", prompt=1), now=ts(2025, 1, 16, 4, 59, 59))).outcome == "deny"


# -- downgrades and denials ---------------------------------------------------------------------

PREMIUM = {"premium": {"daily_tokens": 10_000, "downgrade_model": "mini"}}


async def test_downgrade_when_a_model_budget_is_exhausted(make_guard: MakeGuard) -> None:
    budgets = [{"id": "big-day", "scope": "model", "scope_value": "big", "limit_tokens": 500}]
    guard = make_guard(config(plans=PREMIUM, budgets=budgets))
    decision = await guard.reserve(req("a", prompt=400, max_tokens=200, plan="premium"), now=NOW)
    assert (decision.outcome, decision.requested_model, decision.model) == ("downgrade", "big", "mini")
    assert (decision.reason, decision.limit, decision.reserved_tokens) == ("budget", "big-day", 600)
    assert decision.reserved_usd == pytest.approx((400 * 0.5 + 200 * 1.5) / 1e6)
    usage = await guard.usage("acme", "ann", "premium", now=NOW)
    assert (usage.reserved_tokens, usage.remaining_tokens) == (600, 9400)
    assert (await guard.budget_status(now=NOW))[0].reserved_tokens == 0  # nothing reserved on big's budget


async def test_downgrade_when_the_usd_budget_only_fits_the_cheaper_model(make_guard: MakeGuard) -> None:
    guard = make_guard(config(plans=PREMIUM, budgets=[{"id": "usd", "limit_usd": 0.001}]))
    decision = await guard.reserve(req("a", prompt=200, plan="premium"), now=NOW)  # big $0.002, mini $0.0001
    assert (decision.outcome, decision.model, decision.limit) == ("downgrade", "mini", "usd")


async def test_downgrade_below_remaining_fraction(make_guard: MakeGuard) -> None:
    budgets = [{"id": "g", "limit_tokens": 1000, "downgrade_below_fraction": 0.2}]
    guard = make_guard(config(plans=PREMIUM, budgets=budgets))
    await guard.reserve(req("spend", prompt=800, model="mini", plan="premium"), now=NOW)
    await guard.settle("spend", 800, 0, "mini")
    at_floor = await guard.reserve(req("a", prompt=10, plan="premium"), now=NOW)  # 20 % left: not under
    assert at_floor.outcome == "allow"
    under = await guard.reserve(req("b", prompt=10, plan="premium"), now=NOW)  # 19 % left
    assert (under.outcome, under.model, under.reason, under.limit) == ("downgrade", "mini", "budget_floor", "g")


async def test_floor_keeps_the_requested_model_when_the_downgrade_does_not_fit(make_guard: MakeGuard) -> None:
    budgets = [
        {"id": "g", "limit_tokens": 1000, "downgrade_below_fraction": 0.5},
        {"id": "mini-day", "scope": "model", "scope_value": "mini", "limit_tokens": 10},
    ]
    guard = make_guard(config(plans=PREMIUM, budgets=budgets))
    assert (await guard.reserve(req("a", prompt=600, plan="premium"), now=NOW)).outcome == "allow"
    decision = await guard.reserve(req("b", prompt=100, plan="premium"), now=NOW)
    assert (decision.outcome, decision.model) == ("allow", "big")


async def test_model_outside_the_plan(make_guard: MakeGuard) -> None:
    plans = {
        "free": {"daily_tokens": 1000, "allowed_models": ["mini"], "downgrade_model": "mini"},
        "premium": {"allowed_models": ["mini"]},
    }
    guard = make_guard(config(plans=plans))
    downgraded = await guard.reserve(req("a", prompt=10), now=NOW)
    assert (downgraded.outcome, downgraded.model, downgraded.reason) == ("downgrade", "mini", "model_not_allowed")
    forbidden = await guard.reserve(req("b", prompt=10, plan="premium"), now=NOW)
    assert (forbidden.outcome, forbidden.model, forbidden.allowed) == ("forbidden", None, False)
    error = forbidden.to_error()
    assert isinstance(error, PermissionDeniedError) and error.code == "model_not_allowed"
    assert (await guard.reserve(req("c", prompt=991), now=NOW)).outcome == "deny"  # the downgrade must fit too


async def test_deny_names_the_limit_that_lifts_first(make_guard: MakeGuard) -> None:
    budgets = [
        {"id": "big-month", "scope": "model", "scope_value": "big", "period": "month", "limit_tokens": 100},
        {"id": "big-day", "scope": "model", "scope_value": "big", "period": "day", "limit_tokens": 100},
        {"id": "mini-week", "scope": "model", "scope_value": "mini", "period": "week", "limit_tokens": 100},
    ]
    guard = make_guard(config(plans=PREMIUM, budgets=budgets))
    decision = await guard.reserve(req("a", prompt=200, plan="premium"), now=NOW)
    # big waits for its monthly budget (Feb 1); mini only for the weekly one (Monday Jan 20).
    assert (decision.outcome, decision.limit, decision.reason) == ("deny", "mini-week", "budget")
    assert decision.resets_at == datetime(2025, 1, 20, tzinfo=timezone.utc)
    error = decision.to_error(now=ts(2025, 1, 19))
    assert isinstance(error, QuotaExceededError)
    assert (error.status_code, error.code, error.headers) == (429, "insufficient_quota", {"retry-after": "86401"})
    assert "mini-week" in error.message and "2025-01-20" in error.message


async def test_unpriced_model_is_reserved_at_the_highest_price(make_guard: MakeGuard) -> None:
    guard = make_guard(config(plans={"free": {}}, budgets=[{"id": "usd", "limit_usd": 1.0}]))
    decision = await guard.reserve(req("a", prompt=1000, max_tokens=1000, model="unknown"), now=NOW)
    assert decision.reserved_usd == pytest.approx((1000 * 10 + 1000 * 30) / 1e6)
