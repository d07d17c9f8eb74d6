"""Guard's picklable answers and the sliding-window arithmetic behind them.

Rate limits use a sliding-window counter: per key and epoch minute, Redis keeps
the admitted requests and tokens; a request at ``elapsed`` seconds into minute
``m`` sees ``previous * (1 - elapsed / 60) + current`` as the key's usage over
the last 60 seconds. Within a minute that follows an idle one this is an exact
count; otherwise it assumes the previous minute's traffic was spread evenly,
which never lets more than the limit through within a minute and rarely more
than it over any 60 seconds.

The answers carry OpenAI's rate-limit headers
(https://platform.openai.com/docs/guides/rate-limits#rate-limits-in-headers):
``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``, the resets as Go-style
durations ("12ms", "17.5s", "1m0s"). ``reset`` is the time until the key's usage
is back to zero, its initial state.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from serve_app.errors import RateLimitError

WINDOW_S = 60
Reason = Literal["rate_requests", "rate_tokens", "blocked", "flood"]
_EPS = 1e-9


class GuardDecision(BaseModel):
    """The answer to ``Guard.check``: whether the request may go on, and the key's rate-limit state.

    The ``*_requests``/``*_tokens`` trios are None for a limit the plan does not set.
    """

    allowed: bool
    reason: Reason | None = Field(None, description="Which limit or block rejected the request.")
    checked_at: float = Field(description="The check's clock (epoch s); give it to Guard.record_tokens.")
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = Field(None, description="Seconds until the key's request usage is zero.")
    used_requests: int = Field(0, description="Requests counted in the last minute, this one excluded.")
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = Field(None, description="Seconds until the key's token usage is zero.")
    used_tokens: int = Field(0, description="Tokens counted in the last minute, this request's excluded.")
    requested_tokens: int = 0
    retry_after_s: float | None = Field(
        None, description="Seconds until a retry can pass; None when allowed, or when the request can never fit."
    )
    blocked_until: float | None = Field(None, description="End of the key's block (epoch s), when blocked.")

    def headers(self) -> dict[str, str]:
        """Return the ``x-ratelimit-*`` headers, for allowed responses and 429s alike."""
        headers: dict[str, str] = {}
        if self.limit_requests is not None:
            headers["x-ratelimit-limit-requests"] = str(self.limit_requests)
            headers["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            headers["x-ratelimit-reset-requests"] = format_duration(self.reset_requests_s or 0.0)
        if self.limit_tokens is not None:
            headers["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            headers["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            headers["x-ratelimit-reset-tokens"] = format_duration(self.reset_tokens_s or 0.0)
        return headers

    def to_error(self) -> RateLimitError | None:
        """Return the 429 for a rejected request (None when allowed).

        The error carries the ``x-ratelimit-*`` headers, and ``retry-after`` (whole
        seconds, at least 1) with ``retry-after-ms`` (which the OpenAI SDKs prefer)
        whenever waiting helps.
        """
        if self.allowed:
            return None
        headers = self.headers()
        wait = ""
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s - _EPS)))
            headers["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000 - _EPS)))
            wait = f" Please try again in {format_duration(self.retry_after_s)}."
        if self.reason == "rate_requests":
            message = (f"Rate limit reached for requests per minute (RPM): Limit {self.limit_requests}, "
                       f"Used {self.used_requests}, Requested 1.{wait}")
        elif self.reason == "rate_tokens" and self.retry_after_s is None:
            message = (f"Request too large for tokens per minute (TPM): Limit {self.limit_tokens}, "
                       f"Requested {self.requested_tokens}. Reduce the prompt or max_tokens.")
        elif self.reason == "rate_tokens":
            message = (f"Rate limit reached for tokens per minute (TPM): Limit {self.limit_tokens}, "
                       f"Used {self.used_tokens}, Requested {self.requested_tokens}.{wait}")
        elif self.reason == "flood":
            message = f"This API key is temporarily blocked for sending too many requests at once.{wait}"
        else:
            message = f"This API key is temporarily blocked.{wait}"
        return RateLimitError(message, headers=headers)


class Block(BaseModel):
    """A key blocked until ``until`` (GET /admin/blocks)."""

    key_id: str
    reason: str = Field(description="flood, anomaly, or what an admin gave.")
    until: float = Field(description="Epoch seconds; requests are rejected until then.")
    created_at: float = Field(description="Epoch seconds.")

    def entry(self) -> str:
        """Return the Redis form ``until|created|reason`` (the script reads the leading number)."""
        return f"{self.until!r}|{self.created_at!r}|{self.reason}"

    @classmethod
    def from_entry(cls, key_id: str, entry: str) -> "Block":
        """Parse the Redis form written by ``entry``."""
        until, created, reason = entry.split("|", 2)
        return cls(key_id=key_id, reason=reason, until=float(until), created_at=float(created))


class Anomaly(BaseModel):
    """A key whose last full minute stood out from its own history (Guard.anomalies)."""

    key_id: str
    minute_start: float = Field(description="Start of the scored minute, epoch seconds.")
    requests: int = Field(description="Attempts in the scored minute.")
    mean: float = Field(description="Mean attempts per minute over the history.")
    stddev: float = Field(description="Standard deviation of the history (before the min_stddev floor).")
    z_score: float
    blocked: bool = Field(False, description="Whether the key was blocked for it (action: block).")


def format_duration(seconds: float) -> str:
    """Format a duration as OpenAI's headers do (Go style): "0s", "250ms", "12s", "17.5s", "1m0s", "1h2m3s".

    Rounded up to the millisecond, so a client that waits this long is never early.
    """
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def usage(previous: int, current: int, elapsed_s: float) -> float:
    """Return the sliding-window usage at ``elapsed_s`` into the current minute."""
    return previous * (1 - elapsed_s / WINDOW_S) + current


def remaining(limit: int, previous: int, current: int, elapsed_s: float) -> int:
    """Return how much of ``limit`` is left (whole units, never negative)."""
    return max(0, math.floor(limit - usage(previous, current, elapsed_s) + _EPS))


def reset_s(previous: int, current: int, elapsed_s: float) -> float:
    """Return the seconds until the usage is zero: the current minute must also age out."""
    if current > 0:
        return 2 * WINDOW_S - elapsed_s
    if previous > 0:
        return WINDOW_S - elapsed_s
    return 0.0


def wait_s(limit: int, cost: int, previous: int, current: int, elapsed_s: float) -> float | None:
    """Return the seconds until ``cost`` more fits under ``limit`` with no other traffic.

    Returns:
        0 when it fits now; None when it never fits (``cost > limit``).
    """
    if cost > limit:
        return None
    if usage(previous, current, elapsed_s) + cost <= limit + _EPS:
        return 0.0
    if current + cost <= limit:  # fits once enough of the previous minute has slid out
        at = WINDOW_S * (1 - (limit - current - cost) / previous)
        return max(0.0, at - elapsed_s)
    # The current minute becomes the previous one, and must slide out in turn.
    at = WINDOW_S * (1 - (limit - cost) / current)
    return WINDOW_S - elapsed_s + max(0.0, at)
