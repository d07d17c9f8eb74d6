"""The semantic cache: paraphrases of a cached question find its answer, within the same scope only.

A single-replica deployment (Qdrant local mode lets one process open its dir;
with ``QDRANT_URL`` it may scale out). It embeds the last user turn through the
Embedder and keeps one point per exact-cache entry: the vector and a payload
naming the entry's Redis key and what invalidation selects on (tenant, model,
user, tags, times) — never the text. The answer itself lives once, in Redis;
a point whose entry has expired or was evicted is a miss and is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

from qdrant_client import models as qm
from ray.serve.handle import DeploymentHandle

from deployments.cache_protocol import Selector
from serve_app.cache_config import CacheConfig
from serve_app.placement import Placed
from serve_app.stores import qdrant_client

logger = logging.getLogger(__name__)

_VECTORS_KEPT = 2048  # recent query vectors, so storing after a miss does not embed again
_PURGE_EVERY = 256  # adds between deletions of expired points


def _point_id(key: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, key))


def _match(field: str, value: Any) -> qm.FieldCondition:
    return qm.FieldCondition(key=field, match=qm.MatchValue(value=value))


def selector_filter(selector: Selector, now: float) -> qm.Filter | None:
    """The Qdrant filter of a selector's payload conditions; None when it has a key pattern (keys only)."""
    if selector.key_pattern is not None:
        return None
    must: list[Any] = [_match(name, getattr(selector, name)) for name in ("tenant", "model", "user")
                       if getattr(selector, name) is not None]
    if selector.tag is not None:
        must.append(qm.FieldCondition(key="tags", match=qm.MatchAny(any=[selector.tag])))
    if selector.older_than_s is not None:
        must.append(qm.FieldCondition(key="stored_at", range=qm.Range(lte=now - selector.older_than_s)))
    return qm.Filter(must=must)


class SemanticCache:
    """Nearest-neighbour lookup of cached questions, filtered by scope.

    Args:
        config: the cache settings (threshold, collection).
        qdrant_url: a Qdrant server, or None for local mode under ``data_dir``.
        data_dir: raygate's state dir.
        qdrant_path: local-mode dir under ``data_dir``.
        embedder: the Embedder's handle (or an object with the same async ``embed``, for tests).
    """

    def __init__(self, config: CacheConfig, qdrant_url: str | None, data_dir: str, qdrant_path: str,
                 embedder: Any) -> None:
        self.config = config.semantic
        self.client = qdrant_client(qdrant_url, data_dir, qdrant_path, "cache")
        self.embedder = Placed("Embedder", embedder, remote=isinstance(embedder, DeploymentHandle))
        self._vectors: OrderedDict[str, list[float]] = OrderedDict()
        self._ready: asyncio.Lock = asyncio.Lock()
        self._created = False
        self._adds = 0

    async def search(self, scope: str, text: str, now: float | None = None) -> list[tuple[str, float]]:
        """Return (entry key, similarity) of the nearest cached questions in ``scope`` over the threshold."""
        now = time.time() if now is None else now
        vector = await self._embed(text)
        await self._collection(len(vector))
        flt = qm.Filter(must=[_match("scope", scope), qm.FieldCondition(key="expires_at", range=qm.Range(gt=now))])
        result = await self.client.query_points(self.config.collection, query=vector, query_filter=flt,
                                                limit=self.config.candidates, score_threshold=self.config.threshold,
                                                with_payload=["key"])
        return [(str(p.payload["key"]), float(p.score)) for p in result.points]  # type: ignore[index]

    async def add(self, scope: str, text: str, key: str, meta: dict[str, Any], expires_at: float) -> None:
        """Index the question of the entry ``key`` (replacing the point of an earlier entry with that key)."""
        vector = await self._embed(text)
        await self._collection(len(vector))
        payload = {**meta, "scope": scope, "key": key, "expires_at": expires_at}
        await self.client.upsert(self.config.collection,
                                 points=[qm.PointStruct(id=_point_id(key), vector=vector, payload=payload)])
        self._adds += 1
        if self._adds % _PURGE_EVERY == 0:
            await self.purge_expired()

    async def delete(self, selector: Selector | None = None, keys: list[str] | None = None) -> None:
        """Drop the points of the given entry keys, and every point the selector's conditions match."""
        if not await self._exists():
            return
        if keys:
            await self.client.delete(self.config.collection, points_selector=[_point_id(k) for k in keys])
        flt = selector_filter(selector, time.time()) if selector is not None else None
        if flt is not None:
            await self.client.delete(self.config.collection, points_selector=qm.FilterSelector(filter=flt))

    async def purge_expired(self, now: float | None = None) -> None:
        """Delete the points of entries past their lifetime."""
        now = time.time() if now is None else now
        expired = qm.Filter(must=[qm.FieldCondition(key="expires_at", range=qm.Range(lte=now))])
        await self.client.delete(self.config.collection, points_selector=qm.FilterSelector(filter=expired))

    async def count(self) -> int:
        """Points in the collection (tests, stats)."""
        if not await self._exists():
            return 0
        return int((await self.client.count(self.config.collection, exact=True)).count)

    async def check_health(self) -> None:
        """Raise when Qdrant does not answer."""
        await self.client.get_collections()

    async def close(self) -> None:
        await self.client.close()

    # -- helpers -------------------------------------------------------------------------------

    async def _embed(self, text: str) -> list[float]:
        vector = self._vectors.get(text)
        if vector is None:
            vectors, _ = await self.embedder("embed", [text])
            vector = self._vectors[text] = vectors[0]
            if len(self._vectors) > _VECTORS_KEPT:
                self._vectors.popitem(last=False)
        return vector

    async def _exists(self) -> bool:
        return self._created or await self.client.collection_exists(self.config.collection)

    async def _collection(self, dimensions: int) -> None:
        """Create the collection on first use, and refuse one made for another vector size."""
        if self._created:
            return
        async with self._ready:
            name = self.config.collection
            if not await self.client.collection_exists(name):
                await self.client.create_collection(
                    name, vectors_config=qm.VectorParams(size=dimensions, distance=qm.Distance.COSINE))
            else:
                size = (await self.client.get_collection(name)).config.params.vectors.size  # type: ignore[union-attr]
                if size != dimensions:
                    raise ValueError(f"Qdrant collection '{name}' holds {size}-d vectors; the Embedder makes "
                                     f"{dimensions}-d ones. Drop the collection or pick another name.")
            self._created = True
