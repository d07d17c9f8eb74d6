"""The router on fixed examples: rules, the embedding classifier, both; tiers, domains, tenant policies, cache."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from deployments.router import Router, route_stats
from deployments.router_rules import classify_rules
from serve_app.placement import Placed
from serve_app.router_config import RouterConfig
from tests.conftest import DirectEmbedder

MakeRouter = Callable[..., Router]
TIERS = {"simple_explanation": "small", "standard_exercise": "small", "complex_reasoning": "big",
         "deep_analysis": "big"}


@pytest.fixture
async def make_router(valkey_url: str, direct_embedder: DirectEmbedder) -> AsyncIterator[MakeRouter]:
    made: list[Router] = []

    def make(**settings: Any) -> Router:
        config = RouterConfig.model_validate({"tiers": TIERS, **settings})
        made.append(Router(config, valkey_url, Placed("Embedder", direct_embedder, remote=False),
                           key_prefix=f"test-{uuid.uuid4().hex[:8]}:route"))
        return made[-1]

    yield make
    for router in made:
        await router.close()


@pytest.mark.parametrize(("text", "category"), [
    ("What is photosynthesis?", "simple_explanation"),
    ("Qu'est-ce que la photosynthèse ?", "simple_explanation"),
    ("Solve 3x + 5 = 20.", "standard_exercise"),
    ("Conjugue le verbe aller au présent.", "standard_exercise"),
    ("Prove that the square root of 2 is irrational.", "complex_reasoning"),
    ("Analyse and compare the economic strategies of France and Germany after 1945; discuss the long-term "
     "consequences.", "deep_analysis"),
])
def test_rules_on_fixed_examples(text: str, category: str) -> None:
    assert classify_rules(text, margin=1).category == category


def test_rules_detect_the_poultry_domain_and_say_when_unsure() -> None:
    assert classify_rules("Mes poules pondeuses ont des poux rouges, que faire ?", 1).domain == "poultry"
    assert classify_rules("How do I sort a list in Python?", 1).domain is None
    assert classify_rules("Tell me something nice", 1).category is None


async def test_embedding_classifier_votes_by_neighbours(make_router: MakeRouter) -> None:
    router = make_router(classifiers=["embedding"])
    c = await router.classify("Write an essay comparing the French and American revolutions and their legacies.",
                              use_cache=False)
    assert c.classifier == "embedding" and c.category == "deep_analysis" and len(c.neighbours) == 7
    chicken = await router.classify("Why are my broiler chickens panting in the heat?", use_cache=False)
    assert chicken.domain == "poultry"


async def test_rules_decide_when_sure_examples_otherwise(make_router: MakeRouter) -> None:
    router = make_router()
    assert (await router.classify("Solve 2x + 1 = 7", use_cache=False)).classifier == "rules"
    unsure = await router.classify("Tell me about the fall of the Roman Empire in detail, please.", use_cache=False)
    assert unsure.classifier == "embedding"


async def test_tiers_domains_and_tenant_policies(make_router: MakeRouter) -> None:
    router = make_router(domains={"poultry": "hen-lora"}, tenant_tiers={"school": {"deep_analysis": "medium"}})
    fallbacks = {"big": ["small"]}
    essay = "Analyse and compare two economic strategies; discuss the long-term consequences and pros and cons."
    plan = await router.route(essay, "acme", fallbacks)
    assert (plan.model, plan.fallbacks, plan.header()) == ("big", ["small"], "deep_analysis/big")
    assert (await router.route(essay, "school", fallbacks)).model == "medium"
    assert (await router.route("What is Newcastle disease in hens?", "acme", fallbacks)).model == "hen-lora"


async def test_classifications_are_cached(make_router: MakeRouter) -> None:
    router = make_router()
    first = await router.classify("What is a prime number?")
    again = await router.classify("What is a prime number?")
    assert first.classifier == "rules" and again.classifier == "cache:rules" and again.category == first.category
    assert 0 < await router.redis.ttl(f"{router.prefix}:" + __import__("hashlib").sha256(
        b"What is a prime number?").hexdigest()) <= 3600


def test_route_stats_sum_by_category_and_model() -> None:
    stats = route_stats([("simple_explanation", "small", 3), ("deep_analysis", "big", 2), ("simple_explanation",
                                                                                           "other", 1)])
    assert stats == {"by_category": {"simple_explanation": 4, "deep_analysis": 2},
                     "by_model": {"small": 3, "big": 2, "other": 1}, "total": 6}
