"""``evaluation``: answers scored by a judge model against a rubric (LLM-as-judge), see ``serve_app.judging``."""

from __future__ import annotations

from typing import get_args

from pydantic import Field, PositiveInt, model_validator

from serve_app.config_base import BaseConfig
from serve_app.router_config import Category

DEFAULT_RUBRIC = """Score the answer from 1 to 5 on three criteria taken together:
- helpfulness: does it address what the user asked, completely and to the point?
- correctness: is everything it states true, with no invented facts or wrong reasoning?
- clarity: is it well organised and easy to follow for this user?
5 = excellent on all three; 4 = good, minor issues; 3 = acceptable but incomplete or unclear;
2 = mostly unhelpful or partly wrong; 1 = wrong, off-topic or harmful."""


class EvaluationConfig(BaseConfig):
    """Scoring answers with a judge model (``judge_model`` unset: off)."""

    judge_model: str | None = Field(None, description="The configured model that judges; None turns evaluation off.")
    rubric: str = Field(DEFAULT_RUBRIC, min_length=1, max_length=8000, description="What the judge scores against.")
    sample_rate: float = Field(0.0, ge=0, le=1, description="Share of successful answers scored, off the client's path.")
    tenant_sample_rates: dict[str, float] = Field(
        default_factory=dict, description="sample_rate per tenant (0..1), overriding the global one.")
    sync_routes: list[str] = Field(
        default_factory=list, description="Models (requested or answering) or router categories whose non-streamed "
                                          "answers are judged before they are sent, and retried once when poor.")
    stronger_model: dict[str, str] = Field(
        default_factory=dict, description="Answering model -> the model that retries a poorly scored answer.")
    retry_below: int = Field(3, ge=1, le=6, description="A sync-route score under this triggers the retry.")
    judge_max_tokens: PositiveInt = Field(200, description="The judge's output budget.")
    max_chars: PositiveInt = Field(8000, description="Question and answer are cut to this many characters each.")

    @model_validator(mode="after")
    def _check_rates(self) -> "EvaluationConfig":
        bad = sorted(t for t, rate in self.tenant_sample_rates.items() if not 0 <= rate <= 1)
        if bad:
            raise ValueError(f"evaluation.tenant_sample_rates: rates must be within 0..1 (tenants {bad})")
        return self

    def check_models(self, names: list[str]) -> None:
        """Raise ValueError when the section names a model that is not configured (called by GatewayConfig)."""
        enabled = self.judge_model is not None
        if not enabled and (self.sample_rate or self.tenant_sample_rates or self.sync_routes):
            raise ValueError("evaluation: sample_rate, tenant_sample_rates and sync_routes need a judge_model")
        if enabled and self.judge_model not in names:
            raise ValueError(f"evaluation.judge_model: unknown model '{self.judge_model}'")
        unknown = sorted({*self.stronger_model, *self.stronger_model.values()} - set(names))
        if unknown:
            raise ValueError(f"evaluation.stronger_model: unknown models {unknown}")
        same = sorted(m for m, s in self.stronger_model.items() if m == s)
        if same:
            raise ValueError(f"evaluation.stronger_model: a model cannot retry with itself {same}")
        unknown = sorted(set(self.sync_routes) - set(names) - set(get_args(Category)) - {"auto"})
        if unknown:
            raise ValueError(f"evaluation.sync_routes: neither models nor router categories {unknown}")
