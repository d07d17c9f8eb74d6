"""Backoff with full jitter, Retry-After, and what is retryable."""

from __future__ import annotations

import random

import pytest

from serve_app.config import RetryConfig
from serve_app.errors import InvalidRequestError, UpstreamError, UpstreamTimeoutError, UpstreamUnavailableError
from serve_app.retry import backoff_s, is_retryable, next_delay_s, retry_after_s

POLICY = RetryConfig(max_attempts=5, initial_backoff_s=0.1, max_backoff_s=0.5)


@pytest.mark.parametrize("retry_number,cap", [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.5), (9, 0.5)])
def test_backoff_stays_within_the_exponential_cap(retry_number: int, cap: float) -> None:
    rng = random.Random(7)
    delays = [backoff_s(retry_number, POLICY, rng) for _ in range(2000)]
    assert all(0.0 <= d < cap for d in delays)
    assert max(delays) > 0.9 * cap and min(delays) < 0.1 * cap  # full jitter spans the whole range


def test_retry_after_replaces_backoff_and_is_case_insensitive() -> None:
    error = UpstreamUnavailableError("limited", headers={"Retry-After": "2"})
    assert retry_after_s(error) == 2.0
    assert next_delay_s(error, 0, POLICY) == 2.0


def test_too_long_retry_after_moves_on() -> None:
    error = UpstreamUnavailableError("limited", headers={"retry-after": "120"})
    assert next_delay_s(error, 0, RetryConfig(max_retry_after_s=30)) is None


def test_attempt_budget_is_respected() -> None:
    error = UpstreamTimeoutError("slow")
    assert next_delay_s(error, 3, POLICY) is not None
    assert next_delay_s(error, 4, POLICY) is None


@pytest.mark.parametrize("error,retryable", [
    (UpstreamUnavailableError("x"), True), (UpstreamTimeoutError("x"), True),
    (InvalidRequestError("x"), False), (UpstreamError("x"), False),
])
def test_only_upstream_availability_failures_are_retryable(error: Exception, retryable: bool) -> None:
    assert is_retryable(error) is retryable  # type: ignore[arg-type]
    assert (next_delay_s(error, 0, POLICY) is not None) is retryable  # type: ignore[arg-type]
