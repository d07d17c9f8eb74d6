"""The retriever's request and answer shapes: documents, search options, filters, hits and citations."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator

COLLECTION_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MetadataValue = str | int | float | bool | list[str]


class DocumentIn(BaseModel):
    """One document to ingest; re-ingesting its id replaces its chunks."""

    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")
    text: str = Field(min_length=1, max_length=5_000_000)
    metadata: dict[str, MetadataValue] = Field(default_factory=dict)

    @field_validator("metadata")
    @classmethod
    def _check_keys(cls, value: dict[str, MetadataValue]) -> dict[str, MetadataValue]:
        bad = [k for k in value if not k or len(k) > 64 or not k.replace("_", "").replace("-", "").isalnum()]
        if bad:
            raise ValueError(f"metadata keys must be 1-64 letters, digits, '_' or '-': {bad[:3]}")
        return value


class DocumentsIn(BaseModel):
    documents: list[DocumentIn] = Field(min_length=1, max_length=1000)


class RangeFilter(BaseModel):
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None


class AnyOfFilter(BaseModel):
    any: list[str | int] = Field(min_length=1, max_length=100)


FilterValue = str | int | float | bool | RangeFilter | AnyOfFilter


class SearchOptions(BaseModel):
    """How to retrieve: top-k over a minimum score, metadata filters, optional diversification."""

    top_k: int = Field(4, ge=1, le=50)
    min_score: float = Field(0.3, ge=-1, le=1, description="Least cosine similarity of a dense neighbour.")
    filter: dict[str, FilterValue] | None = Field(
        None, description='metadata conditions, all must hold: {"lang": "fr"}, {"year": {"gte": 2020}}, '
        '{"species": {"any": ["layers", "broilers"]}}')
    hybrid: bool = Field(True, description="Fuse dense similarity with lexical (BM25-style) matches.")
    mmr: bool = Field(False, description="Maximal marginal relevance: trade some similarity for diversity.")
    mmr_lambda: float = Field(0.5, ge=0, le=1, description="1 = pure similarity, 0 = pure diversity.")


class SearchRequest(SearchOptions):
    """``POST /v1/collections/{name}/search``."""

    query: str = Field(min_length=1, max_length=20_000)


class RagOptions(SearchOptions):
    """The ``rag`` extension of a chat request."""

    collection: str = Field(pattern=COLLECTION_NAME)


class Citation(BaseModel):
    """A source the answer was given: [n] in the system message."""

    index: int = Field(description="The source's number in the prompt, [1], [2], ...")
    document_id: str
    chunk: int
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchHit(Citation):
    text: str
    heading: str = ""


class IngestResult(BaseModel):
    object: str = "collection.ingest"
    collection: str
    documents: int
    chunks: int
    ids: list[str]


def rag_system_message(hits: list[SearchHit], original: str | None) -> str:
    """The system message with numbered sources and the instruction to cite them."""
    sources = "\n\n".join(f"[{h.index}] ({h.document_id}) {h.heading + ': ' if h.heading else ''}{h.text}"
                          for h in hits)
    instruction = ("Answer using the sources below when they are relevant. Cite each source you use with its "
                   "number in square brackets, e.g. [1]. If the sources do not contain the answer, say so.")
    head = f"{original}\n\n" if original else ""
    return f"{head}{instruction}\n\nSources:\n{sources}" if hits else (original or "")
