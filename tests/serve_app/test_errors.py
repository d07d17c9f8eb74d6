"""The HTTP edge alone: errors in OpenAI's shape, request ids, body limits."""

from __future__ import annotations

import pickle

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from serve_app.errors import QuotaExceededError, RaygateError, UpstreamTimeoutError, error_for_status
from serve_app.middleware import RequestContextMiddleware, install_cors, install_error_handlers


class Body(BaseModel):
    name: str
    count: int


def make_app() -> TestClient:
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware, max_body_bytes=lambda path: 100)
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: Body) -> Body:
        return body

    @app.get("/quota")
    async def quota() -> None:
        raise QuotaExceededError("Daily quota used up.", headers={"retry-after": "60"})

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals sk-123")

    return TestClient(app, raise_server_exceptions=False)


def assert_openai_shape(body: dict) -> dict:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_validation_error_is_400_naming_param() -> None:
    response = make_app().post("/echo", json={"name": "x", "count": "many"})
    assert response.status_code == 400
    error = assert_openai_shape(response.json())
    assert error["param"] == "count" and error["type"] == "invalid_request_error"
    assert "many" not in error["message"]


def test_raygate_error_keeps_status_code_and_headers() -> None:
    response = make_app().get("/quota")
    assert response.status_code == 429 and response.headers["retry-after"] == "60"
    assert assert_openai_shape(response.json())["code"] == "insufficient_quota"


def test_unexpected_error_is_500_without_internals() -> None:
    response = make_app().get("/boom")
    assert response.status_code == 500
    assert "sk-123" not in response.text
    assert_openai_shape(response.json())


@pytest.mark.parametrize("chunked", [False, True])
def test_large_bodies_are_413(chunked: bool) -> None:
    client = make_app()
    data = b'{"name": "' + b"x" * 200 + b'", "count": 1}'
    content = iter([data[:50], data[50:]]) if chunked else data
    response = client.post("/echo", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert assert_openai_shape(response.json())["code"] == "request_too_large"


def test_request_id_is_added_unless_a_proxy_set_one() -> None:
    client = make_app()
    assert client.post("/echo", json={"name": "a", "count": 1}).headers["x-request-id"].startswith("req-")
    # Serve's proxy sets x-request-id on the way in and echoes it itself: no second copy.
    kept = client.post("/echo", json={"name": "a", "count": 1}, headers={"x-request-id": "abc"})
    assert "x-request-id" not in kept.headers


def test_unknown_route_and_method_keep_the_shape() -> None:
    client = make_app()
    assert client.get("/nope").status_code == 404
    assert_openai_shape(client.get("/nope").json())
    assert client.get("/echo").status_code == 405
    assert_openai_shape(client.get("/echo").json())


def test_errors_survive_pickling_with_their_fields() -> None:
    error = UpstreamTimeoutError("slow", param="model", headers={"retry-after": "2"})
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is UpstreamTimeoutError
    assert (copy.message, copy.param, copy.code, copy.headers) == ("slow", "model", "upstream_timeout", {"retry-after": "2"})


@pytest.mark.parametrize("status,code", [(401, "invalid_api_key"), (404, "not_found"), (503, "service_unavailable")])
def test_error_for_status(status: int, code: str) -> None:
    error = error_for_status(status, "m")
    assert isinstance(error, RaygateError) and error.status_code == status and error.code == code


def test_security_headers_on_every_answer() -> None:
    client = make_app()
    for response in (client.post("/echo", json={"name": "a", "count": 1}), client.get("/nope")):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"


def test_cors_is_closed_unless_origins_are_configured() -> None:
    preflight = {"origin": "https://app.example", "access-control-request-method": "POST"}
    closed = make_app().options("/echo", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    app = FastAPI()
    install_cors(app, ["https://app.example"])

    @app.post("/echo")
    async def echo() -> dict[str, str]:
        return {}

    opened = TestClient(app).options("/echo", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "https://app.example"
    other = TestClient(app).options("/echo", headers={**preflight, "origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_method_not_allowed_is_a_client_error_keeping_allow() -> None:
    response = make_app().get("/echo")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    error = assert_openai_shape(response.json())
    assert (error["type"], error["code"]) == ("invalid_request_error", "method_not_allowed")


def test_unknown_client_status_is_an_invalid_request() -> None:
    error = error_for_status(418, "m")
    assert (error.status_code, error.type) == (418, "invalid_request_error")
    assert error_for_status(507, "m").type == "internal_error"
