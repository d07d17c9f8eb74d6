"""Stored conversations and users' memory through the gateway (the openai SDK where it fits).

``echo-small`` is the fake upstream with a 300-token window (conftest); ``echo`` summarises.
The fake records the body of the last call it got, so the tests see what was sent upstream.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from openai import OpenAI

from serve_app.conversing import SUMMARY_PREFIX
from tests.integration.conftest import CONVERSATION_WINDOW, Deployed, create_key, ledger_row

pytestmark = pytest.mark.integration


def new_key(deployed: Deployed, tenant: str | None = None, user: str = "ana") -> str:
    return create_key(deployed.redis_url, tenant or f"conv-{uuid.uuid4().hex[:8]}", user, "premium")


def api(deployed: Deployed, key: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{deployed.base_url}{path}", headers={"Authorization": f"Bearer {key}"},
                         timeout=30, **kwargs)


def client(deployed: Deployed, key: str) -> OpenAI:
    return OpenAI(base_url=f"{deployed.base_url}/v1", api_key=key, max_retries=0)


def create(deployed: Deployed, key: str, messages: list[dict[str, Any]], **extra: Any) -> str:
    response = api(deployed, key, "POST", "/v1/conversations", json={"messages": messages, **extra})
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def messages_of(deployed: Deployed, key: str, conversation_id: str) -> list[dict[str, Any]]:
    response = api(deployed, key, "GET", f"/v1/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return list(response.json()["messages"])


def sent(deployed: Deployed) -> list[str]:
    """The contents of the messages of the last call the fake upstream got."""
    assert deployed.upstream.last_body is not None
    return [m["content"] for m in deployed.upstream.last_body["messages"]]


def long_turns(n: int) -> list[dict[str, Any]]:
    """Turns the gateway's estimate counts 33 tokens each (87 UTF-8 bytes / 3 + 4)."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Turn {i:02d} ".ljust(87, ".")}
            for i in range(n)]


PINNED = {"role": "system", "content": "Be brief."}  # 7 tokens
NEW_TURN = "Next question?"  # 8 tokens


def test_history_is_prepended_and_turns_are_appended(deployed: Deployed) -> None:
    key = new_key(deployed)
    created = api(deployed, key, "POST", "/v1/conversations", json={
        "metadata": {"course": "maths"},
        "messages": [PINNED, {"role": "user", "content": "7 x 8?"}, {"role": "assistant", "content": "56"}]}).json()
    assert created["object"] == "conversation" and created["id"].startswith("conv_")
    assert created["metadata"] == {"course": "maths"} and isinstance(created["created_at"], int)
    conversation_id = created["id"]

    sdk = client(deployed, key)
    reply = sdk.chat.completions.create(model="echo", messages=[{"role": "user", "content": "And 8 x 9?"}],
                                        extra_body={"conversation_id": conversation_id})
    assert sent(deployed) == ["Be brief.", "7 x 8?", "56", "And 8 x 9?"]
    assert "conversation_id" not in deployed.upstream.last_body
    answer = reply.choices[0].message.content
    assert messages_of(deployed, key, conversation_id)[3:] == [
        {"role": "user", "content": "And 8 x 9?"}, {"role": "assistant", "content": answer}]

    # A request's own system message applies to it alone; a stream's turn is kept once it completed.
    stream = sdk.chat.completions.create(
        model="echo", stream=True, extra_body={"conversation_id": conversation_id},
        messages=[{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "And 9 x 9?"}])
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert sent(deployed) == ["Be brief.", "Answer in French.", "7 x 8?", "56", "And 8 x 9?", answer, "And 9 x 9?"]
    assert messages_of(deployed, key, conversation_id)[5:] == [
        {"role": "user", "content": "And 9 x 9?"}, {"role": "assistant", "content": streamed}]
    full = api(deployed, key, "GET", f"/v1/conversations/{conversation_id}").json()
    assert full["metadata"] == {"course": "maths"} and full["summary"] is None and len(full["messages"]) == 7


def test_a_failed_answer_adds_nothing(deployed: Deployed) -> None:
    key = new_key(deployed)
    conversation_id = create(deployed, key, [{"role": "user", "content": "hello"}])
    deployed.upstream.fail(400)
    failed = api(deployed, key, "POST", "/v1/chat/completions", json={
        "model": "echo", "conversation_id": conversation_id, "messages": [{"role": "user", "content": "again"}]})
    assert failed.status_code == 400
    assert messages_of(deployed, key, conversation_id) == [{"role": "user", "content": "hello"}]


