"""The response cache's configuration (``GatewayConfig.cache``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from serve_app.config_base import BaseConfig


def _default_ttls() -> dict[str, int]:
    return {"simple": 3600, "simple_explanation": 3600, "complex": 7200, "complex_reasoning": 7200,
            "deep_analysis": 7200, "quiz": 86_400, "exercise": 86_400, "standard_exercise": 86_400}


class SemanticCacheConfig(BaseConfig):
    """Paraphrase hits: the last user turn's embedding, nearest neighbour within the same scope."""

    enabled: bool = Field(True, description="Look up paraphrases when the exact key misses.")
    threshold: float = Field(
        0.85, gt=0, le=1,
        description="Cosine similarity a neighbour needs (with match: words, chosen for precision >= 0.98 by "
        "bench.semantic_cache).",
    )
    match: Literal["words", "embedding"] = Field(
        "words",
        description="words: the neighbour must also pass the word check of deployments.cache_match (same "
        "numbers; same words in order, or a real rewording); embedding: the threshold alone (far less precise).",
    )
    small_edit_words: int = Field(
        4, ge=0, le=50,
        description="A neighbour differing in 1..this many content words is a different question (words match).")
    candidates: PositiveInt = Field(3, le=20, description="Neighbours over the threshold checked, nearest first.")
    collection: str = Field("raygate_cache", min_length=1, description="Qdrant collection of the vectors.")
    max_text_chars: PositiveInt = Field(
        2000, description="Longer last turns skip the semantic layer (an embedding of a long text says little).")


class CacheConfig(BaseConfig):
    """Exact (Redis) and semantic (Qdrant) response cache."""

    enabled: bool = Field(True, description="Serve and store cached answers.")
    max_entries: PositiveInt = Field(100_000, description="Entries kept; the least recently used go first.")
    default_ttl_s: PositiveInt = Field(3600, description="Lifetime of an entry whose category has no TTL.")
    ttl_s_by_category: dict[str, PositiveInt] = Field(
        default_factory=_default_ttls, description="Lifetime by the request's category (router or header).")
    nondeterministic_tenants: list[str] = Field(
        default_factory=list, description="Tenants whose requests are cached whatever their temperature.")
    nondeterministic_models: list[str] = Field(
        default_factory=list, description="Models whose requests are cached whatever their temperature.")
    semantic: SemanticCacheConfig = Field(default_factory=SemanticCacheConfig)

    def ttl_s(self, category: str | None) -> int:
        """Return an entry's lifetime for the request's category."""
        return self.ttl_s_by_category.get(category or "", self.default_ttl_s)
