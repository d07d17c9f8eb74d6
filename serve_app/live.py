"""Settings ``serve deploy`` changes live: Serve's ``user_config`` on the Gateway, applied by ``reconfigure``.

A change to a deployment's ``user_config`` reaches every running replica through
``reconfigure`` instead of replacing it, so prices, alert rules, the request log and the
graceful-failure message change without a restart and without dropping a request. The
settings apply on top of the application's ``args``; an empty ``user_config`` brings the
``args`` values back.

```yaml
deployments:
  - name: Gateway
    user_config:
      prices: {gpt-4o-mini: {input_price_per_1m_usd: 0.15, output_price_per_1m_usd: 0.6}}
      alert_rules: [{name: errors, metric: error_rate, above: 0.05}]
```
"""

from __future__ import annotations

from pydantic import Field, NonNegativeFloat

from serve_app.alerts_config import AlertRule
from serve_app.config import GatewayConfig
from serve_app.config_base import BaseConfig
from serve_app.request_log import LogsConfig

__all__ = ["LiveSettings", "Price", "apply_live"]


class Price(BaseConfig):
    """A model's prices, replacing the ones in ``args``."""

    input_price_per_1m_usd: NonNegativeFloat
    output_price_per_1m_usd: NonNegativeFloat


class LiveSettings(BaseConfig):
    """What the Gateway's ``user_config`` may set."""

    prices: dict[str, Price] = Field(default_factory=dict, description="Per model name.")
    alert_rules: list[AlertRule] | None = Field(None, description="Replaces alerts.rules.")
    logs: LogsConfig | None = Field(None, description="Replaces logs (the request log).")
    unavailable_message: str | None = Field(None, description="Replaces gateway.unavailable_message.")


def apply_live(config: GatewayConfig, live: LiveSettings) -> GatewayConfig:
    """``config`` with the live settings applied (validated again, so a bad override is refused whole).

    Raises:
        ValueError: a price for a model that is not configured, or an invalid result.
    """
    unknown = sorted(set(live.prices) - {m.name for m in config.models})
    if unknown:
        raise ValueError(f"user_config.prices: unknown models {unknown}")
    data = config.model_dump()
    for model in data["models"]:
        if model["name"] in live.prices:
            model.update(live.prices[model["name"]].model_dump())
    if live.alert_rules is not None:
        data["alerts"]["rules"] = [r.model_dump() for r in live.alert_rules]
    if live.logs is not None:
        data["logs"] = live.logs.model_dump()
    if live.unavailable_message is not None:
        data["gateway"]["unavailable_message"] = live.unavailable_message
    return GatewayConfig.model_validate(data)
