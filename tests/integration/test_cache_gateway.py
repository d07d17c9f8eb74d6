"""The response cache through the gateway: headers, zero-billed hits, streamed replay, bypass, admin API."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Deployed, create_key

pytestmark = pytest.mark.integration


def ask(deployed: Deployed, question: str, *, key: str | None = None, headers: dict[str, str] | None = None,
        **params: Any) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": question}], "temperature": 0, **params}
    auth = {"Authorization": f"Bearer {key or deployed.api_key}", **(headers or {})}
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, headers=auth, timeout=30)


def admin(deployed: Deployed, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/admin{path}", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}, **kwargs)


def until_cached(deployed: Deployed, question: str, status: str = "hit", **kwargs: Any) -> httpx.Response:
    """Ask until the answer comes from the cache (stores happen after the answer, off the client's path)."""
    deadline = time.monotonic() + 20
    while (response := ask(deployed, question, **kwargs)).headers["x-raygate-cache"] != status:
        assert time.monotonic() < deadline, f"never a {status}: {response.headers.get('x-raygate-cache')}"
    return response


def question() -> str:
    return f"What is the melting point of metal {uuid.uuid4().hex[:8]}?"


def test_a_repeated_question_is_a_hit_billed_nothing(deployed: Deployed) -> None:
    q = question()
    first = ask(deployed, q)
    assert first.status_code == 200 and first.headers["x-raygate-cache"] == "miss"
    calls = deployed.upstream.request_count
    hit = until_cached(deployed, q)
    assert deployed.upstream.request_count == calls  # nothing went upstream
    body = hit.json()
    assert body["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    assert body["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert body["raygate"]["cache"] == "hit"
    assert body["raygate"]["original_usage"] == first.json()["usage"]
    rows = admin(deployed, "GET", "/requests", params={"limit": 50}).json()
    row = next(r for r in rows if r["id"] == hit.headers["x-request-id"])
    assert row["cache_status"] == "hit" and row["saved_usd"] > 0 and row["cost_usd"] == 0


def test_a_hit_is_replayed_as_a_stream(deployed: Deployed) -> None:
    q = question()
    content = ask(deployed, q).json()["choices"][0]["message"]["content"]
    until_cached(deployed, q)
    auth = {"Authorization": f"Bearer {deployed.api_key}"}
    body = {"model": "echo", "messages": [{"role": "user", "content": q}], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{deployed.base_url}/v1/chat/completions", json=body, headers=auth) as response:
        assert response.headers["x-raygate-cache"] == "hit"
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert len(chunks) > 2
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == content
    assert chunks[-1]["usage"]["total_tokens"] == 0


def test_a_light_rewording_is_a_semantic_hit(deployed: Deployed) -> None:
    q = question()
    content = ask(deployed, q).json()["choices"][0]["message"]["content"]
    until_cached(deployed, q)
    reworded = until_cached(deployed, "Hi, could you please tell me " + q.lower(), "semantic-hit")
    assert reworded.json()["choices"][0]["message"]["content"] == content
    assert reworded.json()["raygate"]["similarity"] >= 0.85


def test_cache_control_and_temperature_bypass(deployed: Deployed) -> None:
    q = question()
    assert ask(deployed, q, headers={"Cache-Control": "no-store"}).headers["x-raygate-cache"] == "miss"
    assert ask(deployed, q, temperature=0.7).headers["x-raygate-cache"] == "bypass"
    ask(deployed, q)
    until_cached(deployed, q)
    calls = deployed.upstream.request_count
    bypass = ask(deployed, q, headers={"Cache-Control": "no-cache"})
    assert bypass.headers["x-raygate-cache"] == "bypass" and deployed.upstream.request_count == calls + 1


def test_no_cross_tenant_hit_and_invalidation_by_tenant(deployed: Deployed) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    other_key = create_key(deployed.redis_url, tenant, "bob", "premium")
    q = question()
    ask(deployed, q, key=other_key)
    until_cached(deployed, q, key=other_key)
    assert ask(deployed, q).headers["x-raygate-cache"] == "miss"  # acme never sees the other tenant's entry
    removed = admin(deployed, "POST", "/cache/invalidate", json={"tenant": tenant})
    assert removed.status_code == 200 and removed.json()["removed"] == 1
    assert ask(deployed, q, key=other_key).headers["x-raygate-cache"] == "miss"
    stats = admin(deployed, "GET", "/cache/stats").json()
    assert stats["hit"] >= 1 and stats["miss"] >= 2 and stats["entries"] >= 1


def test_bad_selector_is_a_400(deployed: Deployed) -> None:
    response = admin(deployed, "POST", "/cache/invalidate", json={"older_than_s": -1})
    assert response.status_code == 400 and response.json()["error"]["param"]
