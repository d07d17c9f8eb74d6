"""The Router: ``model: "auto"`` becomes a route plan — category, domain, model, fallbacks, reason.

Two classifiers, chosen in config and combinable: the rules (``deployments.router_rules``)
and an embedding classifier, a similarity-weighted k-nearest-neighbours vote over
labelled examples embedded once through the Embedder. With both, the rules decide
when they are sure and the examples otherwise; the domain comes from the rules'
subject cues, else from the examples. Classifications are cached in Redis by a hash
of the text, so a repeated question costs one GET. Runs embedded in the Gateway (the
rules and Redis need no hop; the Embedder is reached only for texts not yet seen).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import redis.exceptions
from pydantic import BaseModel, Field

from ray.serve.handle import DeploymentHandle

from deployments.router_rules import classify_rules
from serve_app.constants import EMBEDDER_CALL_TIMEOUT_S
from serve_app.placement import Placed
from serve_app.router_config import RouterConfig
from serve_app.stores import redis_client

logger = logging.getLogger(__name__)

SHIPPED_EXAMPLES = Path(__file__).parent / "data" / "routing_examples.jsonl"
GENERAL = "general"


class Classification(BaseModel):
    """What a request asks (category) and what it is about (domain), and why the router thinks so."""

    category: str
    domain: str = GENERAL
    classifier: str = Field(description="rules, embedding, default, or cache:<one of those>.")
    reason: str = ""
    neighbours: list[dict[str, Any]] = Field(default_factory=list, description="embedding: the nearest examples.")


class RoutePlan(BaseModel):
    """The model chosen for a request, with its fallbacks and how it was chosen (ledger, headers)."""

    model: str
    fallbacks: list[str] = Field(default_factory=list)
    classification: Classification

    def header(self) -> str:
        """``x-raygate-route``: ``<category>/<model>``."""
        return f"{self.classification.category}/{self.model}"


def load_examples(path: str | None) -> list[dict[str, str]]:
    """The labelled examples (JSONL with text, category and domain)."""
    with open(path or SHIPPED_EXAMPLES, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Router:
    """Classifies requests and picks their model from the tier table.

    Args:
        config: classifiers, tiers and domains.
        redis_url: where classifications are cached.
        embedder: the Embedder: its handle, or an object with the same async ``embed`` (tests).
        key_prefix: namespace of the cache keys.
    """

    def __init__(self, config: RouterConfig, redis_url: str, embedder: Any, *,
                 key_prefix: str = "raygate:route") -> None:
        self.config = config
        self.redis = redis_client(redis_url)
        placed = embedder if isinstance(embedder, Placed) or embedder is None else Placed(
            "Embedder", embedder, remote=isinstance(embedder, DeploymentHandle), timeout_s=EMBEDDER_CALL_TIMEOUT_S)
        self.embedder = placed if "embedding" in config.classifiers else None
        self.prefix = key_prefix
        self._examples = load_examples(config.examples_file) if self.embedder else []
        self._matrix: np.ndarray | None = None

    async def route(self, text: str, tenant: str, fallbacks: dict[str, list[str]]) -> RoutePlan:
        """The route plan of a request whose last user turn is ``text``."""
        classification = await self.classify(text)
        tiers = {**self.config.tiers, **self.config.tenant_tiers.get(tenant, {})}
        model = self.config.domains.get(classification.domain) or tiers.get(classification.category)
        if model is None:  # a tier table without this category: the default category's model
            model = tiers.get(self.config.default_category) or next(iter(tiers.values()))
        return RoutePlan(model=model, fallbacks=fallbacks.get(model, []), classification=classification)

    async def classify(self, text: str, *, use_cache: bool = True) -> Classification:
        """Classify a text: from the cache, else the configured classifiers (then cached)."""
        key = f"{self.prefix}:{hashlib.sha256(text.encode()).hexdigest()}"
        if use_cache and (cached := await self._cached(key)) is not None:
            return cached.model_copy(update={"classifier": f"cache:{cached.classifier}"})
        result = await self._classify(text)
        if not use_cache:
            return result
        try:
            await self.redis.set(key, result.model_dump_json(exclude={"neighbours"}), ex=self.config.cache_ttl_s)
        except redis.exceptions.RedisError as exc:
            logger.warning("Route cache unavailable: %s", type(exc).__name__)
        return result

    async def close(self) -> None:
        await self.redis.aclose()

    # -- helpers -------------------------------------------------------------------------------

    async def _cached(self, key: str) -> Classification | None:
        try:
            raw = await self.redis.get(key)
        except redis.exceptions.RedisError:
            return None
        return Classification.model_validate_json(raw) if raw else None

    async def _classify(self, text: str) -> Classification:
        rules = classify_rules(text, self.config.rules_margin) if "rules" in self.config.classifiers else None
        if rules is not None and rules.category is not None:
            return Classification(category=rules.category, domain=rules.domain or GENERAL, classifier="rules",
                                  reason=f"cues {', '.join(rules.matched)}; scores {rules.scores}")
        if self.embedder is not None:
            knn = await self._knn(text)
            if rules is not None and rules.domain:
                knn.domain = rules.domain
            return knn
        domain = rules.domain if rules is not None and rules.domain else GENERAL
        return Classification(category=self.config.default_category, domain=domain, classifier="default",
                              reason="no classifier was sure")

    async def _knn(self, text: str) -> Classification:
        """A similarity-weighted vote of the k nearest labelled examples."""
        matrix = await self._example_vectors()
        vectors, _ = await self.embedder("embed", [text])  # type: ignore[misc]
        sims = matrix @ np.asarray(vectors[0], dtype=np.float32)
        nearest = np.argsort(-sims)[: self.config.neighbours]
        votes: dict[str, float] = defaultdict(float)
        domains: dict[str, float] = defaultdict(float)
        for i in nearest:
            votes[self._examples[i]["category"]] += float(sims[i])
            domains[self._examples[i].get("domain", GENERAL)] += float(sims[i])
        category = max(votes, key=votes.__getitem__)
        neighbours = [{"text": self._examples[i]["text"][:80], "category": self._examples[i]["category"],
                       "similarity": round(float(sims[i]), 3)} for i in nearest]
        return Classification(category=category, domain=max(domains, key=domains.__getitem__), classifier="embedding",
                              reason=f"{self.config.neighbours} nearest examples vote {dict(votes)}",
                              neighbours=neighbours)

    async def _example_vectors(self) -> np.ndarray:
        if self._matrix is None:
            vectors, _ = await self.embedder("embed", [e["text"] for e in self._examples])  # type: ignore[misc]
            self._matrix = np.asarray(vectors, dtype=np.float32)
        return self._matrix


def route_stats(rows: list[tuple[str | None, str | None, int]]) -> dict[str, Any]:
    """Counts by category and by model from (category, model, count) rows of the ledger."""
    by_category: dict[str, int] = defaultdict(int)
    by_model: dict[str, int] = defaultdict(int)
    for category, model, count in rows:
        by_category[category or "unrouted"] += count
        by_model[model or "none"] += count
    return {"by_category": dict(by_category), "by_model": dict(by_model), "total": sum(by_category.values())}
