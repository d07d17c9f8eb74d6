"""GatewayAPI: the chat route is matched first, whatever order the routes were mounted in."""

from __future__ import annotations

from fastapi.testclient import TestClient

from serve_app.http_parts import GatewayAPI


def test_the_chat_route_moves_first_when_the_app_starts_serving() -> None:
    app = GatewayAPI()
    for i in range(5):
        app.add_api_route(f"/admin/thing{i}", lambda: {"ok": True}, methods=["GET"])
    app.add_api_route("/v1/chat/completions", lambda: {"chat": True}, methods=["POST"])  # mounted last,
    with TestClient(app) as client:  # as @serve.ingress re-mounts the class's routes
        assert client.post("/v1/chat/completions").json() == {"chat": True}
        assert client.get("/admin/thing3").json() == {"ok": True}
    assert getattr(app.router.routes[0], "path", None) == "/v1/chat/completions"
