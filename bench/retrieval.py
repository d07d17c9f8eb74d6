"""``python -m bench.retrieval``: retrieval quality on a labelled corpus, and query latency by collection size.

Quality: the 63 poultry-farming notes of ``bench/data/retrieval/docs`` (English and
French) are ingested through the Retriever exactly as ``POST /v1/collections`` does
(token-aware chunks with overlap, the Embedder's model), then each of the 237
labelled questions of ``questions.jsonl`` is searched, dense-only and hybrid (dense
fused with lexical, the default). The chunks returned are folded into a ranking of
documents; printed are recall@1, @4 and @10 (the share of a question's answering
documents found in the first k) and MRR, overall, by language and for
cross-language questions.

Latency: Qdrant local mode (the default store) is filled with 1,000 and 100,000
random unit vectors of the model's size, and ``Retriever.search``'s Qdrant query is
timed for 200 random queries at each size (p50/p99), with the query embedding timed
apart. Embedder batching throughput: ``python -m bench.embedder_throughput``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models as qm

from bench.harness import percentile
from deployments.embedder import default_model_path
from deployments.retriever import Retriever, collection_id
from deployments.retriever_protocol import DocumentIn, SearchOptions
from serve_app.config import EmbedderConfig
from serve_app.rag_config import RetrieverConfig

DATA = Path(__file__).parent / "data" / "retrieval"
KS = (1, 4, 10)


class LocalEmbedder:
    """The Embedder's model, called in this process (the Retriever takes any object with ``embed``)."""

    def __init__(self) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(default_model_path(), device="cpu")

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors = self.model.encode(texts, batch_size=64, normalize_embeddings=True)
        return vectors.tolist(), 0


def load_corpus() -> tuple[list[DocumentIn], list[dict[str, Any]]]:
    """The documents (metadata from their first-line comment) and the labelled questions."""
    docs = []
    for path in sorted((DATA / "docs").glob("*.md")):
        text = path.read_text(encoding="utf-8")
        meta = dict(re.findall(r"(\w+):\s*([^;>]+?)\s*(?:;|-->)", text.splitlines()[0]))
        docs.append(DocumentIn(id=path.stem, text=text, metadata={k: v.strip() for k, v in meta.items()}))
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text(encoding="utf-8").splitlines()
                 if line.strip()]
    return docs, questions


def scores(ranking: list[str], answers: list[str]) -> dict[str, float]:
    """recall@k per k and the reciprocal rank of the first answering document."""
    found = {f"recall@{k}": len(set(ranking[:k]) & set(answers)) / len(answers) for k in KS}
    first = next((i for i, doc in enumerate(ranking, start=1) if doc in answers), None)
    return {**found, "mrr": 1 / first if first else 0.0}


async def quality(retriever: Retriever, docs: list[DocumentIn], questions: list[dict[str, Any]]) -> None:
    started = time.perf_counter()
    result = await retriever.ingest("bench", "bench", "poultry", docs)
    print(f"ingested {result.documents} documents as {result.chunks} chunks in {time.perf_counter() - started:.1f} s")
    print("| search | questions | n | recall@1 | recall@4 | recall@10 | MRR |")
    print("|---|---|---|---|---|---|---|")
    for hybrid in (False, True):
        groups: dict[str, list[dict[str, float]]] = defaultdict(list)
        options = SearchOptions(top_k=40, min_score=-1, hybrid=hybrid)
        for q in questions:
            hits = await retriever.search("bench", "poultry", q["question"], options)
            s = scores(list(dict.fromkeys(h.document_id for h in hits)), q["answers"])
            for group in ("all", q["lang"], *(["cross-language"] if q.get("cross") else [])):
                groups[group].append(s)
        for group, rows in groups.items():
            means = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
            print(f"| {'hybrid' if hybrid else 'dense'} | {group} | {len(rows)} | {means['recall@1']:.3f} | "
                  f"{means['recall@4']:.3f} | {means['recall@10']:.3f} | {means['mrr']:.3f} |")


async def latency(retriever: Retriever, sizes: tuple[int, ...], queries: int) -> None:
    rng = np.random.default_rng(0)
    dim = 384
    print("\n| chunks | search p50 ms | search p99 ms |")
    print("|---|---|---|")
    for size in sizes:
        name = collection_id("bench", f"random-{size}")
        await retriever.client.create_collection(name, vectors_config=qm.VectorParams(size=dim,
                                                                                      distance=qm.Distance.COSINE))
        for start in range(0, size, 2000):
            block = rng.standard_normal((min(2000, size - start), dim)).astype(np.float32)
            block /= np.linalg.norm(block, axis=1, keepdims=True)
            await retriever.client.upsert(name, points=qm.Batch(ids=list(range(start, start + len(block))),
                                                                vectors=block.tolist()))
        timings = []
        for _ in range(queries):
            query = rng.standard_normal(dim)
            t0 = time.perf_counter()
            await retriever.client.query_points(name, query=(query / np.linalg.norm(query)).tolist(), limit=4)
            timings.append((time.perf_counter() - t0) * 1000)
        print(f"| {size:,} | {percentile(timings, 50):.2f} | {percentile(timings, 99):.2f} |")


async def embedding_time(retriever: Retriever, n: int = 200) -> None:
    timings = []
    for i in range(n):
        t0 = time.perf_counter()
        await retriever.embedder("embed", [f"Question {i}: how long does coccidiosis treatment take?"])
        timings.append((time.perf_counter() - t0) * 1000)
    print(f"\nquery embedding (one sentence, in process): p50 {percentile(timings, 50):.2f} ms, "
          f"p99 {percentile(timings, 99):.2f} ms")


async def main_async(args: argparse.Namespace) -> None:
    docs, questions = load_corpus()
    print(f"{len(docs)} documents, {len(questions)} questions")
    with tempfile.TemporaryDirectory() as data_dir:
        config = RetrieverConfig(chunk_tokens=args.chunk_tokens, overlap_tokens=args.chunk_tokens // 5)
        retriever = Retriever(config, EmbedderConfig(), None, data_dir, "qdrant", LocalEmbedder())
        try:
            await quality(retriever, docs, questions)
            if not args.quality_only:
                await latency(retriever, tuple(args.sizes), args.queries)
                await embedding_time(retriever)
        finally:
            await retriever.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quality-only", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 100_000])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--chunk-tokens", type=int, default=RetrieverConfig().chunk_tokens)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
