"""The ``alerts`` section of the config: threshold rules, the webhook and its retries."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, field_validator

from serve_app.config_base import BaseConfig

__all__ = ["AlertRule", "AlertsConfig"]

Metric = Literal["error_rate", "latency_p95_ms", "cost_per_request_usd", "budget_spent_fraction"]


class AlertRule(BaseConfig):
    """One threshold: fire when ``metric`` over the last ``window_s`` is above ``above``."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Names the rule in alerts and their ids.")
    metric: Metric = Field(description="error_rate (0..1), latency_p95_ms, cost_per_request_usd, "
                                       "budget_spent_fraction (the most spent matching budget, 0..1+).")
    above: NonNegativeFloat = Field(description="Fires when the value is strictly above this.")
    window_s: PositiveInt = Field(300, description="Trailing window of ledger requests (traffic metrics).")
    min_requests: NonNegativeInt = Field(
        10, description="Fewer requests in the window: too little traffic to judge, the rule does not fire.")
    budget_id: str | None = Field(None, description="budget_spent_fraction: one budget; None: any budget.")


class AlertsConfig(BaseConfig):
    """Threshold rules, where alerts go and how hard raygate tries to deliver them."""

    webhook_url: str | None = Field(None, description="http(s) URL alerts are POSTed to; None only stores them.")
    webhook_timeout_s: PositiveFloat = Field(5.0, description="One POST, connection to answer.")
    max_attempts: PositiveInt = Field(5, description="POSTs per alert, the first included.")
    backoff_s: NonNegativeFloat = Field(1.0, description="Wait before the first retry; doubles each retry.")
    max_backoff_s: NonNegativeFloat = Field(60.0, description="Longest wait between retries.")
    keep_last: PositiveInt = Field(1000, description="Alerts kept in Redis; older ones are dropped.")
    rules: list[AlertRule] = Field(default_factory=list, description="Threshold alerts, checked periodically.")
    evaluate_interval_s: NonNegativeFloat = Field(
        60.0, description="How often one Gateway replica does the periodic work (alert rules, the anomaly scan, "
                          "experiments' promotion, budget gauges); 0: never.")

    @field_validator("webhook_url")
    @classmethod
    def _check_url(cls, url: str | None) -> str | None:
        if url is not None and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc):
            raise ValueError("webhook_url must be an http(s) URL")
        return url

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: list[AlertRule]) -> list[AlertRule]:
        names = [r.name for r in rules]
        if len(names) != len(set(names)):
            raise ValueError("alert rule names must be unique")
        return rules
