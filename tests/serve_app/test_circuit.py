"""The shared circuit breaker on a real Valkey, with an injected clock."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from serve_app.circuit import CircuitBreakers
from serve_app.config import CircuitBreakerConfig
from serve_app.stores import redis_client

CONFIG = CircuitBreakerConfig(failure_threshold=3, error_rate_threshold=0.5, min_requests=10, window_s=60,
                              cooldown_s=30)


@pytest.fixture
def breakers(valkey_url: str) -> CircuitBreakers:
    return CircuitBreakers(redis_client(valkey_url))


@pytest.fixture
def model() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


async def fail(breakers: CircuitBreakers, model: str, times: int, now: float) -> str:
    state = ""
    for _ in range(times):
        state = await breakers.record(model, False, CONFIG, now=now)
    return state


async def test_consecutive_failures_open_then_skip(breakers: CircuitBreakers, model: str) -> None:
    assert await fail(breakers, model, 2, now=1000) == "closed"
    assert await breakers.permission(model, CONFIG, now=1000) == "allow"
    assert await fail(breakers, model, 1, now=1000) == "open"
    assert await breakers.permission(model, CONFIG, now=1010) == "skip"
    assert await breakers.cooldown_left_s(model, CONFIG, now=1010) == pytest.approx(20)


async def test_a_success_resets_the_consecutive_count(breakers: CircuitBreakers, model: str) -> None:
    await fail(breakers, model, 2, now=1000)
    await breakers.record(model, True, CONFIG, now=1000)
    assert await fail(breakers, model, 2, now=1000) == "closed"


async def test_half_open_probe_success_closes(breakers: CircuitBreakers, model: str) -> None:
    await fail(breakers, model, 3, now=1000)
    assert await breakers.permission(model, CONFIG, now=1030) == "probe"
    assert await breakers.permission(model, CONFIG, now=1030) == "skip"  # one probe at a time
    assert await breakers.record(model, True, CONFIG, now=1031) == "closed"
    assert await breakers.permission(model, CONFIG, now=1031) == "allow"


async def test_half_open_probe_failure_reopens(breakers: CircuitBreakers, model: str) -> None:
    await fail(breakers, model, 3, now=1000)
    assert await breakers.permission(model, CONFIG, now=1030) == "probe"
    assert await breakers.record(model, False, CONFIG, now=1031) == "open"
    assert await breakers.permission(model, CONFIG, now=1040) == "skip"
    assert await breakers.permission(model, CONFIG, now=1061) == "probe"


async def test_error_rate_opens_without_consecutive_failures(breakers: CircuitBreakers, model: str) -> None:
    state = "closed"
    for i in range(10):  # alternate: never 3 in a row; 5 of 10 fail, the last call succeeding
        state = await breakers.record(model, i % 2 == 1, CONFIG, now=1000 + i)
    assert state == "closed"
    assert await breakers.record(model, False, CONFIG, now=1011) == "open"  # 6 of 11: over the rate


async def test_error_rate_window_rolls_over(breakers: CircuitBreakers, model: str) -> None:
    for i in range(8):
        await breakers.record(model, i % 2 == 1, CONFIG, now=1000)
    for i in range(4):  # a new window: the old failures no longer count
        assert await breakers.record(model, i % 2 == 1, CONFIG, now=1100) == "closed"


async def test_disabled_breaker_always_allows(breakers: CircuitBreakers, model: str) -> None:
    off = CircuitBreakerConfig(enabled=False, failure_threshold=1)
    await breakers.record(model, False, off, now=1000)
    assert await breakers.permission(model, off, now=1000) == "allow"


async def test_two_gateway_replicas_share_one_circuit(valkey_url: str, model: str) -> None:
    a, b = CircuitBreakers(redis_client(valkey_url)), CircuitBreakers(redis_client(valkey_url))
    await fail(a, model, 2, now=1000)
    assert await fail(b, model, 1, now=1000) == "open"
    assert await a.permission(model, CONFIG, now=1001) == "skip"


async def test_a_replica_trusts_a_closed_circuit_for_state_cache_s(valkey_url: str, model: str) -> None:
    """Healthy traffic asks Redis at most once per ``state_cache_s``; another replica's opening reaches it then."""
    a, b = CircuitBreakers(redis_client(valkey_url)), CircuitBreakers(redis_client(valkey_url))
    cached = CONFIG.model_copy(update={"state_cache_s": 5.0})
    assert await a.permission(model, cached, now=1000) == "allow"  # asked Redis: closed
    assert await fail(b, model, 3, now=1001) == "open"
    assert await a.permission(model, cached, now=1004) == "allow"  # within 5 s of its last sight
    assert await a.permission(model, cached, now=1005.5) == "skip"  # asked again: open
    uncached = CONFIG.model_copy(update={"state_cache_s": 0.0})
    other = f"{model}-b"
    assert await a.permission(other, uncached, now=1000) == "allow"
    assert await fail(b, other, 3, now=1000) == "open"
    assert await a.permission(other, uncached, now=1000) == "skip"  # 0: every call asks


async def stored(breakers: CircuitBreakers, model: str, field: str) -> int:
    return int((await breakers.state(model)).get(field, 0))


async def test_successes_on_a_trusted_circuit_go_to_redis_together(breakers: CircuitBreakers, model: str) -> None:
    """A healthy upstream costs one script per ``state_cache_s``, not one per call; the count arrives whole."""
    cached = CONFIG.model_copy(update={"state_cache_s": 0.3})
    now = time.time()
    assert await breakers.permission(model, cached, now=now) == "allow"  # seen closed: trusted for 0.3 s
    for _ in range(10):
        assert await breakers.record(model, True, cached, now=now) == "closed"
    assert await stored(breakers, model, "calls") == 0  # counted here, not sent yet
    deadline = time.monotonic() + 5
    while await stored(breakers, model, "calls") < 10 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert await stored(breakers, model, "calls") == 10


async def test_a_failure_carries_the_successes_before_it(breakers: CircuitBreakers, model: str) -> None:
    cached = CONFIG.model_copy(update={"state_cache_s": 60.0})
    assert await breakers.record(model, False, cached, now=1000) == "closed"  # consecutive 1; seen closed
    for _ in range(3):
        await breakers.record(model, True, cached, now=1001)
    assert await stored(breakers, model, "calls") == 1
    assert await breakers.record(model, False, cached, now=1002) == "closed"
    state = await breakers.state(model)
    assert (state["calls"], state["failures"], state["consecutive"]) == ("5", "2", "1")  # reset by the successes


async def test_close_sends_the_successes_still_counted(valkey_url: str, model: str) -> None:
    breakers = CircuitBreakers(redis_client(valkey_url))
    cached = CONFIG.model_copy(update={"state_cache_s": 60.0})
    assert await breakers.permission(model, cached, now=1000) == "allow"
    await breakers.record(model, True, cached, now=1000)
    await breakers.record(model, True, cached, now=1000)
    await breakers.close()
    assert await stored(breakers, model, "calls") == 2


async def test_without_a_state_cache_every_success_is_sent(breakers: CircuitBreakers, model: str) -> None:
    uncached = CONFIG.model_copy(update={"state_cache_s": 0.0})
    assert await breakers.permission(model, uncached, now=1000) == "allow"
    await breakers.record(model, True, uncached, now=1000)
    assert await stored(breakers, model, "calls") == 1
