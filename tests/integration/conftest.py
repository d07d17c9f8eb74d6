"""One real local Ray cluster per test session, with raygate's graph served over HTTP.

The graph serves: ``tiny`` (hf engine, the generated tiny model), ``echo`` (the
remote engine against a fake OpenAI-compatible upstream started here), ``broken``
(a remote model whose upstream is down, falling back to ``echo``), and three models
on a second, fault-injecting fake (``flaky`` with fallback, ``flaky-solo`` without,
``circuit`` with a quick circuit breaker), and the vision-capable ``vision-echo``,
``vision-claude`` and ``vision-flaky`` (falling back past the text-only ``echo``), and ``echo-small``
(``echo`` with a 300-token window, for conversation history; ``echo`` summarises), and ``judge`` and
``weak-answer`` (self-evaluation: sampled for the ``judged`` tenant only, sync on weak-answer, retried on echo),
and ``batch-slow`` (on the fault-injecting fake, whose latency the batch tests set).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fake_upstream import FakeUpstream

# Replicas inherit the environment Ray starts with: set before ray.init.
UPSTREAM_KEY = "sk-upstream-test"
GC_THRESHOLD = 12_345  # test_gateway_process: neither Python's default nor raygate's
os.environ["RAYGATE_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(redis_url: str, tenant: str, user: str, plan: str, *, admin: bool = False) -> str:
    """Create an API key directly in Redis."""
    from serve_app.auth import KeyStore
    from serve_app.stores import redis_client

    async def create() -> str:
        store = KeyStore(redis_client(redis_url))
        key, _ = await store.create(tenant, user, plan, admin=admin)  # type: ignore[arg-type]
        await store.redis.aclose()
        return key

    return asyncio.run(create())


def ledger_row(deployed: "Deployed", request_id: str) -> dict[str, Any]:
    """The ledger's row of a request, once the gateway's buffer has sent it (polled, 10 s at most)."""
    import time

    import httpx

    deadline = time.monotonic() + 10
    while True:
        rows = httpx.get(f"{deployed.base_url}/admin/requests", params={"limit": 100},
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}).json()
        row = next((r for r in rows if r["id"] == request_id), None)
        if row is not None:
            return dict(row)
        assert time.monotonic() < deadline, "the request never reached the ledger"


@dataclass
class Deployed:
    """What the tests talk to."""

    base_url: str
    api_key: str
    admin_key: str
    redis_url: str
    upstream: FakeUpstream
    flaky: FakeUpstream


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """A fake OpenAI-compatible upstream on 127.0.0.1, in a background thread."""
    upstream = FakeUpstream()
    with upstream.run_in_thread() as base_url:
        yield upstream, base_url


@pytest.fixture(scope="session")
def flaky_upstream() -> Iterator[tuple[FakeUpstream, str]]:
    """A second fake upstream, whose faults the resilience tests queue."""
    upstream = FakeUpstream()
    with upstream.run_in_thread() as base_url:
        yield upstream, base_url


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[int]:
    """A fresh local Ray cluster (never an existing one) with Serve on a free port; yields the port."""
    import ray
    from ray import serve

    port = free_port()
    # Set here, not for the whole session: Serve's local testing mode (unit tests) mishandles
    # the flag's same-loop handles in Ray 2.60, while the cluster is meant to run with it.
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    # That flag also buffers 1000 log records per replica before writing; tests that read the
    # replicas' log files (test_redaction) need each record on disk when it is logged.
    os.environ["RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE"] = "1"
    # It also makes a stopping Gateway replica drain for 30 s (for a load balancer in front of direct
    # ingress): every app the suite deletes would wait that long. No balancer here: 1 s.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "1"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    yield port
    serve.shutdown()
    ray.shutdown()


FAST_RETRY = {"max_attempts": 3, "initial_backoff_s": 0.05, "max_backoff_s": 0.2, "attempt_timeout_s": 1.0,
              "total_timeout_s": 6.0, "max_retry_after_s": 5.0}
NO_CIRCUIT = {"enabled": False}
# One key sends the whole suite's traffic, in bursts (fuzzing, load tests): neither rate limits nor
# flood blocks here (tests/deployments/test_guard.py and test_cost_guard_gateway.py test them).
NO_RATE_LIMITS = {"plans": {"free": {}, "premium": {}, "enterprise": {}}, "flood": {"enabled": False}}
UNAVAILABLE_FR = "Le service est momentanément indisponible."
INJECTION_BLOCKING_TENANT = "strict-school"
ALERT_RULE, ALERT_BUDGET = "test-budget-rule", "alerts-test"
CONVERSATION_WINDOW, CONVERSATION_SUMMARY_TOKENS = 300, 32
BATCH_LEASE_S, BATCH_CONCURRENCY = 2.0, 4


def flaky_models(flaky_url: str) -> list[dict[str, Any]]:
    """Models on the fault-injecting upstream."""
    params = {"base_url": flaky_url, "model": "fake-flaky"}
    return [
        {"name": "flaky", "engine": "remote", "engine_params": params, "fallbacks": ["echo"], "retry": FAST_RETRY,
         "circuit_breaker": NO_CIRCUIT, "required": False},
        {"name": "flaky-solo", "engine": "remote", "engine_params": params, "required": False,
         "retry": {**FAST_RETRY, "max_attempts": 2, "attempt_timeout_s": 0.5, "total_timeout_s": 3.0},
         "circuit_breaker": NO_CIRCUIT},
        {"name": "circuit", "engine": "remote", "engine_params": params, "fallbacks": ["echo"], "required": False,
         "retry": {**FAST_RETRY, "max_attempts": 1},
         "circuit_breaker": {"failure_threshold": 2, "cooldown_s": 1.0}},
    ]


def vision_models(upstream_url: str, flaky_url: str) -> list[dict[str, Any]]:
    """Vision-capable models (test_multimodal_gateway): OpenAI and Anthropic on the fake, and one on the
    fault-injecting fake whose first fallback (echo) cannot read images."""
    key = {"api_key_env": "RAYGATE_TEST_UPSTREAM_KEY"}
    return [
        {"name": "vision-echo", "engine": "remote", "vision": True, "required": False,
         "engine_params": {"base_url": upstream_url, "model": "fake-vision", **key},
         "input_price_per_1m_usd": 3.0, "output_price_per_1m_usd": 6.0},
        {"name": "vision-claude", "engine": "remote", "vision": True, "required": False,
         "engine_params": {"provider": "anthropic", "base_url": upstream_url, "model": "claude-vision-fake", **key}},
        {"name": "vision-flaky", "engine": "remote", "vision": True, "required": False,
         "engine_params": {"base_url": flaky_url, "model": "fake-flaky"}, "fallbacks": ["echo", "vision-echo"],
         "retry": {**FAST_RETRY, "max_attempts": 1}, "circuit_breaker": NO_CIRCUIT},
    ]


JUDGED_TENANT = "judged"


def evaluation_models(upstream_url: str) -> list[dict[str, Any]]:
    """test_evaluation_gateway: the judge (the fake scores ``[score=N]`` marks in the question, see
    tests/fake_upstream.py) and a weak model whose poorly scored answers retry once on echo."""
    def echo(name: str, upstream_model: str) -> dict[str, Any]:
        return {"name": name, "engine": "remote", "required": False, "input_price_per_1m_usd": 1.0,
                "output_price_per_1m_usd": 2.0, "engine_params": {"base_url": upstream_url, "model": upstream_model}}
    return [echo("judge", "fake-judge"), echo("weak-answer", "fake-weak")]


def app_args(data_dir: Path, redis_url: str, upstream_url: str, flaky_url: str) -> dict[str, Any]:
    """The graph's args for the integration tests."""
    return {
        "models": [
            {"name": "tiny", "engine": "hf", "engine_params": {"model_path": "tiny"},
             "input_price_per_1m_usd": 1.0, "output_price_per_1m_usd": 2.0, "default_max_tokens": 16},
            {"name": "echo", "engine": "remote",
             "engine_params": {"base_url": upstream_url, "model": "fake-echo", "api_key_env": "RAYGATE_TEST_UPSTREAM_KEY"},
             "input_price_per_1m_usd": 3.0, "output_price_per_1m_usd": 6.0},
            {"name": "broken", "engine": "remote",
             "engine_params": {"base_url": f"http://127.0.0.1:{free_port()}/v1", "model": "x", "timeout_s": 2},
             "fallbacks": ["echo"], "required": False},
            {"name": "tiny-short", "engine": "hf", "engine_params": {"model_path": "tiny", "max_model_len_tokens": 48},
             "context_fallback": "echo", "required": False},
            {"name": "claude", "engine": "remote", "required": False,
             "engine_params": {"provider": "anthropic", "base_url": upstream_url, "model": "claude-fake",
                               "api_key_env": "RAYGATE_TEST_UPSTREAM_KEY"}},
            *flaky_models(flaky_url),
            # test_conversations_gateway: a small window, so stored history is trimmed or summarised (by echo).
            {"name": "echo-small", "engine": "remote", "context_window_tokens": CONVERSATION_WINDOW, "required": False,
             "engine_params": {"base_url": upstream_url, "model": "fake-echo", "api_key_env": "RAYGATE_TEST_UPSTREAM_KEY"}},
            *vision_models(upstream_url, flaky_url),
            *evaluation_models(upstream_url),
            # test_batches_gateway sets the flaky fake's latency: batch requests slow enough to cancel or cut off.
            {"name": "batch-slow", "engine": "remote", "required": False,
             "engine_params": {"base_url": flaky_url, "model": "fake-slow"}, "circuit_breaker": NO_CIRCUIT},
        ],
        # test_evaluation_gateway: off for everyone but JUDGED_TENANT; sync judging on weak-answer only.
        "evaluation": {"judge_model": "judge", "sample_rate": 0.0, "tenant_sample_rates": {JUDGED_TENANT: 1.0},
                       "sync_routes": ["weak-answer"], "stronger_model": {"weak-answer": "echo"},
                       "retry_below": 3},
        "stores": {"redis_url": redis_url, "data_dir": str(data_dir)},
        # The suite sends many requests with one key: no rate limits here (test_cost_guard_gateway tests them).
        "router": {"tiers": {"simple_explanation": "echo", "standard_exercise": "echo",
                             "complex_reasoning": "claude", "deep_analysis": "claude"},
                   "domains": {"poultry": "tiny"}},
        "guard": {**NO_RATE_LIMITS, "injection": {"tenant_actions": {INJECTION_BLOCKING_TENANT: "block"}}},
        "conversations": {"summary_model": "echo", "summary_max_tokens": CONVERSATION_SUMMARY_TOKENS},
        "gateway": {"max_body_bytes": 65536, "max_image_bytes": 16384, "ledger_flush_interval_s": 0.1,
                    "unavailable_messages": {"fr": UNAVAILABLE_FR}, "gc_threshold": GC_THRESHOLD},
        # test_observability creates the budget at run time and drives the rule both ways.
        # test_batches_gateway: a lost replica's batch is taken over within 2 s; batch work pauses while
        # interactive requests take over 1.5 s to a first byte.
        "batches": {"lease_s": BATCH_LEASE_S, "poll_interval_s": 0.5, "max_concurrency": BATCH_CONCURRENCY,
                    "pause_above_ms": 1500, "pause_window_s": 6, "pause_min_samples": 3},
        "alerts": {"rules": [{"name": ALERT_RULE, "metric": "budget_spent_fraction", "above": 0.1,
                              "budget_id": ALERT_BUDGET}]},
    }


@pytest.fixture(scope="session")
def deployed(ray_cluster: int, valkey_url: str, session_data_dir: Path,
             fake_upstream: tuple[FakeUpstream, str], flaky_upstream: tuple[FakeUpstream, str]) -> Deployed:
    """raygate's graph running on the cluster, plus a user key and an admin key."""
    from ray import serve

    from serve_app.graph import build_app

    upstream, upstream_url = fake_upstream
    flaky, flaky_url = flaky_upstream
    args = app_args(session_data_dir, valkey_url, upstream_url, flaky_url)
    serve.run(build_app(args), name="raygate", route_prefix="/")

    api_key = create_key(valkey_url, "acme", "alice", "premium")
    admin_key = create_key(valkey_url, "acme", "ops", "enterprise", admin=True)
    return Deployed(f"http://127.0.0.1:{ray_cluster}", api_key, admin_key, valkey_url, upstream, flaky)
