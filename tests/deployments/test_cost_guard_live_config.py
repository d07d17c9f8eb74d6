"""Plans and budgets changed through CostGuard's admin methods, seen by other instances, on a real Valkey.

Two or more CostGuards sharing a key prefix stand for Gateway replicas. A change
made on one is polled for on another, with a deadline, using a short
``config_refresh_s``; ``enterprise`` (unlimited) requests are released after each
poll so polling uses up no quota.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import pytest
import redis.asyncio as aioredis

from deployments.cost_guard import CostGuard, ReserveDecision, ReserveRequest
from deployments.cost_guard_config_store import CONFIG_SNAPSHOT_LUA
from deployments.cost_guard_lua import COST_GUARD_LUA
from serve_app.cost_config import BudgetConfig, CostGuardConfig, PlanConfig
from serve_app.errors import InvalidRequestError, NotFoundError

NOW = datetime(2025, 1, 15, 12, tzinfo=timezone.utc).timestamp()
PRICES = {"big": (10.0, 30.0), "mini": (0.5, 1.5)}
REFRESH_S = 0.2
SLACK_S = 2.0  # scheduling slack on a busy CI machine, on top of the refresh interval
DEADLINE_S = 10.0
MakeGuard = Callable[..., CostGuard]


def config(**kwargs: Any) -> CostGuardConfig:
    kwargs.setdefault("plans", {"free": {"daily_tokens": 1000}})
    kwargs.setdefault("config_refresh_s", REFRESH_S)
    return CostGuardConfig.model_validate(kwargs)


def req(prompt: int, *, plan: str = "enterprise", model: str = "big") -> ReserveRequest:
    return ReserveRequest(request_id=uuid.uuid4().hex, tenant="acme", user="ann", plan=plan, model=model,
                          prompt_tokens_estimate=prompt, max_tokens=0)


async def try_reserve(guard: CostGuard, prompt: int, *, plan: str = "enterprise") -> ReserveDecision:
    """Reserve, then give it back at once: a probe of what the guard enforces."""
    decision = await guard.reserve(req(prompt, plan=plan), now=NOW)
    if decision.allowed:
        await guard.release(decision.request_id)
    return decision


async def poll(check: Callable[[], Awaitable[bool]]) -> float:
    """Await ``check`` until it holds; return how long that took (fail past DEADLINE_S)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < DEADLINE_S, "the change never reached the other instance"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:cg"


@pytest.fixture
async def make_guard(valkey_url: str, prefix: str) -> AsyncIterator[MakeGuard]:
    """Build CostGuards sharing the test's key prefix (several instances = several replicas)."""
    guards: list[CostGuard] = []

    def make(cfg: CostGuardConfig) -> CostGuard:
        guards.append(CostGuard(cfg, valkey_url, PRICES, key_prefix=prefix))
        return guards[-1]

    yield make
    for guard in guards:
        await guard.close()


async def test_budget_put_on_one_instance_is_enforced_by_another(make_guard: MakeGuard) -> None:
    a, b = make_guard(config()), make_guard(config())
    assert (await try_reserve(b, 100)).allowed  # b has loaded the (empty) overrides

    saved = await a.put_budget(BudgetConfig(id="cap", limit_tokens=50))
    assert saved.id == "cap"
    denied = await try_reserve(a, 100)  # the writer enforces it at once
    assert (denied.outcome, denied.limit) == ("deny", "cap")

    async def b_denies() -> bool:
        return (await try_reserve(b, 100)).limit == "cap"

    assert await poll(b_denies) < REFRESH_S + SLACK_S
    assert [x.id for x in await b.list_budgets()] == ["cap"]
    assert [s.id for s in await b.budget_status(now=NOW)] == ["cap"]


async def test_new_instance_starts_from_the_live_config(make_guard: MakeGuard) -> None:
    await make_guard(config()).put_budget(BudgetConfig(id="cap", limit_tokens=50))
    late = make_guard(config())  # a replica started after the change
    assert (await try_reserve(late, 100)).limit == "cap"


async def test_deleting_a_file_budget_stops_enforcing_it_everywhere(make_guard: MakeGuard) -> None:
    file_budgets = [{"id": "tiny", "limit_tokens": 50}, {"id": "wide", "limit_tokens": 10**6}]
    a, b = make_guard(config(budgets=file_budgets)), make_guard(config(budgets=file_budgets))
    assert (await try_reserve(b, 100)).limit == "tiny"

    deleted = await a.delete_budget("tiny")
    assert (deleted.id, deleted.limit_tokens) == ("tiny", 50)
    assert [x.id for x in await a.list_budgets()] == ["wide"]

    async def b_allows() -> bool:
        return (await try_reserve(b, 100)).allowed

    assert await poll(b_allows) < REFRESH_S + SLACK_S
    assert (await try_reserve(make_guard(config(budgets=file_budgets)), 100)).allowed  # the tombstone persists
    with pytest.raises(NotFoundError):
        await a.delete_budget("tiny")

    await a.put_budget(BudgetConfig(id="tiny", limit_tokens=70))  # put again: back, with the new limit
    assert [(x.id, x.limit_tokens) for x in await a.list_budgets()] == [("tiny", 70), ("wide", 10**6)]


