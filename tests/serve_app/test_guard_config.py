"""GuardConfig: defaults, strictness, cross-field rules."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.guard_config import GuardConfig


def test_defaults() -> None:
    config = GuardConfig()
    assert (config.plans.free.requests_per_minute, config.plans.free.tokens_per_minute) == (20, 20_000)
    assert (config.plans.premium.requests_per_minute, config.plans.premium.tokens_per_minute) == (120, 200_000)
    assert config.plans.get("enterprise").requests_per_minute is None
    assert config.anomaly.action == "alert" and config.flood.enabled
    assert config.counter_ttl_s() == (30 + 3) * 60


def test_unknown_keys_and_plans_are_refused() -> None:
    with pytest.raises(ValidationError):
        GuardConfig.model_validate({"plans": {"gold": {"requests_per_minute": 1}}})
    with pytest.raises(ValidationError):
        GuardConfig.model_validate({"flood": {"treshold": 3}})
    with pytest.raises(KeyError):
        GuardConfig().plans.get("gold")


@pytest.mark.parametrize("bad", [
    {"plans": {"free": {"requests_per_minute": 0}}},
    {"flood": {"window_s": 60, "baseline_half_life_s": 30}},
    {"anomaly": {"history_minutes": 1}},
    {"anomaly": {"action": "ban"}},
])
def test_invalid_values_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        GuardConfig.model_validate(bad)


def test_counters_live_two_minutes_without_anomaly_scoring() -> None:
    assert GuardConfig.model_validate({"anomaly": {"enabled": False}}).counter_ttl_s() == 180
