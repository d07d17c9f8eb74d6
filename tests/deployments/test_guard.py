"""Guard against a real Valkey: exact limits across replicas, rollover, headers, floods, blocks, anomalies.

Every test gets its own key prefix on the session's Valkey and passes ``now``, so windows,
blocks and histories are crafted without sleeping. ``NOW`` is on a minute boundary.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any

import pytest

import deployments.guard
from deployments.guard import Guard, GuardDecision, check_request_size
from serve_app.auth import APIKey, Plan
from serve_app.errors import InvalidRequestError, NotFoundError, RateLimitError, ServiceUnavailableError
from serve_app.guard_config import GuardConfig
from serve_app.protocol import ChatCompletionRequest, ChatMessage

NOW = datetime(2025, 1, 15, 12, tzinfo=timezone.utc).timestamp()
MakeGuard = Callable[..., Guard]
NO_FLOOD: dict[str, Any] = {"enabled": False}


def config(rpm: int | None = None, tpm: int | None = None, **kwargs: Any) -> GuardConfig:
    """A config whose free plan has the given limits (flood detection off unless given)."""
    kwargs.setdefault("flood", NO_FLOOD)
    plans = {"free": {"requests_per_minute": rpm, "tokens_per_minute": tpm}}
    return GuardConfig.model_validate({"plans": plans, **kwargs})


def api_key(key_id: str = "k1", plan: Plan = "free") -> APIKey:
    return APIKey(key_id=key_id, tenant="acme", user="ann", plan=plan)


@pytest.fixture
async def make_guard(valkey_url: str) -> AsyncIterator[MakeGuard]:
    """Build Guards sharing one fresh key prefix (several instances = several Gateway replicas)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:guard"
    guards: list[Guard] = []

    def make(cfg: GuardConfig) -> Guard:
        guards.append(Guard(cfg, valkey_url, key_prefix=prefix))
        return guards[-1]

    yield make
    for guard in guards:
        await guard.close()


async def checks(guard: Guard, n: int, now: float, tokens: int = 0, key: APIKey | None = None) -> list[GuardDecision]:
    return [await guard.check(key or api_key(), tokens, now) for _ in range(n)]


def error_of(decision: GuardDecision) -> RateLimitError:
    error = decision.to_error()
    assert error is not None
    return error


def test_exported_members() -> None:
    assert sorted(deployments.guard.__all__) == ["Anomaly", "Block", "Guard", "GuardDecision", "check_request_size"]


# -- rate limits --------------------------------------------------------------------------------


async def test_requests_limit_is_exact_across_two_replicas(make_guard: MakeGuard) -> None:
    a, b = make_guard(config(rpm=5)), make_guard(config(rpm=5))
    allowed = [await (a if i % 2 else b).check(api_key(), 0, NOW + 1) for i in range(5)]
    assert all(d.allowed for d in allowed)
    assert [d.remaining_requests for d in allowed] == [4, 3, 2, 1, 0]
    for guard in (a, b):
        denied = await guard.check(api_key(), 0, NOW + 2)
        assert (denied.allowed, denied.reason, denied.used_requests) == (False, "rate_requests", 5)
    other = await a.check(api_key("k2"), 0, NOW + 2)  # limits are per key
    assert other.allowed


async def test_concurrent_checks_on_two_replicas_admit_exactly_the_limit(make_guard: MakeGuard) -> None:
    a, b = make_guard(config(rpm=50)), make_guard(config(rpm=50))
    decisions = await asyncio.gather(*(g.check(api_key(), 10, NOW + 5) for _ in range(100) for g in (a, b)))
    assert sum(d.allowed for d in decisions) == 50
    assert {d.reason for d in decisions if not d.allowed} == {"rate_requests"}
    assert sorted(d.remaining_requests for d in decisions if d.allowed) == list(range(50))


@pytest.mark.parametrize(("plan", "expected"), [("premium", 120), ("enterprise", None)])
async def test_default_plan_limits(make_guard: MakeGuard, plan: Plan, expected: int | None) -> None:
    decision = await make_guard(GuardConfig()).check(api_key(plan=plan), 10, NOW)
    assert decision.allowed and decision.limit_requests == expected
    assert ("x-ratelimit-limit-requests" in decision.headers()) is (expected is not None)


