"""Observability on the running graph: metrics (known traffic in GET /metrics), the overview and its series
against the ledger, alert rules firing and resolving, the JSON request log."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.metrics import METRICS, prometheus_text
from tests.integration.conftest import ALERT_BUDGET, ALERT_RULE, Deployed, ledger_row

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


def test_series_buckets_match_the_ledger(deployed: Deployed) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": f"series {uuid.uuid4()}"}]}
    request_id = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {deployed.api_key}"}).headers["x-request-id"]
    ledger_row(deployed, request_id)
    series = httpx.get(f"{deployed.base_url}/admin/overview/series", params={"window_s": 600, "bucket_s": 60},
                       headers=admin, timeout=30).json()
    assert len(series["points"]) == 10 and series["bucket_s"] == 60
    overview = httpx.get(f"{deployed.base_url}/admin/overview", headers=admin, timeout=30,
                         params={"from_ts": series["from_ts"], "to_ts": series["to_ts"]}).json()
    assert sum(p["requests"] for p in series["points"]) == overview["requests"] >= 1
    assert sum(p["cost_usd"] for p in series["points"]) == pytest.approx(overview["cost_usd"])
    too_many = httpx.get(f"{deployed.base_url}/admin/overview/series", params={"window_s": 86400, "bucket_s": 10},
                         headers=admin, timeout=30)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "bucket_s"


def test_an_alert_rule_fires_and_resolves(deployed: Deployed) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    tag = f"alerts-{uuid.uuid4().hex[:6]}"
    budget = {"scope": "tag", "scope_value": tag, "limit_tokens": 100, "alert_thresholds": [5.0]}
    assert httpx.put(f"{deployed.base_url}/admin/budgets/{ALERT_BUDGET}", json=budget, headers=admin).status_code == 200
    try:
        body = {"model": "echo", "max_tokens": 16, "messages": [{"role": "user", "content": "spend a little"}]}
        answer = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {deployed.api_key}", "x-raygate-tag": tag})
        assert answer.status_code == 200
        firing = rule_alert(deployed, "firing")  # the evaluation is asked for; the periodic one may come first
        assert firing["kind"] == "threshold" and firing["value"] > 0.1 and firing["limit"] == 0.1
        assert "budget_spent_fraction" in firing["message"]
        budget["limit_tokens"] = 10_000_000  # the budget is raised: the condition clears
        assert httpx.put(f"{deployed.base_url}/admin/budgets/{ALERT_BUDGET}", json=budget,
                         headers=admin).status_code == 200
        resolved = rule_alert(deployed, "resolved")
        assert resolved["id"] == firing["id"] and resolved["resolved_at"] >= firing["created_at"]
        overview = httpx.get(f"{deployed.base_url}/admin/overview", headers=admin, timeout=30).json()
        assert any(a["id"] == firing["id"] and a["state"] == "resolved" for a in overview["alerts"])
    finally:
        httpx.delete(f"{deployed.base_url}/admin/budgets/{ALERT_BUDGET}", headers=admin)


def rule_alert(deployed: Deployed, state: str) -> dict[str, Any]:
    """The test rule's newest alert once it is in ``state`` (evaluating now, polled up to 20 s)."""
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    deadline = time.monotonic() + 20
    while True:
        assert httpx.post(f"{deployed.base_url}/admin/alerts/evaluate", headers=admin, timeout=30).status_code == 200
        alerts = [a for a in httpx.get(f"{deployed.base_url}/admin/alerts", headers=admin, timeout=30).json()
                  if a["rule"] == ALERT_RULE]
        if alerts and alerts[0]["state"] == state:
            return dict(alerts[0])
        assert time.monotonic() < deadline, alerts[:2]


def test_each_request_is_one_json_log_line_without_content(deployed: Deployed, session_data_dir: Path) -> None:
    secret = f"do-not-log-{uuid.uuid4()}"
    body = {"model": "echo", "messages": [{"role": "user", "content": secret}]}
    request_id = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                            headers={"Authorization": f"Bearer {deployed.api_key}"}).headers["x-request-id"]
    log = session_data_dir / "logs" / "requests.jsonl"
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        line = next((entry for entry in lines if entry["request_id"] == request_id), None)
        if line is not None:
            break
        assert time.monotonic() < deadline, "no log line for the request"
    assert (line["event"], line["tenant"], line["model"], line["status"]) == ("request", "acme", "echo", 200)
    assert line["cache"] in ("miss", "bypass") and line["latency_ms"] > 0 and "content" not in line
    text = log.read_text()
    assert secret not in text and deployed.api_key not in text and deployed.admin_key not in text
