"""What the benchmarks share: a load generator, percentiles, CPU time per process role, the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

SERVER_ROLES = ("proxy", "haproxy", "gateway", "model", "ledger", "upstream", "ray")
# Process title marker -> role; anything else under the cluster (GCS, raylet, controller, Embedder) is "ray".
# With RAY_SERVE_ENABLE_HA_PROXY=1 the HAProxyManager actor runs the HAProxy binary ("haproxy -db") as its child.
ROLE_MARKERS = (("ProxyActor", "proxy"), ("HAProxyManager", "proxy"), ("haproxy -db", "haproxy"),
                (":Gateway", "gateway"), (":Model_", "model"), (":Ledger", "ledger"), ("fake_upstream", "upstream"))
Snapshot = dict[int, tuple[str, float]]  # pid -> (role, CPU seconds)


@dataclass
class Stats:
    """Figures of one measured phase; for streams p50/p99 are the time to first byte."""

    path: str
    concurrency: int
    n: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)


def free_port() -> int:
    """Return a port free on 127.0.0.1 now (another process may take it later; fine for a bench)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile by nearest rank: no interpolation hides a tail of a few requests."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))] if ordered else math.nan


def cpu_snapshot() -> Snapshot:
    """Return (role, CPU seconds so far) of this process and every descendant, by pid."""
    me = psutil.Process()
    snapshot: Snapshot = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            cmd = " ".join(proc.cmdline())
            role = "client" if proc.pid == me.pid else next((r for m, r in ROLE_MARKERS if m in cmd), "ray")
            times = proc.cpu_times()
            snapshot[proc.pid] = (role, times.user + times.system)
    return snapshot


def cpu_ms_per_req(before: Snapshot, after: Snapshot, n: int) -> dict[str, float]:
    """Return CPU ms per request by role between two snapshots, plus ``server`` (all but the client)."""
    result: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        result[role] = result.get(role, 0.0) + (seconds - before.get(pid, (role, 0.0))[1]) * 1000 / max(n, 1)
    result["server"] = sum(v for k, v in result.items() if k in SERVER_ROLES)
    return result


async def run_load(path: str, call: Callable[[], Awaitable[bool]], load: tuple[int, int, int], max_s: float) -> Stats:
    """Send ``n`` calls (``load`` is n, concurrency, warmup) after ``warmup`` unmeasured ones.

    Warm-up calls open connections and fill Serve's caches. No call starts after ``max_s`` seconds
    of measuring, so a collapsed variant cannot take minutes; the figures cover the calls that ran.
    """
    n, concurrency, warmup = load
    latencies: list[float] = []
    errors, remaining, deadline = 0, warmup, math.inf

    async def worker(record: bool) -> None:
        nonlocal remaining, errors
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            started = time.perf_counter()
            try:
                ok = await call()
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                ok = False
            if record:
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not ok

    await asyncio.gather(*(worker(False) for _ in range(concurrency)))
    remaining, before, started = n, cpu_snapshot(), time.perf_counter()
    deadline = started + max_s
    await asyncio.gather(*(worker(True) for _ in range(concurrency)))
    wall_s, after = time.perf_counter() - started, cpu_snapshot()
    return Stats(path, concurrency, len(latencies), percentile(latencies, 50), percentile(latencies, 99),
                 len(latencies) / wall_s, errors, cpu_ms_per_req(before, after, len(latencies)))


def start_upstream(*extra_args: str) -> tuple[subprocess.Popen[str], str]:
    """Start ``tests.fake_upstream`` in its own process; return it and its base URL.

    Args:
        extra_args: more of its command-line options (e.g. ``--chaos-rate 0.3``).
    """
    cmd = [sys.executable, "-m", "tests.fake_upstream", "--port", str(free_port()), "--latency-ms", "0", *extra_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    killer = threading.Timer(30, proc.kill)  # the readline loop below must not block forever
    killer.start()
    try:
        for line in proc.stdout or ():
            if "listening on" in line:
                return proc, line.rsplit(" ", 1)[-1].strip()
    finally:
        killer.cancel()
    raise RuntimeError(f"fake upstream exited (rc {proc.wait()}) without a 'listening on' line")


def deploy_config_app(app: dict[str, Any]) -> None:
    """Deploy one application the way ``serve deploy`` does (the controller's ``apply_config``: ``user_config``
    and deployment options apply in place, new args replace replicas); the CLI needs the dashboard, this does not."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))


def replica_actors(app: str, deployment: str) -> dict[str, str]:
    """A deployment's live replica actors, name -> namespace (Serve names them ``SERVE_REPLICA::app#dep#id``;
    no state API, which needs the dashboard)."""
    import ray

    marker = f"::{app}#{deployment}#"
    return {a["name"]: a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if marker in a["name"]}


def wait_quiet(max_load: float, wait_s: float) -> tuple[float, bool]:
    """Poll the 1-minute load average until it is below ``max_load`` (at most ``wait_s``); return it."""
    deadline = time.monotonic() + wait_s
    while (load := os.getloadavg()[0]) >= max_load and time.monotonic() < deadline:
        print(f"load average {load:.2f} >= {max_load}: waiting ...", flush=True)
        time.sleep(15)
    return load, load < max_load


def machine() -> str:
    """Cores, memory, Python and Ray, in a phrase."""
    import platform

    import psutil

    try:
        from importlib.metadata import version

        ray_version = version("ray")
    except Exception:  # noqa: BLE001 - only for the description
        ray_version = "?"
    return (f"{os.cpu_count()} CPU cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"Python {platform.python_version()}, Ray {ray_version}")
