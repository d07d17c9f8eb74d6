"""Brief-then-expand answers through the gateway (``brief`` / ``x-raygate-brief``, then ``expand``).

The fake upstream records the body of the last call it got, so the tests see the cap, the
instruction and the history that were sent upstream. The graph runs ``brief``'s defaults.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest

from serve_app.brief_config import DEFAULT_EXPAND_INSTRUCTION, DEFAULT_INSTRUCTION
from tests.integration.conftest import Deployed, create_key, ledger_row

pytestmark = pytest.mark.integration

QUESTION = "What does DNS do?"
ECHO_DEFAULT_MAX_TOKENS = 256  # ModelConfig.default_max_tokens: echo sets none


def new_key(deployed: Deployed, tenant: str, user: str = "ana") -> str:
    return create_key(deployed.redis_url, tenant, user, "premium")


def chat(deployed: Deployed, key: str, headers: dict[str, str] | None = None, **body: Any) -> httpx.Response:
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json={"model": "echo", **body},
                      headers={"Authorization": f"Bearer {key}", **(headers or {})}, timeout=30)


def stored(deployed: Deployed, key: str, conversation_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{deployed.base_url}/v1/conversations/{conversation_id}",
                         headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


def brief(deployed: Deployed, key: str) -> tuple[str, str]:
    """A brief answer to QUESTION: (its conversation id, its text)."""
    response = chat(deployed, key, brief=True, messages=[{"role": "user", "content": QUESTION}])
    assert response.status_code == 200, response.text
    return response.headers["x-raygate-conversation-id"], response.json()["choices"][0]["message"]["content"]


def test_a_brief_answer_is_capped_instructed_and_kept_with_a_handle(deployed: Deployed) -> None:
    key = new_key(deployed, f"brief-{uuid.uuid4().hex[:8]}")
    response = chat(deployed, key, brief=True, messages=[{"role": "system", "content": "You teach networks."},
                                                         {"role": "user", "content": QUESTION}])
    assert response.status_code == 200, response.text
    sent = deployed.upstream.last_body
    assert sent is not None and sent["max_tokens"] == 96
    assert [m["content"] for m in sent["messages"]] == ["You teach networks.", DEFAULT_INSTRUCTION, QUESTION]
    assert "brief" not in sent and "conversation_id" not in sent

    conversation_id = response.headers["x-raygate-conversation-id"]
    handle = response.json()["raygate"]
    assert handle["brief"] is True and handle["expand"]["conversation_id"] == conversation_id
    assert conversation_id in handle["expand"]["hint"] and '"expand": true' in handle["expand"]["hint"]
    answer = response.json()["choices"][0]["message"]["content"]
    # The request's system messages (the instruction included) are not kept: the question and the answer are.
    assert stored(deployed, key, conversation_id) == [{"role": "user", "content": QUESTION},
                                                      {"role": "assistant", "content": answer}]
    assert ledger_row(deployed, response.headers["x-request-id"])["mode"] == "brief"

    # The header asks too; a smaller max_tokens is kept, and a given conversation is continued, not replaced.
    again = chat(deployed, key, {"x-raygate-brief": "1"}, max_tokens=5, conversation_id=conversation_id,
                 messages=[{"role": "user", "content": "And DHCP?"}])
    assert again.status_code == 200, again.text
    assert deployed.upstream.last_body["max_tokens"] == 5
    assert again.headers["x-raygate-conversation-id"] == conversation_id
    assert [m["content"] for m in deployed.upstream.last_body["messages"]] == [
        DEFAULT_INSTRUCTION, QUESTION, answer, "And DHCP?"]
    assert len(stored(deployed, key, conversation_id)) == 4


def test_a_streamed_brief_answer_ends_with_the_handle(deployed: Deployed) -> None:
    key = new_key(deployed, f"brief-{uuid.uuid4().hex[:8]}")
    with httpx.stream("POST", f"{deployed.base_url}/v1/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {key}", "x-raygate-brief": "true"},
                      json={"model": "echo", "stream": True, "messages": [{"role": "user", "content": QUESTION}]}) as r:
        assert r.status_code == 200
        conversation_id = r.headers["x-raygate-conversation-id"]
        frames = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [orjson.loads(f) for f in frames[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["raygate"]["expand"]["conversation_id"] == conversation_id
    assert all("raygate" not in c for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert deployed.upstream.last_body["max_tokens"] == 96
    assert stored(deployed, key, conversation_id)[-1] == {"role": "assistant", "content": text}


def test_expand_continues_the_conversation_without_the_cap(deployed: Deployed) -> None:
    key = new_key(deployed, f"brief-{uuid.uuid4().hex[:8]}")
    conversation_id, answer = brief(deployed, key)
    response = chat(deployed, key, expand=True, conversation_id=conversation_id)  # no messages at all
    assert response.status_code == 200, response.text
    sent = deployed.upstream.last_body
    assert [(m["role"], m["content"]) for m in sent["messages"]] == [
        ("user", QUESTION), ("assistant", answer), ("user", DEFAULT_EXPAND_INSTRUCTION)]
    assert sent["max_tokens"] == ECHO_DEFAULT_MAX_TOKENS and "expand" not in sent
    assert response.headers["x-raygate-conversation-id"] == conversation_id
    assert response.json()["raygate"] == {"brief": False, "conversation_id": conversation_id}
    expanded = response.json()["choices"][0]["message"]["content"]
    assert stored(deployed, key, conversation_id)[2:] == [{"role": "user", "content": DEFAULT_EXPAND_INSTRUCTION},
                                                          {"role": "assistant", "content": expanded}]
    assert ledger_row(deployed, response.headers["x-request-id"])["mode"] == "expand"

    # An empty messages list is fine too; the client's max_tokens stands.
    again = chat(deployed, key, expand=True, conversation_id=conversation_id, messages=[], max_tokens=300)
    assert again.status_code == 200, again.text
    assert deployed.upstream.last_body["max_tokens"] == 300


def test_expand_needs_the_owner_and_a_conversation_id(deployed: Deployed) -> None:
    tenant = f"brief-{uuid.uuid4().hex[:8]}"
    owner, other = new_key(deployed, tenant, "ana"), new_key(deployed, tenant, "bob")
    conversation_id, _ = brief(deployed, owner)
    stolen = chat(deployed, other, expand=True, conversation_id=conversation_id)
    assert stolen.status_code == 404, stolen.text

    missing = chat(deployed, owner, expand=True)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "conversation_id"
    both = chat(deployed, owner, expand=True, brief=True, conversation_id=conversation_id)
    assert both.status_code == 400 and both.json()["error"]["param"] == "expand"
    empty = chat(deployed, owner, messages=[])  # without expand, messages stay required
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    unknown = chat(deployed, owner, expand=True, conversation_id="conv_nope")
    assert unknown.status_code == 404
