"""Guard's configuration: per-plan rate limits, flood and anomaly detection, request size limits.

These models hang under ``GatewayConfig.guard``. Rate limits are per API key and
per minute, enforced cluster-wide by ``deployments.guard.Guard`` (a sliding
window over Redis counters); ``None`` means unlimited.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from serve_app.config_base import BaseConfig, PlanTable

AnomalyAction = Literal["alert", "block"]
InjectionAction = Literal["flag", "block", "off"]


class RateLimitConfig(BaseConfig):
    """One plan's per-key limits, counted over a sliding minute."""

    requests_per_minute: PositiveInt | None = Field(
        None, description="Requests a key may make per minute; None is unlimited."
    )
    tokens_per_minute: PositiveInt | None = Field(
        None,
        description="Tokens (prompt estimate + max output tokens, corrected to real usage after the call) a key "
        "may use per minute; None is unlimited.",
    )


class GuardPlansConfig(PlanTable):
    """One ``RateLimitConfig`` per plan an API key can carry (``serve_app.auth.Plan``)."""

    free: RateLimitConfig = Field(
        default_factory=lambda: RateLimitConfig(requests_per_minute=20, tokens_per_minute=20_000)
    )
    premium: RateLimitConfig = Field(
        default_factory=lambda: RateLimitConfig(requests_per_minute=120, tokens_per_minute=200_000)
    )
    enterprise: RateLimitConfig = Field(default_factory=RateLimitConfig)



class FloodConfig(BaseConfig):
    """Blocks a key whose short-term request rate jumps far above its own usual rate.

    Every attempt that is not already blocked counts (rate-limited ones too: hammering
    a 429 is the pattern this catches). A key's baseline is an exponentially weighted
    average of its attempts per ``window_s``; a window whose count reaches
    ``min_requests`` and exceeds ``factor`` times the baseline blocks the key. The
    floor is raised to the plan's ``requests_per_minute`` + 1 where that is higher, so
    a client that stays within its rate limit is never taken for a flood.
    """

    enabled: bool = Field(True, description="Count attempts and block floods.")
    window_s: PositiveInt = Field(10, description="Length of the short window a burst is counted in, in seconds.")
    factor: PositiveFloat = Field(10.0, description="A window's count over this multiple of the baseline is a flood.")
    min_requests: PositiveInt = Field(
        100, description="Attempts in one window below which nothing is a flood (the floor for keys with no history)."
    )
    baseline_half_life_s: PositiveFloat = Field(
        600.0, description="Half-life of the baseline average, in seconds: how fast a key's usual rate adapts."
    )
    block_s: PositiveInt = Field(300, description="How long a flooding key stays blocked, in seconds.")

    @model_validator(mode="after")
    def _check_half_life(self) -> "FloodConfig":
        if self.baseline_half_life_s < self.window_s:
            raise ValueError("guard.flood: baseline_half_life_s must be at least window_s")
        return self


class AnomalyConfig(BaseConfig):
    """Flags keys whose last full minute is far outside their own recent per-minute history.

    ``Guard.anomalies`` scores each key active in the last full minute: the z-score of
    that minute's attempts against the ``history_minutes`` before it (minutes without
    traffic count as zero).
    """

    enabled: bool = Field(True, description="Keep per-minute history long enough to score anomalies.")
    history_minutes: int = Field(
        30, ge=2, le=1440, description="Minutes of history a key's last minute is compared to."
    )
    z_threshold: PositiveFloat = Field(4.0, description="z-scores at or above this are anomalies.")
    min_requests: PositiveInt = Field(30, description="A minute with fewer attempts is never an anomaly.")
    min_stddev: PositiveFloat = Field(
        1.0, description="Floor on the history's standard deviation, so a flat history gives a finite z-score."
    )
    action: AnomalyAction = Field("alert", description="alert: report only; block: also block the key for block_s.")
    block_s: PositiveInt = Field(
        900, description="How long an anomalous key is blocked when action is block, in seconds."
    )


class InjectionConfig(BaseConfig):
    """Prompt-injection detection (``deployments.injection``): patterns and similarity to known attacks."""

    enabled: bool = Field(True, description="Inspect the user's text of every chat request.")
    action: InjectionAction = Field(
        "flag", description="flag: answer, with x-raygate-flags and the ledger row marked; block: 400 "
        "prompt_rejected naming the rule; off: skip.")
    tenant_actions: dict[str, InjectionAction] = Field(default_factory=dict, description="Per-tenant action.")
    patterns: bool = Field(True, description="Run the pattern rules.")
    embedding: bool = Field(
        False, description="Also compare with known attack prompts through the Embedder: one Embedder call per "
        "chat request; with all-MiniLM-L6-v2 it added no recall over the patterns (bench.injection), so it is "
        "off unless turned on, e.g. with a multilingual model or an operator's own attacks_file.")
    similarity_threshold: float = Field(
        0.85, gt=0, le=1, description="Cosine similarity to a known attack that flags a chunk (bench.injection).")
    attacks_file: str | None = Field(None, description="More known attack prompts, one per line, added to the shipped list.")
    chunk_chars: PositiveInt = Field(300, description="User text is compared in chunks of about this many characters...")
    max_chunks: PositiveInt = Field(8, description="...the last this many of them.")


class GuardConfig(BaseConfig):
    """Rate limits, abuse detection and request size limits, checked before any other work."""

    plans: GuardPlansConfig = Field(default_factory=GuardPlansConfig)
    flood: FloodConfig = Field(default_factory=FloodConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    injection: InjectionConfig = Field(default_factory=InjectionConfig)
    max_messages: PositiveInt | None = Field(256, description="Messages one chat request may carry; None is unlimited.")
    max_content_chars: PositiveInt | None = Field(
        400_000, description="Characters of message content one chat request may carry, all messages together."
    )
    redis_max_connections: PositiveInt = Field(
        64, description="Connections per Guard instance; callers past this wait instead of failing."
    )

    def counter_ttl_s(self) -> int:
        """Return how long a key's per-minute counters live, in seconds.

        Two minutes serve the sliding window; anomaly scoring needs the whole history
        and the minute being scored.
        """
        minutes = self.anomaly.history_minutes + 2 if self.anomaly.enabled else 2
        return (minutes + 1) * 60
