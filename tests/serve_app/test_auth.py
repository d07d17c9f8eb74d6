"""API keys against a real Valkey server."""

from __future__ import annotations

import pytest

from serve_app.auth import KEY_PREFIX, KeyStore, hash_key
from serve_app.errors import AuthenticationError, NotFoundError
from serve_app.stores import redis_client


@pytest.fixture
async def store(valkey_url: str) -> KeyStore:
    return KeyStore(redis_client(valkey_url), bootstrap_admin_key="boot-admin-secret")


async def test_create_then_authenticate(store: KeyStore) -> None:
    key, record = await store.create("acme", "alice", "premium")
    found = await store.authenticate(f"Bearer {key}")
    assert (found.tenant, found.user, found.plan, found.admin) == ("acme", "alice", "premium", False)
    assert found.key_id == record.key_id


async def test_keys_are_stored_hashed(store: KeyStore) -> None:
    key, _ = await store.create("acme", "bob")
    assert await store.redis.get(KEY_PREFIX + hash_key(key)) is not None
    for name in await store.redis.keys("raygate:*"):
        value = await store.redis.get(name) if await store.redis.type(name) == "string" else ""
        assert key not in name and key not in (value or "")


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer rg-unknown-key"])
async def test_bad_headers_are_rejected(store: KeyStore, header: str | None) -> None:
    with pytest.raises(AuthenticationError):
        await store.authenticate(header)


async def test_revoke_by_id_and_by_key(store: KeyStore) -> None:
    key1, record1 = await store.create("acme", "carol")
    key2, _ = await store.create("acme", "dave")
    await store.revoke(record1.key_id)
    await store.revoke(key2)
    for key in (key1, key2):
        with pytest.raises(AuthenticationError, match="revoked"):
            await store.authenticate(f"Bearer {key}")


async def test_revoke_unknown_is_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFoundError):
        await store.revoke("no-such-key")


async def test_bootstrap_admin_key(store: KeyStore) -> None:
    record = await store.authenticate("Bearer boot-admin-secret")
    assert record.admin


async def test_list_shows_ids_not_secrets(store: KeyStore) -> None:
    key, record = await store.create("acme", "erin")
    listed = await store.list()
    assert record.key_id in {r.key_id for r in listed}
    assert key not in repr(listed)
