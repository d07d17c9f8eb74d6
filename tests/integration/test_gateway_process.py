"""The Gateway replica's own process: settings it applies to the Python it runs in."""

from __future__ import annotations

import gc

from bench.harness import replica_actors
from tests.integration.conftest import GC_THRESHOLD, Deployed


def test_the_gateway_sets_its_replicas_collector_threshold(deployed: Deployed) -> None:
    """``gateway.gc_threshold`` reaches the replica's collector (young generation only; the others keep Python's)."""
    import ray

    actors = replica_actors("raygate", "Gateway")
    assert actors
    for name, namespace in actors.items():
        actor = ray.get_actor(name, namespace=namespace)
        assert ray.get(actor.__ray_call__.remote(lambda _: gc.get_threshold()), timeout=30) == (GC_THRESHOLD, 10, 10)
