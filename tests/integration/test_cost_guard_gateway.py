"""Plans, budgets, downgrades and denials through the gateway, in both placements of CostGuard."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from serve_app.protocol import ChatCompletionRequest
from serve_app.spend import estimate_prompt_tokens
from tests.fake_upstream import FakeUpstream
from tests.integration.conftest import Deployed, create_key

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "what grit do laying hens need"}]
MAX_TOKENS = 8
PER_REQUEST = estimate_prompt_tokens(ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES})) \
    + MAX_TOKENS
QUOTA_REQUESTS = 37  # the free plan's daily quota covers exactly this many requests
ECHO_BUDGET_TOKENS = 3 * PER_REQUEST
RPM = 7  # the enterprise plan's requests per minute in this app


class WebhookReceiver:
    """A local HTTP server that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def costs_args(upstream_url: str, data_dir: Path, redis_url: str, placement: str, tenant: str,
               webhook_url: str) -> dict[str, Any]:
    params = {"base_url": upstream_url, "model": "slow-or-fast"}
    return {
        "models": [
            {"name": "echo", "engine": "remote", "engine_params": params,
             "input_price_per_1m_usd": 10.0, "output_price_per_1m_usd": 30.0},
            {"name": "cheap", "engine": "remote", "engine_params": params,
             "input_price_per_1m_usd": 0.1, "output_price_per_1m_usd": 0.3},
        ],
        "stores": {"redis_url": redis_url, "data_dir": str(data_dir)},
        "gateway": {"ledger_flush_interval_s": 0.1},
        "placement": {"cost_guard": placement, "guard": placement, "router": placement, "cache": placement},
        "router": {"tiers": {"simple_explanation": "cheap", "deep_analysis": "echo"}},
        # 500 requests at once from a new key are a flood: off here, this app tests quotas and rpm.
        "guard": {"plans": {"free": {}, "premium": {}, "enterprise": {"requests_per_minute": RPM}},
                  "flood": {"enabled": False}},
        "alerts": {"webhook_url": webhook_url},
        # Exact layer only: the main app's SemanticCache holds the data dir's Qdrant (one process per dir).
        "cache": {"semantic": {"enabled": False}},
        "cost_guard": {
            "plans": {
                "free": {"daily_tokens": QUOTA_REQUESTS * PER_REQUEST, "allowed_models": ["echo", "cheap"]},
                "premium": {"daily_tokens": 1_000_000, "downgrade_model": "cheap", "max_tokens_cap": 50},
                "enterprise": {"allowed_models": ["cheap"]},
            },
            "budgets": [
                {"id": f"echo-{tenant}", "scope": "model", "scope_value": "echo", "limit_tokens": ECHO_BUDGET_TOKENS},
                {"id": f"tag-{tenant}", "scope": "tag", "scope_value": f"agent-{tenant}", "limit_tokens": PER_REQUEST},
            ],
        },
    }


@pytest.fixture(scope="module", params=["embedded", "deployment"])
def costs(request: pytest.FixtureRequest, deployed: Deployed, session_data_dir: Path) -> Iterator[dict[str, Any]]:
    """An app with its own plans and budgets, 2 Gateway replicas, on a slow upstream."""
    from ray import serve

    from serve_app.graph import build_graph

    placement = request.param
    tenant = uuid.uuid4().hex[:6]
    upstream = FakeUpstream(latency_ms=0)
    webhook = WebhookReceiver()
    with upstream.run_in_thread() as upstream_url:
        args = costs_args(upstream_url, session_data_dir / f"costs-{placement}", deployed.redis_url, placement, tenant,
                          webhook.url)
        name = f"costs-{placement}"
        serve.run(build_graph(args, gateway_options={"num_replicas": 2}), name=name, route_prefix=f"/{name}")
        yield {"base_url": f"{deployed.base_url}/{name}", "upstream": upstream, "tenant": tenant,
               "redis_url": deployed.redis_url, "admin_key": deployed.admin_key, "placement": placement,
               "webhook": webhook}
        serve.delete(name)
    webhook.server.shutdown()


def key_for(costs: dict[str, Any], plan: str) -> str:
    return create_key(costs["redis_url"], costs["tenant"], f"user-{uuid.uuid4().hex[:6]}", plan)


def sdk(costs: dict[str, Any], key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{costs['base_url']}/v1", api_key=key, max_retries=0)


def test_downgrade_when_the_model_budget_is_spent(costs: dict[str, Any]) -> None:
    client = sdk(costs, key_for(costs, "premium"))
    models = []
    for _ in range(8):
        raw = client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES, max_tokens=MAX_TOKENS)
        models.append((raw.headers["x-raygate-model"], raw.headers.get("x-raygate-downgraded")))
    served_by_echo = models.count(("echo", None))
    # Settles count real usage (less than reserved), so at least 3 and at most 5 fit the echo budget...
    assert 3 <= served_by_echo <= 5
    # ...then every request is downgraded, and says so.
    assert models == [("echo", None)] * served_by_echo + [("cheap", "echo->cheap")] * (8 - served_by_echo)


