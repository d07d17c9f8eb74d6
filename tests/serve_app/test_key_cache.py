"""KeyStore's in-memory key cache against a real Valkey: hits skip Redis, revocations reach every store at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from serve_app.auth import KEY_PREFIX, APIKey, KeyStore, hash_key
from serve_app.errors import AuthenticationError
from serve_app.stores import redis_client

TTL_S = 30.0


async def until(condition: Callable[[], bool], timeout_s: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def gets(redis: aioredis.Redis) -> int:
    """GET commands the server has run so far (INFO commandstats)."""
    return int((await redis.info("commandstats")).get("cmdstat_get", {}).get("calls", 0))


@pytest.fixture
async def stores(valkey_url: str) -> AsyncIterator[tuple[KeyStore, KeyStore]]:
    """Two stores on their own clients, as two Gateway replicas; both with the cache on and subscribed."""
    pair = (KeyStore(redis_client(valkey_url), cache_ttl_s=TTL_S), KeyStore(redis_client(valkey_url), cache_ttl_s=TTL_S))
    for store in pair:
        with pytest.raises(AuthenticationError):
            await store.authenticate("Bearer rg-unknown")  # the first lookup starts the subscription
        await until(lambda s=store: s.cache.live)  # type: ignore[misc]
    yield pair
    for store in pair:
        await store.close()
        await store.redis.aclose()


async def test_a_hit_does_not_ask_redis(stores: tuple[KeyStore, KeyStore]) -> None:
    store, _ = stores
    key, record = await store.create("acme", "alice", "premium")
    before = await gets(store.redis)
    assert (await store.authenticate(f"Bearer {key}")).key_id == record.key_id  # miss: one GET
    for _ in range(20):
        assert (await store.authenticate(f"Bearer {key}")).key_id == record.key_id
    assert await gets(store.redis) - before == 1


async def test_unknown_keys_are_not_cached(stores: tuple[KeyStore, KeyStore]) -> None:
    store, _ = stores
    before = await gets(store.redis)
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            await store.authenticate("Bearer rg-nope-nope")
    assert await gets(store.redis) - before == 3


async def test_revocation_reaches_the_other_store_at_once(stores: tuple[KeyStore, KeyStore]) -> None:
    here, there = stores
    key, record = await here.create("acme", "bob")
    for store in stores:
        await store.authenticate(f"Bearer {key}")
        assert store.cache.get(hash_key(key)) is not None  # cached in both "replicas"

    await here.revoke(record.key_id)
    with pytest.raises(AuthenticationError, match="revoked"):
        await here.authenticate(f"Bearer {key}")  # the revoking store: at once, no message needed
    await until(lambda: there.cache.get(hash_key(key)) is None, timeout_s=1.0)  # the other: on the message
    with pytest.raises(AuthenticationError, match="revoked"):
        await there.authenticate(f"Bearer {key}")


async def test_ttl_bounds_a_revocation_the_subscription_missed(stores: tuple[KeyStore, KeyStore]) -> None:
    store, _ = stores
    now = [1000.0]
    store.cache.clock = lambda: now[0]
    key, record = await store.create("acme", "carol")
    await store.authenticate(f"Bearer {key}")
    # Revoked behind the cache's back (no message): served from memory until the entry is TTL_S old.
    revoked = record.model_copy(update={"revoked": True}).model_dump_json()
    await store.redis.set(KEY_PREFIX + hash_key(key), revoked)
    now[0] += TTL_S - 1
    assert (await store.authenticate(f"Bearer {key}")).key_id == record.key_id
    now[0] += 2
    with pytest.raises(AuthenticationError, match="revoked"):
        await store.authenticate(f"Bearer {key}")


async def test_no_hits_while_the_subscription_is_down(stores: tuple[KeyStore, KeyStore]) -> None:
    store, _ = stores
    key, _ = await store.create("acme", "dave")
    await store.authenticate(f"Bearer {key}")
    await store.close()  # as if the subscription were lost: the cache stops serving
    assert not store.cache.live
    before = await gets(store.redis)
    await store.authenticate(f"Bearer {key}")  # asks Redis, and subscribes again
    assert await gets(store.redis) - before == 1
    await until(lambda: store.cache.live)
    assert store.cache.get(hash_key(key)) is None  # emptied on subscribing: what it missed cannot linger


async def test_a_dropped_subscription_empties_the_cache(stores: tuple[KeyStore, KeyStore]) -> None:
    here, there = stores
    key, record = await here.create("acme", "erin")
    digest = hash_key(key)
    await there.authenticate(f"Bearer {key}")
    assert there.cache.get(digest) is not None
    await there.redis.execute_command("CLIENT", "KILL", "TYPE", "pubsub")  # every subscriber's connection
    # Whether redis-py re-subscribes by itself or the cache does: it comes back empty ...
    await until(lambda: there.cache.live and there.cache.get(digest) is None, timeout_s=5.0)
    await there.authenticate(f"Bearer {key}")
    await here.revoke(record.key_id)  # ... and hears revocations again
    await until(lambda: there.cache.get(digest) is None, timeout_s=1.0)
    with pytest.raises(AuthenticationError, match="revoked"):
        await there.authenticate(f"Bearer {key}")


def test_a_lookup_that_raced_a_revocation_is_not_kept(valkey_url: str) -> None:
    store = KeyStore(redis_client(valkey_url), cache_ttl_s=TTL_S)
    store.cache.live = True
    record = APIKey(key_id="k1", tenant="t", user="u")
    token = store.cache.token()  # taken before the GET ...
    store.cache.drop("digest")  # ... a revocation arrives while it is in flight ...
    store.cache.put("digest", record, token)  # ... so its answer may be stale: not kept
    assert store.cache.get("digest") is None
    store.cache.put("digest", record, store.cache.token())
    assert store.cache.get("digest") == record


def test_the_cache_is_off_by_default(valkey_url: str) -> None:
    store = KeyStore(redis_client(valkey_url))
    store.cache.put("digest", APIKey(key_id="k1", tenant="t", user="u"), store.cache.token())
    assert store.cache.get("digest") is None
