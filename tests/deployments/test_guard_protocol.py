"""Guard's sliding-window arithmetic and its OpenAI-style header formats, without Redis."""

from __future__ import annotations

import pytest

from deployments.guard_protocol import Block, GuardDecision, format_duration, remaining, reset_s, usage, wait_s


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (-3, "0s"), (0.0004, "1ms"), (0.25, "250ms"), (0.9999, "1s"), (1, "1s"), (12, "12s"),
    (17.28, "17.28s"), (59.5, "59.5s"), (60, "1m0s"), (90.5, "1m30.5s"), (119.9999, "2m0s"), (3723, "1h2m3s"),
])
def test_format_duration_is_go_style_rounded_up(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_usage_weights_the_previous_minute_by_what_is_left_of_it() -> None:
    assert usage(10, 3, 0) == 13
    assert usage(10, 3, 30) == 8
    assert remaining(20, 10, 3, 30) == 12
    assert remaining(5, 10, 3, 30) == 0


@pytest.mark.parametrize(
    ("previous", "current", "elapsed", "expected"), [(0, 0, 10, 0), (5, 0, 10, 50), (5, 1, 10, 110)]
)
def test_reset_is_when_usage_is_back_to_zero(previous: int, current: int, elapsed: float, expected: float) -> None:
    assert reset_s(previous, current, elapsed) == expected


@pytest.mark.parametrize(("limit", "cost", "previous", "current", "elapsed", "expected"), [
    (20, 1, 0, 5, 10, 0.0),  # fits now
    (20, 1, 20, 0, 0, 3.0),  # the previous minute must slide out by 1/20
    (20, 1, 20, 10, 6, 60 * (1 - 9 / 20) - 6),
    (20, 1, 0, 20, 15, 48.0),  # the current minute must become the previous one, then slide
    (1000, 500, 0, 600, 15, 55.0),
    (1000, 1001, 0, 0, 0, None),  # never fits
])
def test_wait_is_the_first_moment_the_cost_fits(
    limit: int, cost: int, previous: int, current: int, elapsed: float, expected: float | None
) -> None:
    wait = wait_s(limit, cost, previous, current, elapsed)
    assert wait == (None if expected is None else pytest.approx(expected))


def test_unlimited_decisions_have_no_headers_and_allowed_ones_no_error() -> None:
    decision = GuardDecision(allowed=True, checked_at=0.0)
    assert decision.headers() == {} and decision.to_error() is None


def test_a_flood_error_says_why_and_when() -> None:
    decision = GuardDecision(allowed=False, reason="flood", checked_at=0.0, retry_after_s=299.2, blocked_until=299.2)
    error = decision.to_error()
    assert error is not None and error.status_code == 429
    assert error.headers == {"retry-after": "300", "retry-after-ms": "299200"}
    assert error.message == ("This API key is temporarily blocked for sending too many requests at once. "
                             "Please try again in 4m59.2s.")


def test_block_entries_round_trip_reasons_with_separators() -> None:
    block = Block(key_id="k", reason="a|b", until=1736942460.123456, created_at=1736942400.5)
    assert Block.from_entry("k", block.entry()) == block