async def test_tokens_limit_is_exact(make_guard: MakeGuard) -> None:
    guard = make_guard(config(tpm=1000))
    assert (await guard.check(api_key(), 400, NOW)).allowed
    assert (await guard.check(api_key(), 400, NOW)).allowed
    denied = await guard.check(api_key(), 201, NOW)
    assert (denied.allowed, denied.reason, denied.used_tokens, denied.remaining_tokens) == (
        False, "rate_tokens", 800, 200)
    last = await guard.check(api_key(), 200, NOW)  # a denied request took nothing: 200 still fit exactly
    assert last.allowed and last.remaining_tokens == 0


async def test_a_request_larger_than_the_tokens_limit_never_fits(make_guard: MakeGuard) -> None:
    decision = await make_guard(config(tpm=1000)).check(api_key(), 1001, NOW)
    assert decision.reason == "rate_tokens" and decision.retry_after_s is None
    error = decision.to_error()
    assert error is not None and "retry-after" not in error.headers
    assert error.message.startswith("Request too large for tokens per minute (TPM): Limit 1000, Requested 1001.")


async def test_window_rollover_weights_the_previous_minute(make_guard: MakeGuard) -> None:
    guard = make_guard(config(rpm=10))
    assert [d.allowed for d in await checks(guard, 11, NOW + 1)] == [True] * 10 + [False]
    # Half-way through the next minute, half of the previous minute still counts: 5 more fit.
    assert [d.allowed for d in await checks(guard, 6, NOW + 90)] == [True] * 5 + [False]
    # At the start of the minute after, those 5 count in full.
    assert [d.allowed for d in await checks(guard, 6, NOW + 120)] == [True] * 5 + [False]
    # After an idle minute the window is empty again.
    assert [d.allowed for d in await checks(guard, 11, NOW + 240)] == [True] * 10 + [False]


# -- headers and Retry-After --------------------------------------------------------------------


async def test_headers_of_an_allowed_request(make_guard: MakeGuard) -> None:
    decision = await make_guard(config(rpm=20, tpm=1000)).check(api_key(), 100, NOW + 15)
    assert decision.headers() == {
        "x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "19",
        "x-ratelimit-reset-requests": "1m45s",  # this minute must age out too: 45 s + 60 s
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "1m45s",
    }
    assert decision.to_error() is None


async def test_requests_retry_after_is_when_a_retry_passes(make_guard: MakeGuard) -> None:
    guard = make_guard(config(rpm=20))
    await checks(guard, 20, NOW + 15)
    denied = await guard.check(api_key(), 0, NOW + 15)
    # 45 s to the next minute, then 3 s until 20 * (1 - 3/60) + 1 <= 20.
    assert denied.retry_after_s == pytest.approx(48.0)
    error = denied.to_error()
    assert isinstance(error, RateLimitError) and (error.status_code, error.code) == (429, "rate_limit_exceeded")
    assert error.headers == {
        "x-ratelimit-limit-requests": "20", "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m45s", "retry-after": "48", "retry-after-ms": "48000",
    }
    assert error.message == ("Rate limit reached for requests per minute (RPM): Limit 20, Used 20, Requested 1. "
                             "Please try again in 48s.")
    early = await guard.check(api_key(), 0, NOW + 62.9)
    assert not early.allowed and early.retry_after_s == pytest.approx(0.1)
    assert error_of(early).headers["retry-after"] == "1"
    assert error_of(early).headers["retry-after-ms"] == "100"
    assert (await guard.check(api_key(), 0, NOW + 63)).allowed


async def test_tokens_retry_after_is_when_a_retry_passes(make_guard: MakeGuard) -> None:
    guard = make_guard(config(tpm=1000))
    assert (await guard.check(api_key(), 600, NOW + 15)).allowed
    denied = await guard.check(api_key(), 500, NOW + 15)
    # 45 s to the next minute, then 10 s until 600 * (1 - 10/60) + 500 <= 1000.
    assert denied.retry_after_s == pytest.approx(55.0)
    assert error_of(denied).headers["retry-after"] == "55"
    assert not (await guard.check(api_key(), 500, NOW + 69.9)).allowed
    assert (await guard.check(api_key(), 500, NOW + 70)).allowed


