"""Retry decisions: what may be retried, and how long to wait before the next call."""

from __future__ import annotations

import random

from serve_app.config import RetryConfig
from serve_app.errors import RaygateError, UpstreamUnavailableError

RETRY_AFTER_HEADER = "retry-after"


def is_retryable(error: RaygateError) -> bool:
    """Rate limits, 5xx, timeouts and connection failures are; client errors never are."""
    return isinstance(error, UpstreamUnavailableError)


def retry_after_s(error: RaygateError) -> float | None:
    """Return the upstream's Retry-After in seconds, if it sent a numeric one."""
    value = next((v for k, v in error.headers.items() if k.lower() == RETRY_AFTER_HEADER), None)
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def backoff_s(retry_number: int, policy: RetryConfig, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, initial * 2**n)).

    Full jitter spreads retries of many clients hit by the same outage, so they do
    not all come back at once (the "thundering herd").

    Args:
        retry_number: 0 for the first retry.
        policy: the model's retry settings.
        rng: a random source (tests pass a seeded one).
    """
    cap = min(policy.max_backoff_s, policy.initial_backoff_s * (2**retry_number))
    return (rng or random).uniform(0.0, cap)


def next_delay_s(error: RaygateError, retry_number: int, policy: RetryConfig,
                 rng: random.Random | None = None) -> float | None:
    """Return how long to wait before retrying the same model, or None to stop retrying it.

    Retry-After, when given, replaces the backoff; one longer than
    ``max_retry_after_s`` means moving on to the fallback instead of waiting.
    """
    if not is_retryable(error) or retry_number + 1 >= policy.max_attempts:
        return None
    after = retry_after_s(error)
    if after is not None:
        return after if after <= policy.max_retry_after_s else None
    return backoff_s(retry_number, policy, rng)
