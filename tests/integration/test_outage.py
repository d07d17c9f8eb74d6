"""Redis (Valkey) stopped under a running gateway, then restarted: clean 503s, then recovery without restart."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve_app.stores import start_valkey
from tests.integration.conftest import Deployed, create_key, free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "is the coop warm enough"}]


@pytest.fixture(scope="module")
def outage(deployed: Deployed, session_data_dir: Path) -> Iterator[dict[str, Any]]:
    """An app on its own Valkey (persisted, so keys survive a restart)."""
    from ray import serve

    from serve_app.graph import build_app

    data_dir, port = session_data_dir / "outage", free_port()
    valkey = start_valkey(data_dir, port=port)
    redis_url = str(valkey.connection_url)
    upstream_url = deployed.upstream.base_url
    args = {"models": [{"name": "echo", "engine": "remote", "engine_params": {"base_url": upstream_url, "model": "e"}}],
            "stores": {"redis_url": redis_url, "data_dir": str(data_dir)}}
    serve.run(build_app(args), name="outage", route_prefix="/outage")
    state = {"base_url": f"{deployed.base_url}/outage", "key": create_key(redis_url, "t", "u", "premium"),
             "valkey": valkey, "data_dir": data_dir, "port": port}
    yield state
    state["valkey"].stop()
    serve.delete("outage")


def chat(state: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{state['base_url']}/v1/chat/completions", json={"model": "echo", "messages": MESSAGES},
                      headers={"Authorization": f"Bearer {state['key']}"}, timeout=30)


def test_redis_down_gives_clean_503s_and_recovers(outage: dict[str, Any]) -> None:
    assert chat(outage).status_code == 200
    assert httpx.get(f"{outage['base_url']}/health", timeout=30).status_code == 200

    outage["valkey"].stop()
    health = httpx.get(f"{outage['base_url']}/health", timeout=30)
    assert health.status_code == 503 and health.json()["components"]["redis"] == "down"
    down = chat(outage)
    assert down.status_code == 503
    assert set(down.json()["error"]) == {"message", "type", "param", "code"}
    assert "sk-" not in down.text and outage["key"] not in down.text

    outage["valkey"] = start_valkey(outage["data_dir"], port=outage["port"])
    deadline = time.monotonic() + 20
    status = 0
    while status != 200 and time.monotonic() < deadline:  # the same replicas reconnect by themselves
        status = chat(outage).status_code
    assert status == 200
    assert httpx.get(f"{outage['base_url']}/health", timeout=30).status_code == 200
