"""GDPR through the gateway: consent, export, and an erasure that leaves no content in the ledger or Redis."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
import redis

from tests.integration.conftest import Deployed, create_key

pytestmark = pytest.mark.integration


def admin(deployed: Deployed, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/admin{path}", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}, **kwargs)


def ask(deployed: Deployed, key: str, text: str, **params: Any) -> httpx.Response:
    body = {"model": "echo", "messages": [{"role": "user", "content": text}], **params}
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"})


def redis_values_containing(url: str, needle: str) -> list[str]:
    client = redis.Redis.from_url(url, decode_responses=True)
    found = []
    for name in client.scan_iter(count=1000):
        kind = client.type(name)
        values: list[str] = []
        if kind == "string":
            values = [client.get(name) or ""]
        elif kind == "hash":
            values = [f"{k}={v}" for k, v in client.hgetall(name).items()]
        elif kind == "zset":
            values = client.zrange(name, 0, -1)
        if any(needle in v for v in values) or needle in name:
            found.append(name)
    return found


def test_consent_export_and_erasure(deployed: Deployed) -> None:
    tenant, user, secret = f"gdpr-{uuid.uuid4().hex[:6]}", "zoe", f"secret-{uuid.uuid4().hex[:10]}"
    key = create_key(deployed.redis_url, tenant, user, "premium")
    ask(deployed, key, f"Before consent: {secret}")
    consent = admin(deployed, "PUT", f"/users/{user}/consent", json={"tenant": tenant, "consent": True})
    assert consent.status_code == 200
    document = {"id": "notes", "text": f"My notes: {secret} is the name of my farm."}
    assert httpx.post(f"{deployed.base_url}/v1/collections/private/documents", json=document, timeout=60,
                      headers={"Authorization": f"Bearer {key}"}).status_code == 200
    answered = ask(deployed, key, f"What does {secret} mean?", temperature=0)
    assert answered.status_code == 200
    deadline = time.monotonic() + 15
    while not redis_values_containing(deployed.redis_url, secret):  # the cache stores off the client's path
        assert time.monotonic() < deadline, "the answer was never cached"

    export = admin(deployed, "GET", f"/users/{user}/export", params={"tenant": tenant}).json()
    assert export["usage"]["requests"] == 2 and len(export["requests"]) == 2
    assert [m["messages"][0]["content"] for m in export["messages"]] == [f"What does {secret} mean?"]
    assert export["messages"][0]["answer"] == answered.json()["choices"][0]["message"]["content"]

    erased = admin(deployed, "DELETE", f"/users/{user}", params={"tenant": tenant})
    assert erased.status_code == 200
    assert erased.json()["ledger"]["messages"] == 1 and erased.json()["cache_entries"] == 1
    assert erased.json()["rag_chunks"] == 1
    search = httpx.post(f"{deployed.base_url}/v1/collections/private/search", json={"query": secret, "min_score": -1},
                        headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert search.status_code == 200 and search.json()["data"] == []
    assert redis_values_containing(deployed.redis_url, secret) == []
    after = admin(deployed, "GET", f"/users/{user}/export", params={"tenant": tenant}).json()
    assert after["messages"] == after["requests"] == []
    assert ask(deployed, key, f"What does {secret} mean?", temperature=0).headers["x-raygate-cache"] == "miss"
    audit = admin(deployed, "GET", "/audit", params={"limit": 20}).json()
    actions = [(e["action"], e["user"], e["tenant"]) for e in audit]
    for action in ("consent", "export", "erase"):
        assert (action, user, tenant) in actions


def test_privacy_routes_need_the_admin_key(deployed: Deployed) -> None:
    response = httpx.get(f"{deployed.base_url}/admin/users/zoe/export",
                         headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert response.status_code == 403
