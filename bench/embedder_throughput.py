"""``python -m bench.embedder_throughput``: what ``@serve.batch`` buys the Embedder under concurrent load.

A fresh local Ray cluster (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, 4 logical CPUs) runs one
``deployments.embedder.Embedder`` replica per variant, deployed, measured and deleted in turn:
batched with the project default (``EmbedderConfig``: ``max_batch_size`` 32, 10 ms wait),
batched with 64 / 5 ms and 64 / 20 ms, and unbatched (``max_batch_size`` 1, no wait). The
replica's torch uses every core (``EmbedderConfig.torch_threads``) in every variant. ``concurrency``
asyncio workers call ``handle.embed.remote([text])`` with ONE short, distinct sentence each,
as concurrent chat requests and queries do, after 50 unmeasured warm-up calls, until
``requests`` calls are done. Each call is timed; sentences/s is ``requests`` over the wall time.
The table gives each variant's speed-up over the unbatched one (the project's goal is ≥ 4×).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass
from typing import Any

from bench.harness import percentile
from serve_app.config import EmbedderConfig

WARMUP_CALLS = 50
BASELINE = "unbatched"


@dataclass(frozen=True)
class Variant:
    """One Embedder configuration to measure."""

    name: str
    max_batch_size: int
    batch_wait_timeout_s: float


DEFAULT = "batched (default)"
VARIANTS = (
    Variant(DEFAULT, EmbedderConfig().max_batch_size, EmbedderConfig().batch_wait_timeout_s),
    Variant("batched, 64 / 5 ms", 64, 0.005),
    Variant("batched, 64 / 20 ms", 64, 0.020),
    Variant(BASELINE, 1, 0.0),
)


def sentence(i: int) -> str:
    """A short question, distinct per call so nothing downstream can reuse an earlier answer."""
    return f"Question {i}: how many hours of light do laying hens need?"


async def drive(handle: Any, requests: int, concurrency: int, offset: int) -> tuple[float, list[float]]:
    """Make ``requests`` one-sentence calls, ``concurrency`` at a time; return wall seconds and latencies (ms)."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests:
            i, next_index = next_index, next_index + 1
            started = time.perf_counter()
            vectors, _ = await handle.embed.remote([sentence(offset + i)])
            latencies.append((time.perf_counter() - started) * 1000)
            assert len(vectors) == 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def measure(variant: Variant, requests: int, concurrency: int) -> dict[str, float]:
    """Deploy one variant, warm it up, time the load, delete it."""
    from ray import serve

    from deployments.embedder import Embedder

    app_name = f"embedder-{variant.max_batch_size}-{int(variant.batch_wait_timeout_s * 1000)}ms"
    config = EmbedderConfig(max_batch_size=variant.max_batch_size, batch_wait_timeout_s=variant.batch_wait_timeout_s)
    app = serve.deployment(Embedder, name="Embedder", num_replicas=1, max_ongoing_requests=256,
                           ray_actor_options={"num_cpus": 0}).bind(config)
    handle = serve.run(app, name=app_name, route_prefix=None)
    try:
        await drive(handle, WARMUP_CALLS, concurrency, offset=10_000_000)
        wall_s, latencies = await drive(handle, requests, concurrency, offset=0)
    finally:
        serve.delete(app_name)
    return {"sentences_per_s": requests / wall_s, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99)}


async def measure_all(requests: int, concurrency: int) -> dict[str, dict[str, float]]:
    """Start Serve, measure every variant in turn, shut Serve down (all on one event loop)."""
    from ray import serve

    serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
    try:
        results: dict[str, dict[str, float]] = {}
        for variant in VARIANTS:
            results[variant.name] = await measure(variant, requests, concurrency)
            print(f"[{variant.name}] {results[variant.name]['sentences_per_s']:.0f} sentences/s", flush=True)
        return results
    finally:
        # With the throughput flag, the driver's handles live on this loop; shut down while it runs.
        await serve.shutdown_async()


def run_throughput(requests: int = 2000, concurrency: int = 32) -> dict[str, float]:
    """Measure every variant on a fresh local cluster; return ``"<variant>.<figure>"`` -> value, and the speed-ups."""
    # Serve reads its flags when it is imported, here and in every process Ray starts from here.
    os.environ.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        results = asyncio.run(measure_all(requests, concurrency))
    finally:
        ray.shutdown()
    flat = {f"{name}.{key}": value for name, figures in results.items() for key, value in figures.items()}
    baseline = results[BASELINE]["sentences_per_s"]
    flat.update({f"{name}.speedup": figures["sentences_per_s"] / baseline for name, figures in results.items()})
    return flat


def table(figures: dict[str, float]) -> str:
    """The Markdown table: one row per variant."""
    lines = ["| variant | max_batch_size | batch_wait_timeout_s | sentences/s | p50 ms | p99 ms | speed-up vs unbatched |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        f = {key: figures[f"{v.name}.{key}"] for key in ("sentences_per_s", "p50_ms", "p99_ms", "speedup")}
        lines.append(f"| {v.name} | {v.max_batch_size} | {v.batch_wait_timeout_s:g} | {f['sentences_per_s']:.0f} "
                     f"| {f['p50_ms']:.1f} | {f['p99_ms']:.1f} | {f['speedup']:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    """Parse the options, measure, print the table and the default batched/unbatched ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="measured calls per variant")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    args = parser.parse_args()
    figures = run_throughput(args.requests, args.concurrency)
    print(f"\nEmbedder, one sentence per call, {args.requests} calls at concurrency {args.concurrency}\n")
    print(table(figures))
    ratio = figures[f"{DEFAULT}.speedup"]
    print(f"\nbatched / unbatched: {ratio:.2f}× (goal ≥ 4×: {'met' if ratio >= 4 else 'NOT met'})")


if __name__ == "__main__":
    main()
