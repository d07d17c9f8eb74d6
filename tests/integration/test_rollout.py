"""Rollouts under traffic: a live ``user_config`` change (a price) and a model's replica count keep the Gateway
replica, an ``args`` change (a new model) replaces it, and no request fails throughout.

Its own app (``/rollout``) on the suite's cluster, Valkey and upstream, with its own data dir, deployed from a
config the way ``serve deploy serve_config.yaml`` does (the controller's ``apply_config``; the CLI reaches it
through the dashboard, which the test cluster does not run).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.harness import deploy_config_app, replica_actors
from tests.integration.conftest import NO_RATE_LIMITS, Deployed

pytestmark = pytest.mark.integration

APP, PREFIX = "rollout", "/rollout"
PRICE = {"input_price_per_1m_usd": 3.0, "output_price_per_1m_usd": 6.0}


def args(deployed: Deployed, data_dir: Path, *, second_model: bool = False) -> dict[str, Any]:
    echo = {"engine": "remote", "engine_params": {"base_url": deployed.upstream.base_url, "model": "e"}, **PRICE}
    models = [{"name": "echo", **echo}] + ([{"name": "echo-two", **echo}] if second_model else [])
    return {"models": models, "stores": {"redis_url": deployed.redis_url, "data_dir": str(data_dir)},
            "guard": NO_RATE_LIMITS, "cache": {"enabled": False}, "gateway": {"ledger_flush_interval_s": 0.1},
            "placement": {"models": "deployment"}}  # Model_echo scaled on its own


def deploy(app_args: dict[str, Any], user_config: dict[str, Any], model_replicas: int = 1) -> None:
    """What ``serve deploy`` does with a config holding this app."""
    deploy_config_app({"name": APP, "route_prefix": PREFIX, "import_path": "serve_app.graph:build_app",
                       "args": app_args, "deployments": [{"name": "Gateway", "user_config": user_config},
                                                         {"name": "Model_echo", "num_replicas": model_replicas}]})


def gateway_actors() -> set[str]:
    return replicas("Gateway")


def replicas(deployment: str) -> set[str]:
    return set(replica_actors(APP, deployment))


class Traffic:
    """Requests sent back to back from a thread until stopped; every status is kept."""

    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                body = {"model": "echo", "messages": [{"role": "user", "content": f"rollout {uuid.uuid4()}"}]}
                try:
                    status = client.post(self.url, json=body, headers={"Authorization": f"Bearer {self.key}"}
                                         ).status_code
                except httpx.HTTPError:
                    status = 0
                self.statuses.append(status)


@pytest.fixture(scope="module")
def rollout(deployed: Deployed, session_data_dir: Path) -> Iterator[dict[str, Any]]:
    from ray import serve

    data_dir = session_data_dir / "rollout"
    deploy(args(deployed, data_dir), {})
    base_url = f"{deployed.base_url}{PREFIX}"
    wait_until(lambda: httpx.get(f"{base_url}/health", timeout=10).status_code == 200, 120)
    traffic = Traffic(f"{base_url}/v1/chat/completions", deployed.api_key)
    traffic.thread.start()
    yield {"base_url": base_url, "data_dir": data_dir, "traffic": traffic}
    traffic.stop.set()
    traffic.thread.join(30)
    serve.delete(APP)


def wait_until(check: Any, timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if value := check():
                return value
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "condition never met"
        time.sleep(0.2)


def latest_cost(deployed: Deployed, base_url: str) -> float:
    rows = httpx.get(f"{base_url}/admin/requests", params={"limit": 1},
                     headers={"Authorization": f"Bearer {deployed.admin_key}"}, timeout=10).json()
    return float(rows[0]["cost_usd"]) / max(rows[0]["prompt_tokens"] + rows[0]["completion_tokens"], 1)


def test_user_config_applies_live_then_args_roll_the_gateway(deployed: Deployed, rollout: dict[str, Any]) -> None:
    traffic, base_url = rollout["traffic"], rollout["base_url"]
    wait_until(lambda: len(traffic.statuses) >= 5, 60)
    before = gateway_actors()
    cheap = wait_until(lambda: latest_cost(deployed, base_url), 30)

    tenfold = {"prices": {"echo": {"input_price_per_1m_usd": 30.0, "output_price_per_1m_usd": 60.0}}}
    deploy(args(deployed, rollout["data_dir"]), tenfold)
    wait_until(lambda: latest_cost(deployed, base_url) > 5 * cheap, 60)
    assert gateway_actors() == before  # reconfigured in place, not replaced

    deploy(args(deployed, rollout["data_dir"]), tenfold, model_replicas=2)  # a deployment option: in place
    wait_until(lambda: len(replicas("Model_echo")) == 2, 120)
    assert gateway_actors() == before

    sent = len(traffic.statuses)
    deploy(args(deployed, rollout["data_dir"], second_model=True), tenfold, model_replicas=2)  # args: a new model
    answer = {"model": "echo-two", "messages": [{"role": "user", "content": "new model"}]}
    wait_until(lambda: httpx.post(f"{base_url}/v1/chat/completions", json=answer, timeout=30,
                                  headers={"Authorization": f"Bearer {deployed.api_key}"}).status_code == 200, 120)
    wait_until(lambda: gateway_actors() and not gateway_actors() & before, 120)  # the old replica is gone
    wait_until(lambda: len(traffic.statuses) > sent + 20, 60)  # traffic kept flowing through the switch

    traffic.stop.set()
    traffic.thread.join(30)
    failed = [s for s in traffic.statuses if s != 200]
    assert failed == [], f"{len(failed)} of {len(traffic.statuses)} requests failed: {sorted(set(failed))}"
