"""The Retriever: tenants' document collections in Qdrant, ingested in batches and searched with filters.

A single-replica deployment (Qdrant local mode under ``<data_dir>/qdrant/rag``; with
``QDRANT_URL`` it may scale out). Each (tenant, collection) is its own Qdrant
collection, named from a hash of the tenant, so a tenant can only ever address its
own: there is no name another tenant could pass to reach it. One point per chunk,
its payload the chunk's text, document id, chunk number, heading, metadata and the
user who ingested it (for erasure).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import Any

import numpy as np
from qdrant_client import models as qm
from ray.serve.handle import DeploymentHandle

from deployments.chunking import Chunk, TokenCounter, chunk_text
from deployments.embedder import default_model_path
from deployments.lexical import rrf, sparse_vector
from deployments.retriever_protocol import (
    AnyOfFilter, DocumentIn, IngestResult, RangeFilter, SearchHit, SearchOptions,
)
from serve_app.config import EmbedderConfig
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.placement import Placed
from serve_app.rag_config import RetrieverConfig
from serve_app.stores import qdrant_client

logger = logging.getLogger(__name__)

_PREFIX = "rag_"
DENSE, LEXICAL = "dense", "lexical"


def collection_id(tenant: str, name: str) -> str:
    """The Qdrant collection of a tenant's collection ``name``."""
    return f"{_PREFIX}{hashlib.sha256(tenant.encode()).hexdigest()[:16]}_{name}"


def qdrant_filter(conditions: dict[str, Any] | None, extra: list[Any] | None = None) -> qm.Filter | None:
    """Equality, range and any-of conditions on metadata, all required."""
    must: list[Any] = list(extra or [])
    for field, value in (conditions or {}).items():
        key = f"metadata.{field}"
        if isinstance(value, RangeFilter):
            must.append(qm.FieldCondition(key=key, range=qm.Range(**value.model_dump())))
        elif isinstance(value, AnyOfFilter):
            must.append(qm.FieldCondition(key=key, match=qm.MatchAny(any=value.any)))
        elif isinstance(value, float) and not isinstance(value, bool):
            must.append(qm.FieldCondition(key=key, range=qm.Range(gte=value, lte=value)))
        else:
            must.append(qm.FieldCondition(key=key, match=qm.MatchValue(value=value)))
    return qm.Filter(must=must) if must else None


def mmr(query: np.ndarray, vectors: np.ndarray, k: int, lam: float) -> list[int]:
    """Indices of ``k`` candidates by maximal marginal relevance (greedy)."""
    relevance = vectors @ query
    chosen: list[int] = []
    while len(chosen) < min(k, len(vectors)):
        redundancy = (vectors @ vectors[chosen].T).max(axis=1) if chosen else np.zeros(len(vectors))
        scores = lam * relevance - (1 - lam) * redundancy
        scores[chosen] = -np.inf
        chosen.append(int(np.argmax(scores)))
    return chosen


def _point_id(tenant: str, doc_id: str, chunk: int) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{tenant}\x00{doc_id}\x00{chunk}"))


def _doc_condition(doc_id: str) -> qm.FieldCondition:
    return qm.FieldCondition(key="document_id", match=qm.MatchValue(value=doc_id))


