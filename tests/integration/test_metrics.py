"""Metrics through Ray's pipeline: known traffic shows up in GET /metrics with the right labels and values."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from serve_app.metrics import METRICS, prometheus_text
from tests.integration.conftest import Deployed

pytestmark = pytest.mark.integration


def value(text: str, name: str, **labels: str) -> float:
    """The sum of a series' samples whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_text_drops_rays_prefix_and_other_series() -> None:
    page = ('# HELP ray_raygate_requests_total x\n# TYPE ray_raygate_requests_total counter\n'
            'ray_raygate_requests_total{model="m"} 3.0\nray_node_cpu_count 2\n')
    assert prometheus_text(page) == ('# HELP raygate_requests_total x\n# TYPE raygate_requests_total counter\n'
                                     'raygate_requests_total{model="m"} 3.0\n')
    assert all(re.match(r"^raygate_[a-z_]+$", name) for name in METRICS)


def test_known_traffic_is_counted(deployed: Deployed) -> None:
    tag = f"metrics-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {deployed.api_key}", "x-raygate-tag": tag}
    for _ in range(3):
        body = {"model": "echo", "messages": [{"role": "user", "content": f"count me {uuid.uuid4()}"}]}
        assert httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, headers=headers).status_code == 200
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    assert httpx.get(f"{deployed.base_url}/metrics", headers={"Authorization": f"Bearer {deployed.api_key}"}
                     ).status_code == 403
    deadline = time.monotonic() + 60  # Ray's agent exports every few seconds
    while True:
        text = httpx.get(f"{deployed.base_url}/metrics", headers=admin, timeout=30).text
        if value(text, "raygate_cost_usd_total", tag=tag) > 0 and value(
                text, "raygate_request_latency_seconds_count", model="echo") >= 3:
            break
        assert time.monotonic() < deadline, text[:2000]
    assert value(text, "raygate_requests_total", model="echo", status="200") >= 3
    assert value(text, "raygate_tokens_total", model="echo", kind="completion") > 0
    assert value(text, "raygate_cost_usd_total", tag=tag, tenant="acme", model="echo") > 0
    assert "# TYPE raygate_upstream_latency_seconds histogram" in text


def test_overview_matches_the_ledger_and_reports_health(deployed: Deployed) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    started = time.time()
    body = {"model": "echo", "messages": [{"role": "user", "content": f"overview {uuid.uuid4()}"}]}
    ids = [httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {deployed.api_key}"}).headers["x-request-id"]
           for _ in range(2)]
    overview = httpx.get(f"{deployed.base_url}/admin/overview", params={"from_ts": started}, headers=admin,
                         timeout=30).json()
    rows = [r for r in httpx.get(f"{deployed.base_url}/admin/requests", params={"limit": 1000}, headers=admin,
                                 timeout=30).json() if r["created_at"] >= started]
    assert {r["id"] for r in rows} >= set(ids)
    assert overview["requests"] == len(rows) and overview["latency_ms"]["p50"] > 0
    assert overview["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in rows))
    assert overview["health"]["ledger"] == "ok" and overview["health"]["model:echo"] == "ok"
    assert isinstance(overview["budgets"], list) and isinstance(overview["experiments"], list)
