"""No secret reaches the Serve logs: prompts, client keys (valid or not), the upstream key, upstream errors.

The requests carry a canary that exists nowhere else, then every file under this
session's ``logs/serve`` (replicas, proxy, controller) is searched for it and for
the keys. Absence proves nothing unless the requests' own log records were
written, so the test first waits until each request id (sent as ``x-request-id``,
which Serve logs with every record of a request) is in the Gateway replica's log,
and those of the upstream errors in the ``echo`` model replica's log.
``conftest.ray_cluster`` makes each record reach its file when it is logged.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import UPSTREAM_KEY, Deployed

pytestmark = pytest.mark.integration

LOG_FLUSH_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0
EMBEDDING_MODEL = "all-minilm-l6-v2"


def serve_logs_dir() -> Path:
    """This session's Serve log directory (not ``session_latest``: another cluster may be newer)."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"


def read_logs(pattern: str = "*.log*") -> dict[Path, str]:
    """Every matching Serve log file (rotated ones included) and its text."""
    return {path: path.read_text(errors="replace") for path in sorted(serve_logs_dir().glob(pattern))}


def wait_until_logged(request_ids: list[str], deployment: str) -> None:
    """Wait until every request id is in a deployment's replica logs, so what those requests logged is on disk."""
    deadline = time.monotonic() + LOG_FLUSH_TIMEOUT_S
    missing = request_ids
    while missing and time.monotonic() < deadline:
        text = "\n".join(read_logs(f"replica_*_{deployment}_*.log*").values())
        missing = [r for r in request_ids if r not in text]
        if missing:
            time.sleep(0.5)
    assert not missing, f"request ids never logged by {deployment}: {missing}"


def test_no_secret_in_serve_logs(deployed: Deployed) -> None:
    canary = f"canary{uuid.uuid4().hex}"  # letters and digits: no log encoding can hide it
    prompt_secret = f"prompt{canary}"
    bad_key = f"rg-000000000000-badkey{canary}"
    upstream_secret = f"upstream{canary}"
    request_ids: list[str] = []
    statuses: list[int] = []

    def send(method: str, path: str, *, key: str | None = None, auth: str | None = None, **kwargs: object) -> None:
        request_id = f"redaction-{uuid.uuid4().hex}"
        headers = {"x-request-id": request_id, "authorization": auth or f"Bearer {key or deployed.api_key}"}
        response = httpx.request(method, f"{deployed.base_url}{path}", headers=headers, timeout=REQUEST_TIMEOUT_S,
                                 **kwargs)  # type: ignore[arg-type]
        request_ids.append(request_id)
        statuses.append(response.status_code)

    messages = [{"role": "system", "content": f"keep {prompt_secret} safe"},
                {"role": "user", "content": f"repeat {prompt_secret}"}]

    def chat(model: str, **extra: object) -> Callable[[], None]:
        return lambda: send("POST", "/v1/chat/completions",
                            json={"model": model, "messages": messages, "max_tokens": 4, **extra})

    # Prompts through each engine (remote OpenAI, remote Anthropic, hf), streaming and not, and embeddings.
    for request in (chat("echo"), chat("echo", stream=True), chat("claude"), chat("tiny"),
                    chat("echo", user=prompt_secret)):
        request()
    send("POST", "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": [prompt_secret]})
    # Keys that are wrong, malformed, or right but not allowed here.
    send("POST", "/v1/chat/completions", key=bad_key, json={"model": "echo", "messages": messages})
    send("GET", "/v1/models", auth=f"Basic {bad_key}")
    send("GET", "/admin/keys")
    # Upstream errors whose text quotes the upstream key, a secret and the prompt: a 400 (passed on to the
    # client), a 401 (raygate's credentials refused) and a 500 (retried).
    upstream_message = f"bad key {UPSTREAM_KEY} for {upstream_secret} on '{prompt_secret}'"
    for status in (400, 401, 500):
        deployed.upstream.fail(status, message=upstream_message)
        chat("echo")()
    send("GET", "/admin/requests", key=deployed.admin_key, params={"tenant": "acme", "limit": 5})

    assert statuses[:6] == [200] * 6, statuses
    assert statuses[6:9] == [401, 401, 403], statuses
    # 400 passes the upstream's message on; a refused upstream key is the operator's problem (5xx).
    assert statuses[9] == 400 and statuses[10] in (502, 503) and statuses[11:] == [200, 200], statuses
    wait_until_logged(request_ids, "Gateway")  # remote models run in the Gateway: the upstream errors land here

    logs = read_logs()
    assert any(path.name.startswith("replica_") for path in logs), f"no replica logs in {serve_logs_dir()}"
    secrets = {
        "prompt": prompt_secret, "canary": canary, "bad key": bad_key, "upstream key": UPSTREAM_KEY,
        "upstream error": upstream_secret, "user key": deployed.api_key, "admin key": deployed.admin_key,
        # The secret half alone: "rg-<public id>-<secret>".
        "user key secret": deployed.api_key.split("-", 2)[2], "admin key secret": deployed.admin_key.split("-", 2)[2],
    }
    leaks = [f"{what} in {path.name}" for path, text in logs.items() for what, secret in secrets.items()
             if secret in text]
    assert leaks == []