def chat_small(deployed: Deployed, key: str, conversation_id: str, max_tokens: int) -> httpx.Response:
    response = api(deployed, key, "POST", "/v1/chat/completions", json={
        "model": "echo-small", "conversation_id": conversation_id, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": NEW_TURN}]})
    assert response.status_code == 200, response.text
    return response


def test_history_is_trimmed_at_the_budget_edge_when_no_summary_can_be_made(deployed: Deployed) -> None:
    # Budget: 300 - max_tokens - 8 (new turn) - 7 (pinned) - 58 (room for a summary of 32 tokens) for 33-token
    # turns: 6 fit with max_tokens 29, 5 with 30 (and a kept history opens on a user turn: 4).
    assert CONVERSATION_WINDOW == 300
    key = new_key(deployed)
    turns = long_turns(12)
    for max_tokens, kept in ((29, 6), (30, 4)):
        conversation_id = create(deployed, key, [PINNED, *turns])
        deployed.upstream.fail(400)  # the summary call: it fails, so the oldest turns are only dropped
        chat_small(deployed, key, conversation_id, max_tokens)
        assert sent(deployed) == ["Be brief.", *[t["content"] for t in turns[-kept:]], NEW_TURN], max_tokens
        stored = api(deployed, key, "GET", f"/v1/conversations/{conversation_id}").json()
        assert stored["summary"] is None and len(stored["messages"]) == 1 + 12 + 2  # nothing stored is lost


def test_the_oldest_turns_are_summarised_once_by_the_summary_model(deployed: Deployed) -> None:
    key = new_key(deployed)
    turns = long_turns(12)
    conversation_id = create(deployed, key, [PINNED, *turns])
    before = deployed.upstream.request_count
    response = chat_small(deployed, key, conversation_id, 29)
    assert deployed.upstream.request_count == before + 2  # the summary, then the answer
    first = sent(deployed)
    assert first[0] == "Be brief." and first[1].startswith(SUMMARY_PREFIX + "the quick brown fox")
    assert first[2:] == [*[t["content"] for t in turns[-6:]], NEW_TURN]
    stored = api(deployed, key, "GET", f"/v1/conversations/{conversation_id}").json()
    assert SUMMARY_PREFIX + stored["summary"] == first[1]
    summary_row = ledger_row(deployed, f"{response.headers['x-request-id']}-summary")
    assert summary_row["endpoint"] == "conversations.summary" and summary_row["model"] == "echo"
    assert summary_row["prompt_tokens"] > 0 and summary_row["cost_usd"] > 0

    # The stored summary stands for those turns: with room for the rest, no new summary is made.
    before = deployed.upstream.request_count
    chat_small(deployed, key, conversation_id, 1)
    assert deployed.upstream.request_count == before + 1
    second = sent(deployed)
    assert second[:2] == first[:2] and second[2:8] == first[2:8] and second[8] == NEW_TURN
    assert len(second) == 2 + 6 + 2 + 1


def test_another_user_gets_404_and_delete_removes_it(deployed: Deployed) -> None:
    tenant = f"conv-{uuid.uuid4().hex[:8]}"
    owner, neighbour, stranger = new_key(deployed, tenant), new_key(deployed, tenant, "ben"), new_key(deployed)
    conversation_id = create(deployed, owner, [{"role": "user", "content": "private"}])
    for key in (neighbour, stranger):
        assert api(deployed, key, "GET", f"/v1/conversations/{conversation_id}").status_code == 404
        assert api(deployed, key, "DELETE", f"/v1/conversations/{conversation_id}").status_code == 404
        chat = api(deployed, key, "POST", "/v1/chat/completions", json={
            "model": "echo", "conversation_id": conversation_id, "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 404 and chat.json()["error"]["code"] == "conversation_not_found"
    assert messages_of(deployed, owner, conversation_id) == [{"role": "user", "content": "private"}]
    deleted = api(deployed, owner, "DELETE", f"/v1/conversations/{conversation_id}")
    assert deleted.json() == {"id": conversation_id, "object": "conversation.deleted", "deleted": True}
    assert api(deployed, owner, "GET", f"/v1/conversations/{conversation_id}").status_code == 404
    assert api(deployed, owner, "DELETE", f"/v1/conversations/{conversation_id}").status_code == 404
    empty = api(deployed, owner, "POST", "/v1/conversations")
    assert empty.status_code == 200 and empty.json()["metadata"] == {}
    bad = api(deployed, owner, "POST", "/v1/conversations", json={"metadata": {"k": "v" * 600}})
    assert bad.status_code == 400


def test_memory_get_put_patch_and_limits(deployed: Deployed) -> None:
    key = new_key(deployed)
    assert api(deployed, key, "GET", "/v1/users/me/memory").json()["memory"] == {}
    put = api(deployed, key, "PUT", "/v1/users/me/memory", json={"level_math": "CM2", "likes": ["hens"]})
    assert put.status_code == 200 and put.json()["memory"] == {"level_math": "CM2", "likes": ["hens"]}
    patched = api(deployed, key, "PATCH", "/v1/users/me/memory", json={"likes": None, "lang": "fr"})
    assert patched.json()["memory"] == {"level_math": "CM2", "lang": "fr"}
    got = api(deployed, key, "GET", "/v1/users/me/memory").json()
    assert got["object"] == "user.memory" and got["memory"] == {"level_math": "CM2", "lang": "fr"}
    assert api(deployed, new_key(deployed), "GET", "/v1/users/me/memory").json()["memory"] == {}

    too_many = api(deployed, key, "PUT", "/v1/users/me/memory", json={f"k{i}": i for i in range(65)})
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "memory_too_large"
    assert "65 keys; at most 64" in too_many.json()["error"]["message"]
    too_big = api(deployed, key, "PATCH", "/v1/users/me/memory", json={"notes": "x" * 17_000})
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "memory"
    assert "at most 16384" in too_big.json()["error"]["message"]
    not_an_object = api(deployed, key, "PUT", "/v1/users/me/memory", json=["a"])
    assert not_an_object.status_code == 400
    assert api(deployed, key, "GET", "/v1/users/me/memory").json()["memory"] == {"level_math": "CM2", "lang": "fr"}


def test_templates_read_the_users_memory(deployed: Deployed) -> None:
    name = f"memo-{uuid.uuid4().hex[:6]}"
    version = httpx.post(f"{deployed.base_url}/admin/templates/{name}/versions", timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"},
                         json={"body": "Teach {{ subject }} at level {{ memory.level_math }}."})
    assert version.status_code == 200, version.text
    key = new_key(deployed)
    body = {"model": "echo", "template": name, "variables": {"subject": "maths"},
            "messages": [{"role": "user", "content": "What is 7 x 8?"}]}
    missing = api(deployed, key, "POST", "/v1/chat/completions", json=body)
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "template_variable_missing"
    api(deployed, key, "PUT", "/v1/users/me/memory", json={"level_math": "CM2"})
    answered = api(deployed, key, "POST", "/v1/chat/completions", json=body)
    assert answered.status_code == 200
    assert sent(deployed) == ["Teach maths at level CM2.", "What is 7 x 8?"]


def test_export_and_erasure_include_conversations_and_memory(deployed: Deployed) -> None:
    tenant, user, secret = f"conv-gdpr-{uuid.uuid4().hex[:6]}", "zoe", f"secret-{uuid.uuid4().hex[:10]}"
    key = new_key(deployed, tenant, user)
    conversation_id = create(deployed, key, [{"role": "user", "content": f"My farm is {secret}."}])
    client(deployed, key).chat.completions.create(model="echo", messages=[{"role": "user", "content": "Noted?"}],
                                                  extra_body={"conversation_id": conversation_id})
    api(deployed, key, "PUT", "/v1/users/me/memory", json={"farm": secret})
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    messages_of(deployed, key, conversation_id)  # the turn is written

    export = httpx.get(f"{deployed.base_url}/admin/users/{user}/export", params={"tenant": tenant}, headers=admin,
                       timeout=30).json()
    [conversation] = export["conversations"]
    assert conversation["id"] == conversation_id
    assert [m["content"] for m in conversation["messages"]][:2] == [f"My farm is {secret}.", "Noted?"]
    assert [m["memory"] for m in export["memory"]] == [{"farm": secret}]
    assert export["messages"] == []  # no analytics consent: the request content is not kept

    erased = httpx.delete(f"{deployed.base_url}/admin/users/{user}", params={"tenant": tenant}, headers=admin,
                          timeout=30).json()
    assert erased["ledger"]["conversations"] == 1 and erased["ledger"]["conversation_messages"] == 3
    assert erased["ledger"]["memory"] == 1
    assert api(deployed, key, "GET", f"/v1/conversations/{conversation_id}").status_code == 404
    assert api(deployed, key, "GET", "/v1/users/me/memory").json()["memory"] == {}
    after = httpx.get(f"{deployed.base_url}/admin/users/{user}/export", params={"tenant": tenant}, headers=admin,
                      timeout=30).json()
    assert after["conversations"] == [] and after["memory"] == []
