"""GatewayAPI: the chat route is matched first, and its lean handler answers as FastAPI's would."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from serve_app.http_parts import GatewayAPI, json_body
from serve_app.middleware import install_error_handlers
from serve_app.protocol import ChatCompletionRequest


def test_the_chat_route_moves_first_when_the_app_starts_serving() -> None:
    app = GatewayAPI()
    for i in range(5):
        app.add_api_route(f"/admin/thing{i}", lambda: {"ok": True}, methods=["GET"])
    app.add_api_route("/v1/chat/completions", lambda: {"chat": True}, methods=["POST"])  # mounted last,
    with TestClient(app) as client:  # as @serve.ingress re-mounts the class's routes
        assert client.post("/v1/chat/completions").json() == {"chat": True}
        assert client.get("/admin/thing3").json() == {"ok": True}
    assert getattr(app.router.routes[0], "path", None) == "/v1/chat/completions"


def _twin_apps() -> TestClient:
    """One app, the same model as a FastAPI body at ``/fastapi`` and through ``json_body`` at ``/lean``."""
    app = GatewayAPI()
    install_error_handlers(app)

    async def declared(body: ChatCompletionRequest) -> dict[str, Any]:
        return body.model_dump(mode="json", exclude_unset=True)

    async def lean(request: Request) -> Response:
        body = await json_body(request, ChatCompletionRequest)
        return JSONResponse(body.model_dump(mode="json", exclude_unset=True))

    app.add_api_route("/fastapi", declared, methods=["POST"])
    app.add_api_route("/lean", declared, methods=["POST"])
    app.serve_lean("/lean", "POST", lean)
    return TestClient(app)


GOOD = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "x": 1}


@pytest.mark.parametrize(("content", "content_type"), [
    (json.dumps(GOOD), "application/json"),
    (json.dumps(GOOD), "application/json; charset=utf-8"),
    (json.dumps(GOOD), "application/vnd.api+json"),
    (json.dumps(GOOD), "text/plain"),  # not declared JSON: refused, as FastAPI refuses it
    (json.dumps(GOOD), None),
    ("", "application/json"),
    ('{"model": "m", "messages": [', "application/json"),
    (json.dumps(GOOD)[:-1] + ', "temperature": NaN}', "application/json"),  # not JSON, but json.loads takes it
    (b'{"model": "\xff"}', "application/json"),  # not UTF-8
    ("[1, 2]", "application/json"),
    (json.dumps({"model": "m"}), "application/json"),
    (json.dumps({"model": "m", "messages": [{"role": "robot", "content": "x"}]}), "application/json"),
    (json.dumps({**GOOD, "temperature": "hot"}), "application/json"),
    (json.dumps({"model": "m", "messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": "https://x.example/a.png"}}]}]}), "application/json"),
])
def test_json_body_answers_as_a_fastapi_body_parameter(content: str | bytes, content_type: str | None) -> None:
    """Same status and same body, success or error, for the lean route as for FastAPI's own handling."""
    headers = {"content-type": content_type} if content_type else {}
    with _twin_apps() as client:
        declared = client.post("/fastapi", content=content, headers=headers)
        lean = client.post("/lean", content=content, headers=headers)
    assert (lean.status_code, lean.json()) == (declared.status_code, declared.json())
