"""An A/B experiment through the gateway: variants applied per user, recorded, and reported with statistics."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Deployed, create_key

pytestmark = pytest.mark.integration


def admin(deployed: Deployed, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/admin/experiments{path}", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}, **kwargs)


def test_variants_are_applied_recorded_and_reported(deployed: Deployed) -> None:
    tenant = f"ab-{uuid.uuid4().hex[:6]}"
    spec = {"name": "claude vs echo", "match_model": "tiny-short", "traffic": 1.0, "min_samples": 5,
            "variants": [{"name": "control", "model": "echo", "parameters": {"temperature": 0.2}},
                         {"name": "anthropic", "model": "claude"}]}
    created = admin(deployed, "POST", "", json=spec)
    assert created.status_code == 200 and created.json()["status"] == "draft"
    ident = created.json()["id"]
    assert admin(deployed, "POST", f"/{ident}/pause").status_code == 400  # a draft cannot pause
    assert admin(deployed, "POST", f"/{ident}/start").json()["status"] == "running"
    seen: dict[str, str] = {}
    for i in range(12):
        key = create_key(deployed.redis_url, tenant, f"user-{i}", "premium")
        body = {"model": "tiny-short", "messages": [{"role": "user", "content": "hello"}]}
        response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 200
        seen[f"user-{i}"] = response.headers["x-raygate-model"]
    assert set(seen.values()) == {"echo", "claude"}  # both arms served (12 users, 50/50)
    deadline = time.monotonic() + 15
    while True:
        result = admin(deployed, "GET", f"/{ident}/results").json()
        if sum(v["requests"] for v in result["variants"]) == 12:
            break
        assert time.monotonic() < deadline, result
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["control"]["requests"] == sum(m == "echo" for m in seen.values())
    assert "p_value" in by_name["anthropic"]["vs_control"] and result["control"] == "control"
    done = admin(deployed, "POST", f"/{ident}/complete", json={"winner": "anthropic"}).json()
    assert (done["status"], done["winner"]) == ("completed", "anthropic")
