"""model: auto through the gateway: the routed model answers, headers and ledger say why, admin explains."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Deployed, ledger_row

pytestmark = pytest.mark.integration


def auto(deployed: Deployed, text: str, **extra: Any) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {deployed.api_key}"})


def admin(deployed: Deployed, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}/admin{path}", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"}, **kwargs)


@pytest.mark.parametrize(("text", "route"), [
    ("What is photosynthesis?", "simple_explanation/echo"),
    ("Analyse and compare the strategies of two companies and discuss the long-term consequences.",
     "deep_analysis/claude"),
    ("Qu'est-ce que la maladie de Newcastle chez les poules ?", "simple_explanation/tiny"),
])
def test_auto_routes_by_category_and_domain(deployed: Deployed, text: str, route: str) -> None:
    response = auto(deployed, text)
    assert response.status_code == 200, response.text
    assert response.headers["x-raygate-route"] == route
    assert response.headers["x-raygate-model"] == route.split("/")[1]
    row = ledger_row(deployed, response.headers["x-request-id"])
    assert (row["requested_model"], row["route"], row["model"]) == ("auto", route, route.split("/")[1])
    assert row["category"] == route.split("/")[0] and row["route_reason"]


def test_explicit_model_is_honoured_and_auto_is_listed(deployed: Deployed) -> None:
    body = {"model": "echo", "messages": [{"role": "user", "content": "Analyse and compare two essays in depth."}]}
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {deployed.api_key}"}, timeout=30)
    assert response.headers["x-raygate-model"] == "echo" and "x-raygate-route" not in response.headers
    models = httpx.get(f"{deployed.base_url}/v1/models", headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert "auto" in [m["id"] for m in models.json()["data"]]


def test_classify_explains_and_stats_count(deployed: Deployed) -> None:
    decision = admin(deployed, "POST", "/router/classify", json={"text": "Solve 3x + 5 = 20"}).json()
    assert decision["classification"]["category"] == "standard_exercise"
    assert decision["classification"]["classifier"] == "rules" and "cues" in decision["classification"]["reason"]
    assert decision["plan"]["model"] == "echo"
    auto(deployed, "Solve 3x + 5 = 20")
    deadline = time.monotonic() + 10
    while (stats := admin(deployed, "GET", "/router/stats").json())["by_category"].get("standard_exercise", 0) < 1:
        assert time.monotonic() < deadline
    assert stats["by_model"]["echo"] >= 1 and stats["total"] >= 1
