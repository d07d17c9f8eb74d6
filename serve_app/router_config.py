"""The router's configuration (``GatewayConfig.router``): classifiers, the tier table, domain models."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from serve_app.config_base import BaseConfig

Category = Literal["simple_explanation", "standard_exercise", "complex_reasoning", "deep_analysis"]
Classifier = Literal["rules", "embedding"]
AUTO_MODEL = "auto"


class RouterConfig(BaseConfig):
    """``model: "auto"`` picks a model by what the request asks (category) and its subject (domain)."""

    classifiers: list[Classifier] = Field(
        default_factory=lambda: ["rules", "embedding"],
        description="rules: keywords, patterns, length, language; embedding: nearest labelled examples. Both: "
        "the rules decide when they are sure, the examples otherwise.")
    tiers: dict[Category, str] = Field(default_factory=dict, description="Category -> model for model: auto.")
    domains: dict[str, str] = Field(
        default_factory=dict, description="Domain -> dedicated model (e.g. a fine-tuned one); wins over the tier.")
    tenant_tiers: dict[str, dict[Category, str]] = Field(
        default_factory=dict, description="A tenant's own tier table (its routing policy), over `tiers`.")
    default_category: Category = Field("simple_explanation", description="When no classifier can tell.")
    examples_file: str | None = Field(
        None, description="Labelled examples (JSONL: text, category, domain) for the embedding classifier; "
        "default the shipped deployments/data/routing_examples.jsonl.")
    neighbours: PositiveInt = Field(7, le=50, description="k of the k-nearest-neighbours vote.")
    rules_margin: PositiveInt = Field(1, description="Rule score lead over the runner-up that counts as sure.")
    cache_ttl_s: PositiveInt = Field(3600, description="How long a text's classification is kept in Redis.")

    def enabled_for(self, tenant: str) -> bool:
        """Whether ``model: auto`` can be routed for this tenant (a tier table exists)."""
        return bool(self.tenant_tiers.get(tenant) or self.tiers)

    def model_names(self) -> set[str]:
        """Every model the router may pick (checked against the configured models)."""
        names = set(self.tiers.values()) | set(self.domains.values())
        return names | {m for table in self.tenant_tiers.values() for m in table.values()}
