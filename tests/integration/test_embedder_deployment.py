"""The Embedder deployment through its own handle, on the shared cluster.

Not in Serve's local testing mode: Ray 2.60's ``@serve.batch`` reads the replica
context, which only a real replica has.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from ray import serve

from tests.integration.conftest import Deployed

pytestmark = pytest.mark.integration


@pytest.fixture
def embedder(deployed: Deployed):  # type: ignore[no-untyped-def]
    return serve.get_deployment_handle("Embedder", app_name="raygate")


async def test_vectors_are_normalised_and_semantic(embedder) -> None:  # type: ignore[no-untyped-def]
    texts = ["How do I keep hens warm in winter?", "Keeping chickens warm during cold months",
             "The stock market fell today"]
    vectors, tokens = await embedder.embed.remote(texts)
    v = np.asarray(vectors)
    assert v.shape == (3, 384)
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert tokens > len(texts)


async def test_concurrent_calls_are_batched_and_stay_in_order(embedder) -> None:  # type: ignore[no-untyped-def]
    texts = [f"sentence number {i} about poultry" for i in range(20)]
    alone = [(await embedder.embed.remote([t]))[0][0] for t in texts[:3]]
    together = await asyncio.gather(*(embedder.embed.remote([t]) for t in texts))
    for single, (batched, _) in zip(alone, together):
        assert np.allclose(single, batched[0], atol=1e-5)


async def test_info_reports_dimensions(embedder) -> None:  # type: ignore[no-untyped-def]
    assert (await embedder.info.remote())["dimensions"] == 384
