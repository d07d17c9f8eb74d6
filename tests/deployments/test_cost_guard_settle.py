"""CostGuard against a real Valkey: settling, release, expiry, threshold alerts, concurrency, Redis.

Shares the helpers and the ``make_guard`` fixture of ``test_cost_guard.py`` (same prices and clock).
"""

from __future__ import annotations

import asyncio
import uuid

import pytest

from deployments.cost_guard import CostGuard
from serve_app.errors import ServiceUnavailableError
from tests.deployments.test_cost_guard import NOW, PRICES, MakeGuard, config, make_guard, req, ts

__all__ = ["make_guard"]  # the fixture, imported for pytest


# -- settle, release, expiry --------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "completion"), [(100, 50), (100, 2000)])
async def test_settle_replaces_the_reservation(make_guard: MakeGuard, prompt: int, completion: int) -> None:
    guard = make_guard(config(budgets=[{"id": "usd", "limit_usd": 1.0}]))
    await guard.reserve(req("a", prompt=100, max_tokens=500), now=NOW)
    result = await guard.settle("a", prompt, completion, "mini")  # fell back to mini: mini's price
    assert result.settled
    usage = await guard.usage("acme", "ann", "free", now=NOW)
    assert (usage.used_tokens, usage.reserved_tokens) == (prompt + completion, 0)
    assert usage.remaining_tokens == max(0, 1000 - prompt - completion)
    status = (await guard.budget_status(now=NOW))[0]
    assert (status.reserved_usd, status.used_usd) == (0, pytest.approx((prompt * 0.5 + completion * 1.5) / 1e6))
    assert not (await guard.settle("a", prompt, completion, "mini")).settled  # idempotent
    assert not await guard.release("a")
    assert (await guard.usage("acme", "ann", "free", now=NOW)).used_tokens == prompt + completion


async def test_release_gives_everything_back(make_guard: MakeGuard) -> None:
    guard = make_guard(config(budgets=[{"id": "g", "limit_tokens": 1000}]))
    assert (await guard.reserve(req("a", prompt=1000), now=NOW)).allowed
    assert (await guard.reserve(req("b", prompt=1), now=NOW)).outcome == "deny"
    assert await guard.release("a")
    assert not await guard.release("a")
    assert not (await guard.settle("a", 1000, 0, "big")).settled
    usage = await guard.usage("acme", "ann", "free", now=NOW)
    assert (usage.used_tokens, usage.reserved_tokens, usage.remaining_tokens) == (0, 0, 1000)
    assert (await guard.reserve(req("c", prompt=1000), now=NOW)).allowed


