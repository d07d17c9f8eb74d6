"""The plan and budget admin routes alone: auth, bodies, errors in OpenAI's shape, over a real CostGuard.

The app holds only the router and the error handlers; a stand-in Gateway carries
a key check and an embedded CostGuard on the session's Valkey.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from deployments.cost_guard import CostGuard
from serve_app.auth import APIKey
from serve_app.cost_admin import router
from serve_app.cost_config import CostGuardConfig
from serve_app.errors import AuthenticationError
from serve_app.middleware import install_error_handlers
from serve_app.placement import Placed

ADMIN = {"authorization": "Bearer admin"}


class Keys:
    """Two keys: ``admin`` and ``user``."""

    async def authenticate(self, authorization: str | None) -> APIKey:
        if authorization not in ("Bearer admin", "Bearer user"):
            raise AuthenticationError("Invalid API key.")
        return APIKey(key_id="k", tenant="acme", user="ann", admin=authorization == "Bearer admin")


@pytest.fixture
async def client(valkey_url: str) -> AsyncIterator[httpx.AsyncClient]:
    guard = CostGuard(
        CostGuardConfig.model_validate({"budgets": [{"id": "file", "limit_usd": 10.0}]}), valkey_url,
        {"big": (10.0, 30.0), "mini": (0.5, 1.5)}, key_prefix=f"test-{uuid.uuid4().hex[:12]}:cg",
    )
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.state.gateway = SimpleNamespace(keys=Keys(), spend=SimpleNamespace(cost_guard=Placed("CostGuard", guard,
                                                                                             remote=False)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c
    await guard.close()


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


@pytest.mark.parametrize(("headers", "status"), [({}, 401), ({"authorization": "Bearer user"}, 403)])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/admin/budgets"), ("PUT", "/admin/budgets/x"), ("DELETE", "/admin/budgets/file"),
    ("GET", "/admin/plans"), ("PUT", "/admin/plans/free"),
])
async def test_routes_need_an_admin_key(
    client: httpx.AsyncClient, headers: dict[str, str], status: int, method: str, path: str
) -> None:
    error(await client.request(method, path, headers=headers, json={"limit_tokens": 1}), status)


async def test_budget_lifecycle(client: httpx.AsyncClient) -> None:
    put = await client.put("/admin/budgets/cap", headers=ADMIN, json={"scope": "model", "scope_value": "big",
                                                                       "limit_tokens": 100})
    assert put.status_code == 200 and put.json()["id"] == "cap"
    same_id = await client.put("/admin/budgets/cap", headers=ADMIN, json={"id": "cap", "limit_tokens": 200})
    assert same_id.json()["limit_tokens"] == 200
    listed = (await client.get("/admin/budgets", headers=ADMIN)).json()
    assert [(b["id"], b["limit_tokens"]) for b in listed] == [("file", None), ("cap", 200)]

    deleted = await client.delete("/admin/budgets/file", headers=ADMIN)
    assert deleted.status_code == 200 and deleted.json()["limit_usd"] == 10.0
    assert [b["id"] for b in (await client.get("/admin/budgets", headers=ADMIN)).json()] == ["cap"]
    assert error(await client.delete("/admin/budgets/file", headers=ADMIN), 404)["code"] == "not_found"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/budgets/cap", {"id": "other", "limit_tokens": 1}, "id"),
    ("/admin/budgets/cap", {"limit_tokens": -1}, "limit_tokens"),
    ("/admin/budgets/cap", {"limit_tokens": 1, "limit_tokenz": 2}, "limit_tokenz"),
    ("/admin/budgets/cap", {"scope": "model", "scope_value": "nope", "limit_tokens": 1}, "scope_value"),
    ("/admin/budgets/a%20b", {"limit_tokens": 1}, "budget_id"),
    ("/admin/budgets/cap", {"limit_tokens": 2**64}, "limit_tokens"),
    ("/admin/budgets/cap", {"limit_usd": 1e300}, "limit_usd"),
    ("/admin/plans/free", {"daily_tokens": 2**64}, "daily_tokens"),
    ("/admin/plans/free", {"max_tokens_cap": 2**31}, "max_tokens_cap"),
    ("/admin/plans/gold", {"daily_tokens": 1}, "plan"),
    ("/admin/plans/free", {"allowed_models": ["nope"]}, "allowed_models"),
])
async def test_bad_changes_are_400(client: httpx.AsyncClient, path: str, body: dict[str, Any], param: str) -> None:
    body_error = error(await client.put(path, headers=ADMIN, json=body), 400)
    assert body_error["type"] == "invalid_request_error"
    assert body_error["param"] == param


@pytest.mark.parametrize(("body", "param"), [
    ('{"limit_usd": Infinity}', "limit_usd"), ('{"limit_tokens": 1, "alert_thresholds": [NaN]}', "alert_thresholds.0"),
])
async def test_non_finite_budget_numbers_are_400(client: httpx.AsyncClient, body: str, param: str) -> None:
    # Python's json reads these literals; stored, they would come back null and the budget vanish on reload.
    response = await client.put("/admin/budgets/cap", headers={**ADMIN, "content-type": "application/json"},
                                content=body)
    assert error(response, 400)["param"] == param


async def test_plan_replacement(client: httpx.AsyncClient) -> None:
    put = await client.put("/admin/plans/free", headers=ADMIN, json={"daily_tokens": 10, "allowed_models": ["mini"]})
    assert put.status_code == 200
    plans = (await client.get("/admin/plans", headers=ADMIN)).json()
    assert plans["free"] == {"daily_tokens": 10, "allowed_models": ["mini"], "downgrade_model": None,
                             "max_tokens_cap": None}
    assert plans["premium"]["daily_tokens"] == 200_000
