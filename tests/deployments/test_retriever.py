"""The Retriever against Qdrant local mode and the real embedding model: ingest, replace, delete,
filters, MMR, tenant isolation, dimension checks, erasure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from qdrant_client import models as qm

from deployments.retriever import Retriever, collection_id
from deployments.retriever_protocol import DocumentIn, SearchOptions
from serve_app.config import EmbedderConfig
from serve_app.errors import InvalidRequestError, NotFoundError
from serve_app.rag_config import RetrieverConfig
from tests.conftest import DirectEmbedder

DOCS = [
    DocumentIn(id="mites", text="# Red mites\n\nRed mites hide in perch cracks by day and feed on hens at night.",
               metadata={"topic": "parasites", "year": 2021, "species": "layers"}),
    DocumentIn(id="light", text="# Lighting\n\nLaying hens need 16 hours of light per day for steady laying.",
               metadata={"topic": "husbandry", "year": 2019, "species": "layers"}),
    DocumentIn(id="broiler-density", text="# Density\n\nBroilers are kept at most at 33 kg per square metre.",
               metadata={"topic": "husbandry", "year": 2023, "species": "broilers"}),
]


@pytest.fixture
async def retriever(tmp_path: Path, direct_embedder: DirectEmbedder) -> AsyncIterator[Retriever]:
    r = Retriever(RetrieverConfig(chunk_tokens=60, overlap_tokens=10), EmbedderConfig(), None, str(tmp_path),
                  "qdrant", direct_embedder)
    yield r
    await r.close()


async def ids(r: Retriever, query: str, tenant: str = "acme", **options: object) -> list[str]:
    hits = await r.search(tenant, "farm", query, SearchOptions.model_validate({"min_score": 0.0, **options}))
    return [h.document_id for h in hits]


async def test_ingest_search_and_citation_fields(retriever: Retriever) -> None:
    result = await retriever.ingest("acme", "ann", "farm", DOCS)
    assert (result.documents, result.chunks) == (3, 3)
    hits = await retriever.search("acme", "farm", "How many hours of light do laying hens need?", SearchOptions())
    assert hits[0].document_id == "light" and hits[0].index == 1 and hits[0].score > 0.3
    assert hits[0].metadata == {"topic": "husbandry", "year": 2019, "species": "layers"}
    assert hits[0].heading == "Lighting" and "16 hours" in hits[0].text
    assert await ids(retriever, "hours of light", min_score=0.99) == []


async def test_reingest_replaces_and_delete_removes(retriever: Retriever) -> None:
    await retriever.ingest("acme", "ann", "farm", DOCS)
    long = DocumentIn(id="mites", text="# Red mites\n\n" + " ".join(f"Mite fact {i} about treatment." for i in range(40)))
    assert (await retriever.ingest("acme", "ann", "farm", [long])).chunks > 1
    short = DocumentIn(id="mites", text="Mites are treated with silica dust.")
    await retriever.ingest("acme", "ann", "farm", [short])
    assert (await retriever.list_collections("acme")) == [{"name": "farm", "chunks": 3}]  # no stale chunks
    assert await retriever.delete_document("acme", "farm", "mites") == 1
    with pytest.raises(NotFoundError):
        await retriever.delete_document("acme", "farm", "mites")
    await retriever.delete_collection("acme", "farm")
    assert await retriever.list_collections("acme") == []
    with pytest.raises(NotFoundError):
        await retriever.search("acme", "farm", "mites", SearchOptions())


@pytest.mark.parametrize(("condition", "expected"), [
    ({"topic": "husbandry"}, {"light", "broiler-density"}),
    ({"year": {"gte": 2020}}, {"mites", "broiler-density"}),
    ({"year": {"gt": 2019, "lt": 2023}}, {"mites"}),
    ({"species": {"any": ["broilers", "turkeys"]}}, {"broiler-density"}),
    ({"topic": "husbandry", "species": "layers"}, {"light"}),
])
async def test_metadata_filters(retriever: Retriever, condition: dict, expected: set[str]) -> None:
    await retriever.ingest("acme", "ann", "farm", DOCS)
    assert set(await ids(retriever, "poultry", top_k=10, filter=condition)) == expected


async def test_mmr_prefers_diverse_chunks(retriever: Retriever) -> None:
    same = [DocumentIn(id=f"copy-{i}", text=DOCS[1].text) for i in range(3)]
    await retriever.ingest("acme", "ann", "farm", [*same, *DOCS])
    twins = {"light", "copy-0", "copy-1", "copy-2"}
    plain = await ids(retriever, "light for laying hens", top_k=2)
    diverse = await ids(retriever, "light for laying hens", top_k=2, mmr=True, mmr_lambda=0.3)
    assert set(plain) <= twins
    assert len(set(diverse) & twins) == 1


async def test_tenants_never_see_each_other(retriever: Retriever) -> None:
    await retriever.ingest("acme", "ann", "farm", DOCS)
    with pytest.raises(NotFoundError):
        await retriever.search("globex", "farm", "red mites", SearchOptions())
    await retriever.ingest("globex", "gus", "farm", [DocumentIn(id="g1", text="Globex turkeys eat maize.")])
    assert await ids(retriever, "red mites", tenant="globex", top_k=10) == ["g1"]
    assert collection_id("acme", "farm") != collection_id("globex", "farm")


async def test_dimension_mismatch_is_a_clear_400(retriever: Retriever) -> None:
    await retriever.client.create_collection(
        collection_id("acme", "old"), vectors_config=qm.VectorParams(size=768, distance=qm.Distance.COSINE))
    with pytest.raises(InvalidRequestError, match="768-dimensional") as raised:
        await retriever.ingest("acme", "ann", "old", DOCS)
    assert raised.value.status_code == 400 and raised.value.code == "dimension_mismatch"


async def test_erase_user_removes_only_their_chunks(retriever: Retriever) -> None:
    await retriever.ingest("acme", "ann", "farm", DOCS[:2])
    await retriever.ingest("acme", "bob", "farm", DOCS[2:])
    assert await retriever.erase_user("acme", "ann") == 2
    assert await ids(retriever, "poultry", top_k=10) == ["broiler-density"]
    points, _ = await retriever.client.scroll(collection_id("acme", "farm"), limit=100, with_payload=True)
    stored = " ".join(str(p.payload) for p in points)
    assert "Red mites" not in stored and "16 hours" not in stored and "33 kg" in stored