async def test_reserving_an_id_twice_keeps_one_reservation(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    first = await guard.reserve(req("a", prompt=300), now=NOW)
    again = await guard.reserve(req("a", prompt=300), now=NOW)
    assert again.model_dump() == first.model_dump()
    assert (await guard.usage("acme", "ann", "free", now=NOW)).reserved_tokens == 300


async def test_expired_reservations_are_reclaimed(make_guard: MakeGuard) -> None:
    guard = make_guard(config(reservation_ttl_s=60, reclaim_per_reserve=0))
    await guard.reserve(req("crashed", prompt=1000), now=NOW)
    assert await guard.reclaim_expired(now=NOW + 59.9) == 0
    assert await guard.reclaim_expired(now=NOW + 60) == 1
    assert await guard.reclaim_expired(now=NOW + 61) == 0
    assert (await guard.usage("acme", "ann", "free", now=NOW)).reserved_tokens == 0
    # The replica was only slow: its late settle still records the real usage, once.
    assert (await guard.settle("crashed", 200, 100, "big")).settled
    assert not (await guard.settle("crashed", 200, 100, "big")).settled
    usage = await guard.usage("acme", "ann", "free", now=NOW)
    assert (usage.used_tokens, usage.reserved_tokens) == (300, 0)


async def test_reserve_reclaims_expired_reservations_itself(make_guard: MakeGuard) -> None:
    crashed = make_guard(config(reservation_ttl_s=60))
    alive = make_guard(config(reservation_ttl_s=60))
    await crashed.reserve(req("a", prompt=1000), now=NOW)
    assert (await alive.reserve(req("b", prompt=1000), now=NOW + 59)).outcome == "deny"
    assert (await alive.reserve(req("c", prompt=1000), now=NOW + 60)).outcome == "allow"


# -- alerts -------------------------------------------------------------------------------------


async def test_threshold_crossings_reported_once_per_period(make_guard: MakeGuard) -> None:
    budgets = [{"id": "g", "limit_tokens": 1000, "alert_thresholds": [0.5, 0.8, 1.0]}]
    guard = make_guard(config(plans={"free": {}}, budgets=budgets))

    async def spend(rid: str, tokens: int, now: float = NOW) -> list[tuple[str, float, str]]:
        await guard.reserve(req(rid, prompt=tokens), now=now)
        result = await guard.settle(rid, tokens, 0, "big")
        return [(c.budget_id, c.threshold, c.period_start.date().isoformat()) for c in result.crossings]

    assert await spend("a", 499) == []
    assert await spend("b", 1) == [("g", 0.5, "2025-01-15")]
    assert await spend("c", 100) == []
    assert await spend("d", 400) == [("g", 0.8, "2025-01-15"), ("g", 1.0, "2025-01-15")]
    assert await spend("e", 0) == []
    assert await spend("f", 600, now=ts(2025, 1, 16)) == [("g", 0.5, "2025-01-16")]
    status = await guard.budget_status(now=NOW)
    assert status[0].spent_fraction == 1.0


# -- concurrency --------------------------------------------------------------------------------


async def test_concurrent_reserves_on_two_replicas_never_overrun(make_guard: MakeGuard) -> None:
    per_request, allowed_k, total = 70, 137, 500
    budgets = [{"id": "g", "limit_tokens": 10**9, "alert_thresholds": [0.5, 0.8, 1.0]},
               {"id": "tight", "limit_tokens": per_request * allowed_k, "alert_thresholds": [0.5, 0.8, 1.0]}]
    cfg = config(plans={"free": {"daily_tokens": per_request * allowed_k}}, budgets=budgets)
    replicas = [make_guard(cfg), make_guard(cfg)]
    done = asyncio.Event()
    peaks: list[int] = []

    async def watch() -> None:
        while not done.is_set():
            usage = await replicas[0].usage("acme", "ann", "free", now=NOW)
            peaks.append(usage.used_tokens + usage.reserved_tokens)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    decisions = await asyncio.gather(*(
        replicas[i % 2].reserve(req(f"c{i}", prompt=20, max_tokens=50), now=NOW) for i in range(total)
    ))
    done.set()
    await watcher
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == allowed_k
    assert {d.limit for d in decisions if not d.allowed} <= {"plan daily quota", "tight"}
    assert peaks and max(peaks) <= per_request * allowed_k
    usage = await replicas[1].usage("acme", "ann", "free", now=NOW)
    assert (usage.reserved_tokens, usage.remaining_tokens) == (per_request * allowed_k, 0)

    results = await asyncio.gather(*(
        replicas[i % 2].settle(d.request_id, 20, 50, "big") for i, d in enumerate(allowed)
    ))
    crossings = sorted((c.budget_id, c.threshold) for r in results for c in r.crossings)
    assert crossings == [("tight", 0.5), ("tight", 0.8), ("tight", 1.0)]
    usage = await replicas[0].usage("acme", "ann", "free", now=NOW)
    assert (usage.used_tokens, usage.reserved_tokens) == (per_request * allowed_k, 0)


# -- Redis boundary and placements --------------------------------------------------------------


async def test_script_is_reloaded_after_a_script_flush(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    assert (await guard.reserve(req("a", prompt=1), now=NOW)).allowed
    await guard.redis.script_flush()
    assert (await guard.reserve(req("b", prompt=1), now=NOW)).allowed


async def test_unreachable_redis_is_a_service_unavailable_error() -> None:
    guard = CostGuard(config(), "redis://127.0.0.1:1/0", PRICES)
    with pytest.raises(ServiceUnavailableError):
        await guard.reserve(req("a", prompt=1), now=NOW)
    with pytest.raises(ServiceUnavailableError):
        await guard.ping()
    await guard.close()


async def test_as_a_serve_deployment(valkey_url: str) -> None:
    from ray import serve

    prefix = f"test-{uuid.uuid4().hex[:12]}:cg"
    app = serve.deployment(CostGuard).bind(config(), valkey_url, PRICES, key_prefix=prefix)
    handle = serve.run(app, _local_testing_mode=True)
    decision = await handle.reserve.remote(req("a", prompt=10, max_tokens=20), now=NOW)
    assert (decision.outcome, decision.reserved_tokens) == ("allow", 30)
    assert (await handle.settle.remote("a", 10, 5, "big")).settled
    assert (await handle.usage.remote("acme", "ann", "free", now=NOW)).used_tokens == 15
    await handle.ping.remote()