def test_plan_max_tokens_cap_is_sent_upstream(costs: dict[str, Any]) -> None:
    client = sdk(costs, key_for(costs, "premium"))
    client.chat.completions.create(model="cheap", messages=MESSAGES, max_tokens=5000)
    assert costs["upstream"].last_body["max_tokens"] == 50


def test_plan_that_forbids_a_model_is_403(costs: dict[str, Any]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as info:
        sdk(costs, key_for(costs, "enterprise")).chat.completions.create(model="echo", messages=MESSAGES)
    assert info.value.code == "model_not_allowed"


def test_tag_budget_denial_names_the_budget_and_reset(costs: dict[str, Any]) -> None:
    client = sdk(costs, key_for(costs, "premium"))
    headers = {"x-raygate-tag": f"agent-{costs['tenant']}"}
    client.chat.completions.create(model="cheap", messages=MESSAGES, max_tokens=MAX_TOKENS, extra_headers=headers)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="cheap", messages=MESSAGES, max_tokens=MAX_TOKENS, extra_headers=headers)
    assert info.value.code == "insufficient_quota"
    assert f"tag-{costs['tenant']}" in info.value.message and "resets" in info.value.message
    assert 0 < int(info.value.response.headers["retry-after"]) <= 86_400


def test_usage_endpoint_shows_the_keys_quota(costs: dict[str, Any]) -> None:
    key = key_for(costs, "free")
    sdk(costs, key).chat.completions.create(model="cheap", messages=MESSAGES, max_tokens=MAX_TOKENS)
    deadline = time.monotonic() + 10
    usage: dict[str, Any] = {}
    while usage.get("used_tokens", 0) == 0 and time.monotonic() < deadline:  # settling is off the client's path
        usage = httpx.get(f"{costs['base_url']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["limit_tokens"] == QUOTA_REQUESTS * PER_REQUEST
    assert 0 < usage["used_tokens"] <= PER_REQUEST
    assert usage["remaining_tokens"] == usage["limit_tokens"] - usage["used_tokens"] - usage["reserved_tokens"]


def test_concurrent_requests_never_overshoot_the_quota(costs: dict[str, Any]) -> None:
    """500 concurrent requests from one user over 2 Gateway replicas: exactly the quota's worth pass."""
    key = key_for(costs, "free")
    costs["upstream"].latency_ms = 8000  # every reservation is made before any settles (~3 s for 500)

    async def fire() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=500)
        async with httpx.AsyncClient(limits=limits, timeout=120) as client:
            body = {"model": "cheap", "messages": MESSAGES, "max_tokens": MAX_TOKENS}  # no model budget on cheap
            return await asyncio.gather(*(client.post(f"{costs['base_url']}/v1/chat/completions", json=body,
                                                      headers={"Authorization": f"Bearer {key}"})
                                          for _ in range(500)))

    try:
        responses = asyncio.run(fire())
    finally:
        costs["upstream"].latency_ms = 0
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == QUOTA_REQUESTS
    assert statuses.count(429) == 500 - QUOTA_REQUESTS
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 429} == {"insufficient_quota"}
    usage = httpx.get(f"{costs['base_url']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["used_tokens"] + usage["reserved_tokens"] <= usage["limit_tokens"]
    ids = {r.headers["x-request-id"] for r in responses}
    admin = {"Authorization": f"Bearer {costs['admin_key']}"}
    deadline = time.monotonic() + 20
    recorded: set[str] = set()
    while not ids <= recorded and time.monotonic() < deadline:
        rows = httpx.get(f"{costs['base_url']}/admin/requests", params={"limit": 1000, "tenant": costs["tenant"]},
                         headers=admin).json()
        recorded = {row["id"] for row in rows}
    assert ids <= recorded  # the ledger holds every request, denied ones included


def test_budget_alert_is_stored_and_sent_once(costs: dict[str, Any]) -> None:
    """The downgrade test spent most of the echo budget: its 80 % threshold was crossed once."""
    budget = f"echo-{costs['tenant']}"
    admin = {"Authorization": f"Bearer {costs['admin_key']}"}
    deadline = time.monotonic() + 10
    stored: list[dict[str, Any]] = []
    while not stored and time.monotonic() < deadline:
        alerts = httpx.get(f"{costs['base_url']}/admin/alerts", headers=admin).json()
        stored = [a for a in alerts if a["budget_id"] == budget and a["threshold"] == 0.8]
    assert len(stored) == 1
    sent: list[dict[str, Any]] = []
    while not sent and time.monotonic() < deadline:
        sent = [b for b in costs["webhook"].received if b["budget_id"] == budget and b["threshold"] == 0.8]
    assert len(sent) == 1 and sent[0]["id"] == stored[0]["id"]


def test_cost_report_equals_the_ledger(costs: dict[str, Any]) -> None:
    admin = {"Authorization": f"Bearer {costs['admin_key']}"}
    params = {"tenant": costs["tenant"]}
    rows = httpx.get(f"{costs['base_url']}/admin/requests", params={**params, "limit": 1000}, headers=admin).json()
    report = httpx.get(f"{costs['base_url']}/admin/costs", params={**params, "group_by": "model"}, headers=admin).json()
    by_model = {r["key"]: r for r in report["rows"]}
    for model in ("echo", "cheap"):
        mine = [r for r in rows if r["model"] == model]
        assert by_model[model]["requests"] == len(mine)
        assert by_model[model]["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in mine))
    csv_text = httpx.get(f"{costs['base_url']}/admin/costs", headers=admin,
                         params={**params, "group_by": "model", "format": "csv"}).text
    assert csv_text.splitlines()[0].startswith("key,") and len(csv_text.splitlines()) == len(report["rows"]) + 1


def test_budget_put_through_the_admin_api_applies_without_restart(costs: dict[str, Any]) -> None:
    admin = {"Authorization": f"Bearer {costs['admin_key']}"}
    tag = f"live-{costs['tenant']}"
    budget = {"scope": "tag", "scope_value": tag, "limit_tokens": 1}
    assert httpx.put(f"{costs['base_url']}/admin/budgets/{tag}", json=budget, headers=admin).status_code == 200
    client = sdk(costs, key_for(costs, "premium"))
    deadline = time.monotonic() + 10
    denied = False
    while not denied and time.monotonic() < deadline:  # both Gateway replicas pick it up within 1 s
        try:
            client.chat.completions.create(model="cheap", messages=MESSAGES, extra_headers={"x-raygate-tag": tag})
        except openai.RateLimitError:
            denied = True
    assert denied
    assert httpx.delete(f"{costs['base_url']}/admin/budgets/{tag}", headers=admin).status_code == 200


def test_rate_limit_is_exact_across_two_gateway_replicas(costs: dict[str, Any]) -> None:
    key = key_for(costs, "enterprise")

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "cheap", "messages": MESSAGES, "max_tokens": MAX_TOKENS}
            return await asyncio.gather(*(client.post(f"{costs['base_url']}/v1/chat/completions", json=body,
                                                      headers={"Authorization": f"Bearer {key}"})
                                          for _ in range(3 * RPM)))

    responses = asyncio.run(fire())
    allowed = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    assert len(allowed) == RPM and len(denied) == 2 * RPM
    assert {r.json()["error"]["code"] for r in denied} == {"rate_limit_exceeded"}
    # Up to two minutes: a burst just after a minute starts waits for that minute to slide out too.
    assert all(1 <= int(r.headers["retry-after"]) <= 120 for r in denied)
    assert all(r.headers["x-ratelimit-limit-requests"] == str(RPM) for r in allowed + denied)
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in allowed) == list(range(RPM))
    # A named model's reservation goes out with the rate check: each refused request's is released.
    deadline, usage = time.monotonic() + 10, {"reserved_tokens": None}
    while usage["reserved_tokens"] != 0 and time.monotonic() < deadline:
        usage = httpx.get(f"{costs['base_url']}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["reserved_tokens"] == 0, usage
    assert 0 < usage["used_tokens"] <= RPM * PER_REQUEST


def test_model_auto_is_routed_in_either_placement(costs: dict[str, Any]) -> None:
    response = httpx.post(f"{costs['base_url']}/v1/chat/completions", timeout=30,
                          json={"model": "auto", "messages": [{"role": "user", "content": "What is a hen?"}]},
                          headers={"Authorization": f"Bearer {key_for(costs, 'premium')}"})
    assert response.status_code == 200, response.text
    assert response.headers["x-raygate-route"] == "simple_explanation/cheap"


def test_a_repeated_question_is_a_cache_hit_in_either_placement(costs: dict[str, Any]) -> None:
    """The exact cache answers the second asking, embedded or as its own Cache deployment, billing nothing."""
    from ray import serve

    deployments = serve.status().applications[f"costs-{costs['placement']}"].deployments
    assert ("Cache" in deployments) == (costs["placement"] == "deployment")
    headers = {"Authorization": f"Bearer {key_for(costs, 'premium')}"}
    body = {"model": "cheap", "temperature": 0, "max_tokens": 50,
            "messages": [{"role": "user", "content": f"Name a colour {uuid.uuid4().hex}"}]}
    first = httpx.post(f"{costs['base_url']}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert first.status_code == 200 and first.headers["x-raygate-cache"] == "miss", first.text
    deadline = time.monotonic() + 10  # the store runs off the client's path
    second = first
    while second.headers.get("x-raygate-cache") != "hit" and time.monotonic() < deadline:
        second = httpx.post(f"{costs['base_url']}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert second.status_code == 200, second.text
    assert second.headers["x-raygate-cache"] == "hit"
    assert second.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert second.json()["usage"]["total_tokens"] == 0  # billed nothing
    assert second.json()["raygate"]["original_usage"] == first.json()["usage"]
    # The premium plan caps 5000 at 50: this is the first request again. Its early exact read,
    # planned for 5000 before the reservation, misses; the lookup of the request as capped hits.
    again = httpx.post(f"{costs['base_url']}/v1/chat/completions", json={**body, "max_tokens": 5000},
                       headers=headers, timeout=30)
    assert again.status_code == 200 and again.headers["x-raygate-cache"] == "hit", again.text