async def test_put_replaces_a_file_budget_in_place_and_its_cached_limits(make_guard: MakeGuard) -> None:
    guard = make_guard(config(budgets=[{"id": "b1", "limit_tokens": 1000}, {"id": "b2", "limit_tokens": 1000}]))
    assert (await try_reserve(guard, 100)).allowed  # caches b1's counter spec with its old limit

    await guard.put_budget(BudgetConfig(id="b1", limit_tokens=50))
    await guard.put_budget(BudgetConfig(id="a0", limit_usd=5.0))
    assert [(x.id, x.limit_tokens) for x in await guard.list_budgets()] == [("b1", 50), ("b2", 1000), ("a0", None)]
    assert (await try_reserve(guard, 100)).limit == "b1"

    await guard.delete_budget("a0")  # an API-only budget is simply removed
    assert [x.id for x in await guard.list_budgets()] == ["b1", "b2"]


async def test_replacing_a_plan_applies_on_every_instance(make_guard: MakeGuard) -> None:
    a, b = make_guard(config()), make_guard(config())
    assert (await try_reserve(b, 500, plan="free")).allowed

    await a.put_plan("free", PlanConfig(daily_tokens=100))
    plans = await a.list_plans()
    assert (plans.free.daily_tokens, plans.premium.daily_tokens) == (100, 200_000)

    async def b_denies() -> bool:
        return (await try_reserve(b, 500, plan="free")).reason == "plan_quota"

    assert await poll(b_denies) < REFRESH_S + SLACK_S
    assert (await b.usage("acme", "ann", "free", now=NOW)).limit_tokens == 100


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (lambda g: g.put_plan("free", PlanConfig(allowed_models=["big", "nope"])), "allowed_models"),
        (lambda g: g.put_plan("premium", PlanConfig(downgrade_model="gone")), "downgrade_model"),
        (lambda g: g.put_plan("gold", PlanConfig()), "plan"),
        (lambda g: g.put_budget(BudgetConfig(id="m", scope="model", scope_value="nope", limit_tokens=1)),
         "scope_value"),
    ],
)
async def test_changes_naming_unserved_models_are_refused(make_guard: MakeGuard, change: Any, param: str) -> None:
    guard = make_guard(config())
    with pytest.raises(InvalidRequestError) as info:
        await change(guard)
    assert info.value.param == param and info.value.status_code == 400
    assert await guard.list_budgets() == []
    assert await guard.list_plans() == config().plans


async def test_deleting_an_unknown_budget_is_not_found(make_guard: MakeGuard) -> None:
    with pytest.raises(NotFoundError) as info:
        await make_guard(config()).delete_budget("nope")
    assert (info.value.status_code, info.value.param) == (404, "budget_id")


async def test_invalid_entries_in_redis_are_skipped(make_guard: MakeGuard, valkey_url: str, prefix: str) -> None:
    guard = make_guard(config(budgets=[{"id": "file", "limit_tokens": 10}]))
    r = aioredis.from_url(valkey_url, decode_responses=True)
    try:
        await r.hset(f"{prefix}:config:plans", mapping={
            "free": '{"daily_tokens": "lots"}', "premium": '{"allowed_models": ["gone"]}', "gold": "{}",
            "enterprise": '{"daily_tokens": 7}',
        })
        await r.hset(f"{prefix}:config:budgets", mapping={
            "file": "{not json", "other": '{"id": "mismatch", "limit_tokens": 1}', "ok": '{"id": "ok", "limit_usd": 1}',
        })
        await r.incr(f"{prefix}:config:version")
    finally:
        await r.aclose()
    plans = await guard.list_plans()
    assert (plans.free.daily_tokens, plans.premium.allowed_models, plans.enterprise.daily_tokens) == (1000, None, 7)
    assert [(b.id, b.limit_tokens) for b in await guard.list_budgets()] == [("file", 10), ("ok", None)]


async def test_config_check_costs_one_redis_call_per_refresh_interval(
    make_guard: MakeGuard, monkeypatch: pytest.MonkeyPatch
) -> None:
    guard = make_guard(config(config_refresh_s=0.5))
    assert (await try_reserve(guard, 1)).allowed  # loads scripts and the overrides
    check_sha = hashlib.sha1(CONFIG_SNAPSHOT_LUA.encode()).hexdigest()
    reserve_sha = hashlib.sha1(COST_GUARD_LUA.encode()).hexdigest()
    seen: list[str] = []
    execute = guard.redis.execute_command

    queue = guard._script.pipeline.execute

    def name(args: tuple[Any, ...]) -> str:
        is_eval = args[0] == "EVALSHA"
        return "check" if is_eval and args[1] == check_sha else "reserve" if is_eval and args[1] == reserve_sha \
            else str(args[0])

    async def counting(*args: Any, **options: Any) -> Any:
        if name(args) != "reserve":  # reserves are counted as queued (one pipeline may carry many)
            seen.append(name(args))
        return await execute(*args, **options)

    async def queued(*args: Any) -> Any:
        seen.append(name(args))
        return await queue(*args)

    monkeypatch.setattr(guard.redis, "execute_command", counting)
    monkeypatch.setattr(guard._script.pipeline, "execute", queued)
    start = time.monotonic()
    rounds, per_round = 6, 50
    for _ in range(rounds):  # spread over more than one interval where the machine allows
        decisions = await asyncio.gather(*(guard.reserve(req(1), now=NOW) for _ in range(per_round)))
        assert all(d.allowed for d in decisions)
        await asyncio.sleep(0.1)
    elapsed = time.monotonic() - start
    assert seen.count("reserve") == rounds * per_round
    assert set(seen) <= {"reserve", "check"}
    # At most one check per started interval since the warm-up's check (which may be due at once).
    assert 0 < seen.count("check") <= 1 + elapsed / 0.5
