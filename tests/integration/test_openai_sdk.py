"""The gateway over HTTP, driven by the official openai SDK (sync and async)."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.integration.conftest import UPSTREAM_KEY, Deployed, create_key

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello to the farm"}]
# The engines are under test here, not the response cache.
NO_CACHE = {"Cache-Control": "no-cache, no-store"}


def client(deployed: Deployed, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployed.base_url}/v1", api_key=key or deployed.api_key, max_retries=0)


def aclient(deployed: Deployed) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{deployed.base_url}/v1", api_key=deployed.api_key, max_retries=0)


@pytest.mark.parametrize("model", ["tiny", "echo"])
def test_chat_non_streaming(deployed: Deployed, model: str) -> None:
    raw = client(deployed).chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=8,
                                                                    temperature=0, extra_headers=NO_CACHE)
    completion = raw.parse()
    assert completion.model == model
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 8
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert raw.headers["x-raygate-model"] == model
    assert raw.headers["x-request-id"]


@pytest.mark.parametrize("model", ["tiny", "echo"])
def test_chat_streaming_with_usage_chunk(deployed: Deployed, model: str) -> None:
    chunks = list(client(deployed).chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers=NO_CACHE))
    content_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text
    assert 0 < usage_chunk.usage.completion_tokens <= 8


def test_stream_without_include_usage_sends_no_usage(deployed: Deployed) -> None:
    chunks = list(client(deployed).chat.completions.create(model="echo", messages=MESSAGES, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_stream_and_non_stream_agree_for_greedy_tiny(deployed: Deployed) -> None:
    c = client(deployed)
    whole = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0,
                                      extra_headers=NO_CACHE)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, stream=True, extra_headers=NO_CACHE)
        if ch.choices)
    assert streamed == whole.choices[0].message.content


def test_stream_ends_with_done_frame(deployed: Deployed) -> None:
    body = {"model": "echo", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{deployed.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {deployed.api_key}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = [line for line in response.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert all(f.startswith("data: ") for f in frames)


async def test_async_client_chat_and_stream(deployed: Deployed) -> None:
    c = aclient(deployed)
    completion = await c.chat.completions.create(model="echo", messages=MESSAGES)
    assert completion.choices[0].message.content
    stream = await c.chat.completions.create(model="echo", messages=MESSAGES, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    await c.close()


def test_remote_engine_sends_configured_key_upstream(deployed: Deployed) -> None:
    client(deployed).chat.completions.create(model="echo", messages=MESSAGES, user="u-42")
    assert deployed.upstream.last_api_key == UPSTREAM_KEY
    assert deployed.upstream.last_body["model"] == "fake-echo"


def test_fallback_when_primary_upstream_is_down(deployed: Deployed) -> None:
    raw = client(deployed).chat.completions.with_raw_response.create(model="broken", messages=MESSAGES)
    assert raw.headers["x-raygate-model"] == "echo"
    assert raw.parse().choices[0].message.content


def test_models_lists_configured_models(deployed: Deployed) -> None:
    ids = {m.id for m in client(deployed).models.list()}
    assert {"tiny", "echo", "broken", "all-minilm-l6-v2"} <= ids


def test_embeddings(deployed: Deployed) -> None:
    result = client(deployed).embeddings.create(model="all-minilm-l6-v2",
                                                input=["chickens need grit", "les poules ont besoin de grit"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 384
    assert result.usage.prompt_tokens > 0
    single = client(deployed).embeddings.create(model="all-minilm-l6-v2", input="chickens need grit")
    assert single.data[0].embedding == pytest.approx(result.data[0].embedding, abs=1e-5)


@pytest.mark.parametrize("key", [None, "rg-nope-nope", "not-even-close"])
def test_bad_keys_are_401(deployed: Deployed, key: str | None) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json={"model": "echo", "messages": MESSAGES},
                          headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_sdk_raises_authentication_error(deployed: Deployed) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(deployed, key="rg-bad-key").chat.completions.create(model="echo", messages=MESSAGES)
    assert info.value.code == "invalid_api_key"


def test_revoked_key_is_401(deployed: Deployed) -> None:
    headers = {"Authorization": f"Bearer {deployed.admin_key}"}
    created = httpx.post(f"{deployed.base_url}/admin/keys", json={"tenant": "t2", "user": "bob"}, headers=headers)
    assert created.status_code == 200
    key = created.json()["key"]
    assert client(deployed, key=key).chat.completions.create(model="echo", messages=MESSAGES).choices
    assert httpx.delete(f"{deployed.base_url}/admin/keys/{created.json()['key_id']}", headers=headers).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(deployed, key=key).chat.completions.create(model="echo", messages=MESSAGES)


def test_unknown_model_is_404(deployed: Deployed) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(deployed).chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.code == "model_not_found"
    assert info.value.body["param"] == "model"


@pytest.mark.parametrize("body,param", [
    ({"model": "echo"}, "messages"),
    ({"model": "echo", "messages": []}, "messages"),
    ({"model": "echo", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "echo", "messages": MESSAGES, "temperature": 7}, "temperature"),
    ({"model": "echo", "messages": MESSAGES, "n": 2}, "n"),
    ({"model": "echo", "messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
])
def test_bad_bodies_are_400_with_param(deployed: Deployed, body: dict[str, object], param: str) -> None:
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unparseable_json_is_400(deployed: Deployed) -> None:
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", content=b"{not json",
                          headers={"Authorization": f"Bearer {deployed.api_key}", "content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_sdk_raises_bad_request(deployed: Deployed) -> None:
    with pytest.raises(openai.BadRequestError):
        client(deployed).chat.completions.create(model="echo", messages=MESSAGES, temperature=5)


def test_body_too_large_is_413(deployed: Deployed) -> None:
    big = [{"role": "user", "content": "x" * 70_000}]
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json={"model": "echo", "messages": big},
                          headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert response.headers["x-request-id"]


def test_unknown_route_is_404_in_openai_shape(deployed: Deployed) -> None:
    response = httpx.get(f"{deployed.base_url}/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_health_reports_components(deployed: Deployed) -> None:
    response = httpx.get(f"{deployed.base_url}/health", timeout=30)
    assert response.status_code == 200
    components = response.json()["components"]
    assert components["model:tiny"] == "ok" and components["ledger"] == "ok" and components["redis"] == "ok"
    assert components["model:broken"] in ("ok", "down")


def test_ledger_records_requests(deployed: Deployed) -> None:
    raw = client(deployed).chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    usage = raw.parse().usage
    headers = {"Authorization": f"Bearer {deployed.admin_key}"}
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        rows = httpx.get(f"{deployed.base_url}/admin/requests", params={"limit": 1000}, headers=headers).json()
        row = next((r for r in rows if r["id"] == request_id), None)
    assert row is not None
    assert (row["tenant"], row["user"], row["model"], row["status"]) == ("acme", "alice", "echo", 200)
    assert row["prompt_tokens"] == usage.prompt_tokens and row["completion_tokens"] == usage.completion_tokens
    assert row["cost_usd"] == pytest.approx((usage.prompt_tokens * 3.0 + usage.completion_tokens * 6.0) / 1e6)
    assert row["latency_ms"] > 0


def test_admin_routes_need_admin_key(deployed: Deployed) -> None:
    response = httpx.get(f"{deployed.base_url}/admin/requests", headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert response.status_code == 403
    assert response.json()["error"]["type"] == "permission_error"


def test_anthropic_upstream_through_the_openai_sdk(deployed: Deployed) -> None:
    c = client(deployed)
    completion = c.chat.completions.create(model="claude", messages=MESSAGES, max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    assert deployed.upstream.last_path.endswith("/v1/messages")
    assert deployed.upstream.last_body["system"] == "You are terse."
    chunks = list(c.chat.completions.create(model="claude", messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens > 0


def test_feedback_by_the_owning_key_only(deployed: Deployed) -> None:
    raw = client(deployed).chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)
    request_id = raw.headers["x-request-id"]
    url = f"{deployed.base_url}/v1/feedback"
    mine = httpx.post(url, json={"request_id": request_id, "rating": 4, "comment": "useful"},
                      headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert mine.status_code == 200 and mine.json()["rating"] == 4
    other = create_key(deployed.redis_url, "acme", "mallory", "free")
    theirs = httpx.post(url, json={"request_id": request_id, "thumbs": "down"},
                        headers={"Authorization": f"Bearer {other}"})
    assert theirs.status_code == 404 and theirs.json()["error"]["param"] == "request_id"
    empty = httpx.post(url, json={"request_id": request_id}, headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert empty.status_code == 400


def test_cors_closed_by_default_and_security_headers(deployed: Deployed) -> None:
    preflight = httpx.options(f"{deployed.base_url}/v1/chat/completions",
                              headers={"origin": "https://elsewhere.example", "access-control-request-method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    response = httpx.get(f"{deployed.base_url}/v1/models", headers={"Authorization": f"Bearer {deployed.api_key}"})
    assert response.headers["x-content-type-options"] == "nosniff"


def test_admin_block_refuses_the_key_until_lifted(deployed: Deployed) -> None:
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    key = httpx.post(f"{deployed.base_url}/admin/keys", json={"tenant": "t9", "user": "spammer"}, headers=admin).json()
    block = httpx.post(f"{deployed.base_url}/admin/blocks", json={"key_id": key["key_id"], "seconds": 600},
                       headers=admin)
    assert block.status_code == 200
    assert key["key_id"] in {b["key_id"] for b in httpx.get(f"{deployed.base_url}/admin/blocks", headers=admin).json()}
    with pytest.raises(openai.RateLimitError):
        client(deployed, key=key["key"]).chat.completions.create(model="echo", messages=MESSAGES)
    assert httpx.delete(f"{deployed.base_url}/admin/blocks/{key['key_id']}", headers=admin).status_code == 200
    assert client(deployed, key=key["key"]).chat.completions.create(model="echo", messages=MESSAGES).choices


def test_too_many_messages_is_a_400(deployed: Deployed) -> None:
    many = [{"role": "user", "content": "hi"}] * 300  # the guard's default max_messages is 256
    with pytest.raises(openai.BadRequestError) as info:
        client(deployed).chat.completions.create(model="echo", messages=many)
    assert info.value.code == "too_many_messages"
