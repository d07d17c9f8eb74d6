"""API keys: created by the CLI or admin API, stored hashed (sha256) in Redis.

A key looks like ``rg-<key_id>-<secret>``. Only its sha256 is stored, under
``raygate:key:<sha256>``; ``raygate:keyid:<key_id>`` points at that hash so a key
can be revoked by its public id. Lookups compare hashes, so no timing leak on
the secret itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel

from serve_app.errors import AuthenticationError, NotFoundError
from serve_app.key_cache import REVOKED_CHANNEL, KeyCache
from serve_app.stores import map_redis_errors

Plan = Literal["free", "premium", "enterprise"]
KEY_PREFIX = "raygate:key:"
KEY_ID_PREFIX = "raygate:keyid:"
KEY_SET = "raygate:keys"


class APIKey(BaseModel):
    """What a key grants: who is calling and with which plan."""

    key_id: str
    tenant: str
    user: str
    plan: Plan = "free"
    admin: bool = False
    created_at: float = 0.0
    revoked: bool = False


# The admin key from the environment (``gateway.admin_key_env``): accepted without being stored.
BOOTSTRAP_ADMIN = APIKey(key_id="bootstrap-admin", tenant="admin", user="admin", plan="enterprise", admin=True)


def hash_key(key: str) -> str:
    """Return the sha256 hex digest under which a key is stored."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_bearer(authorization: str | None) -> str:
    """Return the key from an ``Authorization: Bearer <key>`` header.

    Raises:
        AuthenticationError: no header, or not a bearer token.
    """
    if not authorization:
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Malformed Authorization header: expected 'Bearer <key>'.")
    return token.strip()


class KeyStore:
    """Creates, looks up and revokes API keys in Redis.

    Args:
        redis: an asyncio client (``decode_responses=True``).
        bootstrap_admin_key: an admin key from the environment, accepted without being stored.
        cache_ttl_s: how long an authenticated key is served from memory (``serve_app.key_cache``);
            0, the default, asks Redis every time (the CLI, tools).
    """

    def __init__(self, redis: aioredis.Redis, bootstrap_admin_key: str | None = None, *,
                 cache_ttl_s: float = 0.0) -> None:
        self.redis = redis
        self._bootstrap_hash = hash_key(bootstrap_admin_key) if bootstrap_admin_key else None
        self.cache = KeyCache(redis, cache_ttl_s)

    async def create(self, tenant: str, user: str, plan: Plan = "free", *, admin: bool = False) -> tuple[str, APIKey]:
        """Create a key. Returns the plaintext key (shown once) and its record."""
        key_id = secrets.token_hex(6)
        key = f"rg-{key_id}-{secrets.token_urlsafe(24)}"
        record = APIKey(key_id=key_id, tenant=tenant, user=user, plan=plan, admin=admin, created_at=time.time())
        digest = hash_key(key)
        async with map_redis_errors("key create"):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(KEY_PREFIX + digest, record.model_dump_json())
                pipe.set(KEY_ID_PREFIX + key_id, digest)
                pipe.sadd(KEY_SET, key_id)
                await pipe.execute()
        return key, record

    async def authenticate(self, authorization: str | None) -> APIKey:
        """Return the key record for an Authorization header.

        Raises:
            AuthenticationError: missing, unknown or revoked key.
        """
        return await self.authenticate_digest(hash_key(parse_bearer(authorization)))

    async def authenticate_digest(self, digest: str) -> APIKey:
        """Return the key record for a key's sha256 (a dashboard session holds the digest, never the key).

        Raises:
            AuthenticationError: unknown or revoked key.
        """
        if self._bootstrap_hash and hmac.compare_digest(digest, self._bootstrap_hash):
            return BOOTSTRAP_ADMIN
        if (cached := self.cache.get(digest)) is not None:
            return cached
        token = self.cache.token()
        async with map_redis_errors("key lookup"):
            raw = await self.redis.get(KEY_PREFIX + digest)
        if raw is None:
            raise AuthenticationError("Incorrect API key provided.")
        record = APIKey.model_validate_json(raw)
        if record.revoked:
            raise AuthenticationError("This API key has been revoked.")
        self.cache.put(digest, record, token)
        return record

    async def revoke(self, key_or_id: str) -> APIKey:
        """Revoke a key given the key itself or its id; every Gateway replica's cache drops it at once.

        Raises:
            NotFoundError: no such key.
        """
        async with map_redis_errors("key revoke"):
            digest = await self.redis.get(KEY_ID_PREFIX + key_or_id) or hash_key(key_or_id)
            raw = await self.redis.get(KEY_PREFIX + digest)
            if raw is None:
                raise NotFoundError("No such API key.")
            record = APIKey.model_validate_json(raw).model_copy(update={"revoked": True})
            await self.redis.set(KEY_PREFIX + digest, record.model_dump_json())
            self.cache.drop(digest)
            await self.redis.publish(REVOKED_CHANNEL, digest)
        return record

    async def close(self) -> None:
        """Stop the cache's subscription (the Redis client is the caller's to close)."""
        await self.cache.close()

    async def lookup_id(self, key_id: str) -> APIKey | None:
        """The record of a key by its public id (work that outlives its request, e.g. a batch, runs as the
        key that asked); None when it is unknown or revoked."""
        if key_id == BOOTSTRAP_ADMIN.key_id and self._bootstrap_hash:
            return BOOTSTRAP_ADMIN
        async with map_redis_errors("key lookup"):
            digest = await self.redis.get(KEY_ID_PREFIX + key_id)
            raw = await self.redis.get(KEY_PREFIX + digest) if digest else None
        record = APIKey.model_validate_json(raw) if raw else None
        return record if record is not None and not record.revoked else None

    async def list(self) -> list[APIKey]:
        """Return every key's record (never the keys themselves)."""
        async with map_redis_errors("key list"):
            ids = sorted(await self.redis.smembers(KEY_SET))
            digests = [await self.redis.get(KEY_ID_PREFIX + i) for i in ids]
            raws = [await self.redis.get(KEY_PREFIX + d) for d in digests if d]
        return [APIKey.model_validate_json(r) for r in raws if r]