class Retriever:
    """Ingests, searches and deletes tenants' documents.

    Args:
        config: chunking and ingestion settings.
        embedder_config: the Embedder's model (its tokenizer counts chunk tokens).
        qdrant_url: a Qdrant server, or None for local mode under ``data_dir``.
        data_dir: raygate's state dir.
        qdrant_path: local-mode dir under ``data_dir``.
        embedder: the Embedder's handle (or an object with the same async ``embed``, for tests).
    """

    def __init__(self, config: RetrieverConfig, embedder_config: EmbedderConfig, qdrant_url: str | None,
                 data_dir: str, qdrant_path: str, embedder: Any) -> None:
        self.config = config
        self.client = qdrant_client(qdrant_url, data_dir, qdrant_path, "rag")
        self.embedder = Placed("Embedder", embedder, remote=isinstance(embedder, DeploymentHandle))
        self.tokens = TokenCounter(embedder_config.model_path or default_model_path())

    async def ingest(self, tenant: str, user: str, name: str, documents: list[DocumentIn]) -> IngestResult:
        """Chunk, embed (in batches) and store documents, replacing the chunks of ids seen before."""
        chunked = await asyncio.to_thread(lambda: [(d, self._chunks(d.text)) for d in documents])
        texts = [c.embedded_text() for _, chunks in chunked for c in chunks]
        vectors = await self._embed(texts)
        dimensions = len(vectors[0]) if vectors else len((await self._embed(["dimension probe"]))[0])
        qname = await self._collection(tenant, name, dimensions, create=True)
        now, points, i = time.time(), [], 0
        for doc, chunks in chunked:
            await self.client.delete(qname, points_selector=qm.FilterSelector(filter=qm.Filter(
                must=[_doc_condition(doc.id)])))
            for chunk in chunks:
                payload = {"document_id": doc.id, "chunk": chunk.index, "text": chunk.text, "heading": chunk.heading,
                           "metadata": doc.metadata, "tenant": tenant, "user": user, "ingested_at": now}
                vector = {DENSE: vectors[i], LEXICAL: sparse_vector(chunk.embedded_text())}
                points.append(qm.PointStruct(id=_point_id(tenant, doc.id, chunk.index), vector=vector,
                                             payload=payload))
                i += 1
        for start in range(0, len(points), 512):
            await self.client.upsert(qname, points=points[start:start + 512])
        return IngestResult(collection=name, documents=len(documents), chunks=len(points),
                            ids=[d.id for d in documents])

    async def search(self, tenant: str, name: str, query: str, options: SearchOptions) -> list[SearchHit]:
        """The best chunks for ``query``, filtered, optionally diversified (MMR).

        Hybrid: the dense neighbours and the lexical matches are fused by reciprocal rank; every
        hit's ``score`` is its dense (cosine) similarity, at least ``min_score``.
        """
        [vector] = await self._embed([query])
        qname = await self._collection(tenant, name, len(vector))
        limit = max(options.top_k * 4, 20)
        flt = qdrant_filter(options.filter)
        searches = [self.client.query_points(qname, query=vector, using=DENSE, query_filter=flt, limit=limit,
                                             score_threshold=options.min_score, with_vectors=[DENSE])]
        if options.hybrid:
            searches.append(self.client.query_points(qname, query=sparse_vector(query, query=True), using=LEXICAL,
                                                     query_filter=flt, limit=limit, with_vectors=[DENSE]))
        results = await asyncio.gather(*searches)
        points = {str(p.id): p for result in results for p in result.points}
        rankings = [[str(p.id) for p in result.points] for result in results]
        order = [points[i] for i in rrf(rankings)]
        query_vector = np.asarray(vector)
        cosine = {str(p.id): float(np.asarray(p.vector[DENSE]) @ query_vector) for p in order}  # type: ignore[index]
        order = [p for p in order if cosine[str(p.id)] >= options.min_score]
        if options.mmr and order:
            chosen = mmr(query_vector, np.asarray([p.vector[DENSE] for p in order]),  # type: ignore[index]
                         options.top_k, options.mmr_lambda)
            order = [order[i] for i in chosen]
        return [SearchHit(index=n, document_id=p.payload["document_id"], chunk=p.payload["chunk"],  # type: ignore[index]
                          score=cosine[str(p.id)], metadata=p.payload.get("metadata", {}),  # type: ignore[union-attr]
                          text=p.payload["text"], heading=p.payload.get("heading", ""))  # type: ignore[index,union-attr]
                for n, p in enumerate(order[:options.top_k], start=1)]

    async def delete_document(self, tenant: str, name: str, doc_id: str) -> int:
        """Remove a document's chunks; return how many went.

        Raises:
            NotFoundError: no such collection or document.
        """
        qname = await self._collection(tenant, name, None)
        flt = qm.Filter(must=[_doc_condition(doc_id)])
        count = (await self.client.count(qname, count_filter=flt, exact=True)).count
        if not count:
            raise NotFoundError(f"The collection '{name}' has no document '{doc_id}'.", param="document_id")
        await self.client.delete(qname, points_selector=qm.FilterSelector(filter=flt))
        return int(count)

    async def delete_collection(self, tenant: str, name: str) -> None:
        """Drop a collection and all its documents.

        Raises:
            NotFoundError: no such collection.
        """
        await self.client.delete_collection(await self._collection(tenant, name, None))

    async def list_collections(self, tenant: str) -> list[dict[str, Any]]:
        """The tenant's collections with their chunk counts."""
        prefix = collection_id(tenant, "")
        names = [c.name for c in (await self.client.get_collections()).collections if c.name.startswith(prefix)]
        counts = [(await self.client.count(n, exact=True)).count for n in names]
        return [{"name": n[len(prefix):], "chunks": int(c)} for n, c in zip(sorted(names), counts)]

    async def erase_user(self, tenant: str | None, user: str) -> int:
        """Delete every chunk a user ingested (in one tenant's collections, or everywhere); return the count."""
        prefix = collection_id(tenant, "") if tenant is not None else _PREFIX
        flt = qm.Filter(must=[qm.FieldCondition(key="user", match=qm.MatchValue(value=user))])
        removed = 0
        for collection in (await self.client.get_collections()).collections:
            if collection.name.startswith(prefix):
                removed += int((await self.client.count(collection.name, count_filter=flt, exact=True)).count)
                await self.client.delete(collection.name, points_selector=qm.FilterSelector(filter=flt))
        return removed

    async def check_health(self) -> None:
        await self.client.get_collections()

    async def close(self) -> None:
        await self.client.close()

    # -- helpers -------------------------------------------------------------------------------

    def _chunks(self, text: str) -> list[Chunk]:
        return chunk_text(text, self.config.chunk_tokens, self.config.overlap_tokens, self.tokens.count,
                          self.tokens.split)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        vectors: list[list[float]] = []
        for start in range(0, len(texts), self.config.embed_batch):
            batch, _ = await self.embedder("embed", texts[start:start + self.config.embed_batch])
            vectors += batch
        return vectors

    async def _collection(self, tenant: str, name: str, dimensions: int | None, *, create: bool = False) -> str:
        """The Qdrant collection, created when asked; its vector size checked against the Embedder's.

        Raises:
            NotFoundError: it does not exist (and ``create`` is False).
            InvalidRequestError: it holds vectors of another size (made with another embedding model).
        """
        qname = collection_id(tenant, name)
        if not await self.client.collection_exists(qname):
            if not create or dimensions is None:
                raise NotFoundError(f"The collection '{name}' does not exist.", param="collection")
            await self.client.create_collection(
                qname, vectors_config={DENSE: qm.VectorParams(size=dimensions, distance=qm.Distance.COSINE)},
                sparse_vectors_config={LEXICAL: qm.SparseVectorParams(modifier=qm.Modifier.IDF)})
            return qname
        vectors = (await self.client.get_collection(qname)).config.params.vectors
        size = vectors[DENSE].size if isinstance(vectors, dict) and DENSE in vectors else getattr(vectors, "size", 0)
        if dimensions is not None and size != dimensions:
            raise InvalidRequestError(
                f"The collection '{name}' holds {size}-dimensional vectors, but the embedding model makes "
                f"{dimensions}-dimensional ones; re-ingest it into a new collection.",
                param="collection", code="dimension_mismatch")
        return qname
