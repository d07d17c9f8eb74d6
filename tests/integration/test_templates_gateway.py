"""Prompt templates through the gateway: the rendered template is the system prompt; admin versions and rollback."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Deployed, ledger_row

pytestmark = pytest.mark.integration


def admin(deployed: Deployed, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/admin/templates{path}", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}, **kwargs)


def chat(deployed: Deployed, template: str, variables: dict[str, Any]) -> httpx.Response:
    body = {"model": "echo", "template": template, "variables": variables,
            "messages": [{"role": "system", "content": "replaced"}, {"role": "user", "content": "What is 7 x 8?"}]}
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {deployed.api_key}"})


def test_seeded_template_becomes_the_system_prompt(deployed: Deployed) -> None:
    response = chat(deployed, "tutor", {"subject": "maths", "level": "CM2", "language": "French"})
    assert response.status_code == 200
    sent = deployed.upstream.last_body["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"].startswith("You are a patient maths tutor for a CM2")
    assert "answer in French" in sent[0]["content"] and [m["role"] for m in sent] == ["system", "user"]
    assert "template" not in deployed.upstream.last_body
    row = ledger_row(deployed, response.headers["x-request-id"])
    assert row["template"] == "tutor@v1"


def test_missing_variable_and_unknown_template_are_4xx(deployed: Deployed) -> None:
    missing = chat(deployed, "tutor", {"subject": "maths"})
    assert missing.status_code == 400
    assert missing.json()["error"]["param"] == "variables.level"
    assert missing.json()["error"]["code"] == "template_variable_missing"
    assert chat(deployed, "no-such-template", {}).status_code == 404


def test_new_version_preview_activate_and_rollback(deployed: Deployed) -> None:
    name = f"coach-{uuid.uuid4().hex[:6]}"
    assert admin(deployed, "POST", f"/{name}/versions", json={"body": "Coach {{ who }} gently."}).json()["active"]
    v2 = admin(deployed, "POST", f"/{name}/versions", json={"body": "Coach {{ who }} firmly.", "activate": True})
    assert v2.json()["version"] == 2 and v2.json()["active"]
    assert "-Coach {{ who }} gently." in admin(deployed, "GET", f"/{name}/diff", params={"a": 1, "b": 2}).json()["diff"]
    preview = admin(deployed, "POST", f"/{name}/preview", json={"variables": {"who": "Ana"}}).json()
    assert preview["rendered"] == "Coach Ana firmly."
    chat(deployed, name, {"who": "Ana"})
    assert deployed.upstream.last_body["messages"][0]["content"] == "Coach Ana firmly."
    assert admin(deployed, "POST", f"/{name}/rollback").json()["version"] == 1
    chat(deployed, name, {"who": "Ana"})
    assert deployed.upstream.last_body["messages"][0]["content"] == "Coach Ana gently."
    bad = admin(deployed, "POST", f"/{name}/versions", json={"body": "{% if %}"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "template_syntax", bad.json()