async def test_record_tokens_corrects_the_estimate(make_guard: MakeGuard) -> None:
    guard = make_guard(config(tpm=1000))
    first = await guard.check(api_key(), 800, NOW)
    assert not (await guard.check(api_key(), 300, NOW + 1)).allowed
    await guard.record_tokens(api_key(), 200, 800, first.checked_at)  # used 200 of the 800 estimated
    assert (await guard.check(api_key(), 800, NOW + 2)).remaining_tokens == 0
    await guard.record_tokens(api_key(), 0, 5000, NOW + 3)  # never below zero
    assert (await guard.check(api_key(), 1000, NOW + 4)).allowed
    await guard.record_tokens(api_key(), 300, 1000, NOW - 3600)  # that minute is gone: nothing to correct
    assert not await guard.redis.exists(guard._minute_key("k1", int((NOW - 3600) // 60)))


# -- floods and blocks --------------------------------------------------------------------------


FLOOD = {"window_s": 10, "factor": 5, "min_requests": 20, "baseline_half_life_s": 60, "block_s": 60}


async def test_a_burst_far_over_the_keys_baseline_blocks_it_until_the_block_ends(make_guard: MakeGuard) -> None:
    guard = make_guard(config(flood=FLOOD))
    for window in range(30):  # a baseline of 2 attempts per 10 s
        await checks(guard, 2, NOW + 10 * window)
    start = NOW + 300
    burst = await checks(guard, 20, start)
    assert [d.reason for d in burst] == [None] * 19 + ["flood"]
    assert burst[-1].blocked_until == start + 60 and burst[-1].retry_after_s == 60
    later = await guard.check(api_key(), 0, start + 30)
    assert (later.reason, later.blocked_until, later.retry_after_s) == ("blocked", start + 60, 30)
    assert error_of(later).headers["retry-after"] == "30"
    assert [(b.key_id, b.reason, b.until) for b in await guard.list_blocks(start + 30)] == [("k1", "flood", start + 60)]
    assert (await guard.check(api_key(), 0, start + 60)).allowed
    assert await guard.list_blocks(start + 60) == []


async def test_the_same_burst_is_no_flood_for_a_key_used_to_it(make_guard: MakeGuard) -> None:
    guard = make_guard(config(flood=FLOOD))
    for window in range(30):  # a baseline of 10 attempts per 10 s: 20 is not 5 times that
        await checks(guard, 10, NOW + 10 * window)
    assert all(d.allowed for d in await checks(guard, 20, NOW + 300))


async def test_a_client_within_its_rate_limit_is_never_a_flood(make_guard: MakeGuard) -> None:
    guard = make_guard(config(rpm=30, flood=FLOOD))
    assert all(d.allowed for d in await checks(guard, 30, NOW))
    assert (await guard.check(api_key(), 0, NOW + 1)).reason == "flood"  # hammering past its limit is


async def test_admin_block_and_lift(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    block = await guard.block("k1", 120, "abuse report", now=NOW)
    assert (block.until, block.created_at) == (NOW + 120, NOW)
    denied = await guard.check(api_key(), 0, NOW + 20)
    assert (denied.reason, denied.retry_after_s) == ("blocked", 100)
    assert error_of(denied).message == "This API key is temporarily blocked. Please try again in 1m40s."
    assert await guard.list_blocks(NOW) == [block]
    assert await guard.lift_block("k1", NOW + 20) == block
    assert (await guard.check(api_key(), 0, NOW + 21)).allowed
    with pytest.raises(NotFoundError):
        await guard.lift_block("k1", NOW + 21)
    with pytest.raises(InvalidRequestError):
        await guard.block("k1", 0, "x", now=NOW)


async def test_blocks_are_listed_soonest_end_first_without_expired_ones(make_guard: MakeGuard) -> None:
    guard = make_guard(config())
    await guard.block("late", 300, "a", now=NOW)
    await guard.block("soon", 100, "b", now=NOW)
    await guard.block("gone", 10, "c", now=NOW)
    assert [b.key_id for b in await guard.list_blocks(NOW + 50)] == ["soon", "late"]
    assert await guard.redis.hlen(guard._blocks) == 2  # the expired one was deleted
    with pytest.raises(NotFoundError):
        await guard.lift_block("gone", NOW + 50)


# -- anomalies ----------------------------------------------------------------------------------


ANOMALY = {"history_minutes": 10, "z_threshold": 3, "min_requests": 10, "min_stddev": 1.0}


async def craft(guard: Guard, key_id: str, history: list[int], last: int, scored_minute: float) -> None:
    """Make ``history`` attempts per minute before ``scored_minute``, then ``last`` in it."""
    for i, count in enumerate(history + [last]):
        minute = scored_minute - 60 * (len(history) - i)
        await checks(guard, count, minute + 5, key=api_key(key_id))


async def test_anomalies_score_the_last_minute_against_the_keys_history(make_guard: MakeGuard) -> None:
    guard = make_guard(config(anomaly=ANOMALY))
    scored = NOW + 3600
    await craft(guard, "spiky", [4, 6] * 5, 20, scored)  # mean 5, stddev 1: z = 15
    await craft(guard, "steady", [4, 6] * 5, 6, scored)  # z = 1
    await craft(guard, "fresh", [0] * 10, 12, scored)  # stddev floored at 1: z = 12
    await craft(guard, "small", [0] * 10, 9, scored)  # under min_requests
    found = await guard.anomalies(scored + 65)
    assert [(a.key_id, a.requests, a.mean, a.stddev, a.z_score, a.blocked) for a in found] == [
        ("spiky", 20, 5.0, 1.0, 15.0, False), ("fresh", 12, 0.0, 0.0, 12.0, False),
    ]
    assert found[0].minute_start == scored
    assert await guard.anomalies(scored + 185) == []  # a later minute with no traffic


async def test_anomalies_block_keys_when_the_action_is_block(make_guard: MakeGuard) -> None:
    guard = make_guard(config(anomaly={**ANOMALY, "action": "block", "block_s": 600}))
    await craft(guard, "k1", [1] * 10, 30, NOW)
    found = await guard.anomalies(NOW + 65)
    assert [(a.key_id, a.blocked) for a in found] == [("k1", True)]
    assert [(b.key_id, b.reason, b.until) for b in await guard.list_blocks(NOW + 65)] == [("k1", "anomaly", NOW + 665)]
    assert (await guard.check(api_key(), 0, NOW + 70)).reason == "blocked"
    assert [a.blocked for a in await guard.anomalies(NOW + 66)] == [False]  # already blocked: not extended


# -- request size and failures ------------------------------------------------------------------


def chat(*texts: str) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[ChatMessage(role="user", content=t) for t in texts])


def test_request_size_limits() -> None:
    cfg = GuardConfig(max_messages=2, max_content_chars=10)
    check_request_size(cfg, chat("12345", "67890"))
    with pytest.raises(InvalidRequestError) as too_many:
        check_request_size(cfg, chat("a", "b", "c"))
    assert (too_many.value.code, too_many.value.param) == ("too_many_messages", "messages")
    with pytest.raises(InvalidRequestError) as too_long:
        check_request_size(cfg, chat("12345", "678901"))
    assert too_long.value.code == "content_too_long" and too_long.value.status_code == 400
    check_request_size(GuardConfig(max_messages=None, max_content_chars=None), chat(*["x" * 1000] * 500))


async def test_script_is_reloaded_after_a_script_flush(make_guard: MakeGuard) -> None:
    guard = make_guard(config(rpm=5))
    assert (await guard.check(api_key(), 0, NOW)).allowed
    await guard.redis.script_flush()
    assert (await guard.check(api_key(), 0, NOW)).remaining_requests == 3


async def test_unreachable_redis_is_a_service_unavailable_error() -> None:
    guard = Guard(config(rpm=5), "redis://127.0.0.1:1/0")
    with pytest.raises(ServiceUnavailableError):
        await guard.check(api_key(), 0, NOW)
    with pytest.raises(ServiceUnavailableError):
        await guard.ping()
    await guard.close()
