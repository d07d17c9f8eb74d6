"""RemoteEngine against the local fake OpenAI-compatible upstream."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from deployments.models.tokens import count_prompt_tokens, count_text_tokens
from deployments.models.remote import RemoteEngine
from serve_app.config import ModelConfig
from serve_app.errors import (
    InvalidRequestError,
    RaygateError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
)
from serve_app.protocol import (
    IMAGE_PROMPT_TOKENS,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from tests.deployments.models.contract import check_hang_times_out, check_stream, run
from tests.fake_common import IMAGE_TOKENS, PHRASE
from tests.fake_upstream import FakeUpstream

WORDS = 8
KEY_ENV = "RAYGATE_TEST_REMOTE_KEY"
SECRET = "sk-test-not-a-real-key-1234"
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hello there "}, {"type": "text", "text": "friend"}]},
]
PROMPT_WORDS = 5  # the fake counts whitespace words of all contents
EXPECTED_TEXT = " ".join(PHRASE[i % len(PHRASE)] for i in range(WORDS))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.started(words=WORDS) as fake:
        yield fake


def make_config(base_url: str, **params: Any) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "remote-test",
        "engine": "remote",
        "engine_params": {"base_url": base_url, "model": "upstream-model", "api_key_env": KEY_ENV, **params},
    })


async def started_engine(config: ModelConfig) -> RemoteEngine:
    engine = RemoteEngine(config, data_dir="/nonexistent")
    await engine.start()
    return engine


@pytest.fixture
async def engine(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RemoteEngine]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    # A generous timeout: a loaded CI machine must not turn a slow connect into a failure; the hang test
    # makes its own engine with a short one.
    engine = await started_engine(make_config(upstream.base_url, extra_headers={"X-Tenant": "acme"}, timeout_s=10))
    yield engine
    await engine.close()


def make_request(stream: bool, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "remote-test", "messages": MESSAGES, "stream": stream,
                                                 **fields})


def _check_stream(chunks: list[Any]) -> tuple[str, ChatCompletionStreamResponse]:
    return check_stream(chunks, "remote-test")


async def test_non_stream_answer_and_usage(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    [response] = await run(engine, make_request(False))
    assert isinstance(response, ChatCompletionResponse)
    assert response.model == "remote-test"
    assert response.choices[0].message.content == EXPECTED_TEXT
    assert response.choices[0].finish_reason == "stop"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (PROMPT_WORDS, WORDS)
    assert response.usage.total_tokens == PROMPT_WORDS + WORDS


async def test_request_fields_are_forwarded(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    request = make_request(False, max_tokens=3, temperature=0.5, top_p=0.9, stop=["x"], seed=7, user="u1")
    [response] = await run(engine, request)
    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"
    body = upstream.last_body
    assert body is not None and upstream.last_path == "/v1/chat/completions"
    assert body["model"] == "upstream-model"
    assert body["messages"] == [{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello there friend"}]
    expected = {"max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "stop": ["x"], "seed": 7, "user": "u1"}
    assert {k: body[k] for k in expected} == expected


async def test_default_max_tokens_is_sent(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    await run(engine, make_request(False))
    assert upstream.last_body is not None
    assert upstream.last_body["max_tokens"] == engine.config.default_max_tokens


async def test_stream_contract_and_usage(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    chunks = await run(engine, make_request(True))
    text, last = _check_stream(chunks)
    assert text == EXPECTED_TEXT
    assert last.choices[0].finish_reason == "stop"
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (PROMPT_WORDS, WORDS)
    # Usage is always asked for, whatever the client's stream_options said.
    assert upstream.last_body is not None
    assert upstream.last_body["stream_options"] == {"include_usage": True}


async def test_stream_length_finish(engine: RemoteEngine) -> None:
    text, last = _check_stream(await run(engine, make_request(True, max_completion_tokens=2)))
    assert text == " ".join(PHRASE[:2])
    assert last.choices[0].finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 2


async def test_api_key_and_extra_headers_reach_upstream(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    await run(engine, make_request(False))
    assert upstream.last_api_key == SECRET
    assert upstream.last_headers["x-tenant"] == "acme"
    assert upstream.request_count == 1


async def test_unset_key_env_sends_placeholder(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    engine = await started_engine(make_config(upstream.base_url))
    try:
        await run(engine, make_request(False))
    finally:
        await engine.close()
    assert upstream.last_api_key == "none"


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_usage_is_estimated(engine: RemoteEngine, upstream: FakeUpstream, stream: bool) -> None:
    upstream.omit_usage()
    request = make_request(stream)
    outputs = await run(engine, request)
    usage = _check_stream(outputs)[1].usage if stream else outputs[0].usage
    assert usage is not None and usage.estimated
    # "upstream-model" is no OpenAI model name, so tokens.py counts about 4 characters a token.
    assert usage.prompt_tokens == count_prompt_tokens(request.messages, "upstream-model")
    assert usage.completion_tokens == count_text_tokens(EXPECTED_TEXT, "upstream-model")
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "error_cls"),
    [
        (500, UpstreamUnavailableError),
        (502, UpstreamUnavailableError),
        (503, UpstreamUnavailableError),
        (400, InvalidRequestError),
        (401, UpstreamError),
        (403, UpstreamError),
        (404, UpstreamError),
        (409, UpstreamError),
    ],
)
async def test_status_faults_map_to_raygate_errors(
    engine: RemoteEngine, upstream: FakeUpstream, status: int, error_cls: type[RaygateError], stream: bool
) -> None:
    upstream.fail(status, message=f"upstream says {status}")
    with pytest.raises(error_cls) as info:
        await run(engine, make_request(stream))
    assert type(info.value) is error_cls
    assert SECRET not in info.value.message
    if status == 400:
        assert info.value.message == "upstream says 400"
    if status in (401, 403):
        assert "credentials" in info.value.message
    # The fault was used up: the next call succeeds.
    assert len(await run(engine, make_request(stream))) >= 1


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_keeps_retry_after(engine: RemoteEngine, upstream: FakeUpstream, stream: bool) -> None:
    upstream.fail(429, retry_after_s=7)
    with pytest.raises(UpstreamUnavailableError) as info:
        await run(engine, make_request(stream))
    assert info.value.code == "upstream_rate_limited"
    assert info.value.status_code == 503
    assert info.value.headers == {"retry-after": "7"}


async def test_rate_limit_without_retry_after(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.fail(429)
    with pytest.raises(UpstreamUnavailableError) as info:
        await run(engine, make_request(False))
    assert info.value.code == "upstream_rate_limited" and info.value.headers == {}


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_maps_to_timeout(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    engine = await started_engine(make_config(upstream.base_url, timeout_s=0.5))
    upstream.hang(seconds=30)  # stop() wakes the handler
    await check_hang_times_out(engine, make_request(stream))


async def test_a_stream_may_outlast_the_timeout_while_it_keeps_sending(
    upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``timeout_s`` bounds the connect and each read, not the whole answer (as in the SDK)."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    engine = await started_engine(make_config(upstream.base_url, timeout_s=0.5))
    upstream.trickle(0.15)  # 8 words + role + finish + usage frames: about 1.6 s in all
    try:
        started = time.monotonic()
        text, last = _check_stream(await run(engine, make_request(True)))
    finally:
        await engine.close()
    assert time.monotonic() - started > 1.0 and text == EXPECTED_TEXT and last.usage is not None


async def test_dropped_stream_fails_mid_way(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.drop_stream(after_chunks=3)  # role chunk + 2 content chunks
    received: list[ChatCompletionStreamResponse] = []
    with pytest.raises(UpstreamUnavailableError):
        async for chunk in engine.chat(make_request(True)):
            assert isinstance(chunk, ChatCompletionStreamResponse)
            received.append(chunk)
    assert [c.choices[0].delta.content for c in received] == PHRASE[:1] + [" " + PHRASE[1]]


async def test_error_chunk_mid_stream_fails_and_the_next_call_works(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    """An ``{"error": ...}`` chunk inside a 200 stream (OpenRouter's way) ends it with an upstream error."""
    upstream.stream_error(502, after_chunks=3, message=f"provider said {SECRET}")
    received: list[str | None] = []
    with pytest.raises(UpstreamError) as info:
        async for chunk in engine.chat(make_request(True)):
            assert isinstance(chunk, ChatCompletionStreamResponse)
            received.append(chunk.choices[0].delta.content)
    assert received == PHRASE[:1] + [" " + PHRASE[1]]
    assert info.value.status_code == 502 and SECRET not in info.value.message
    _check_stream(await run(engine, make_request(True)))


async def test_dropped_response_fails(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.drop_stream()
    with pytest.raises(UpstreamUnavailableError):
        await run(engine, make_request(False))


async def test_answer_that_is_not_json_is_an_upstream_error(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.garble()
    with pytest.raises(UpstreamError) as info:
        await run(engine, make_request(False))
    assert info.value.status_code == 502 and "not a JSON object" in info.value.message
    [response] = await run(engine, make_request(False))  # the next answer is fine
    assert isinstance(response, ChatCompletionResponse) and response.choices[0].message.content


async def test_unreachable_upstream(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeUpstream()
    base_url = await fake.start()
    await fake.stop()  # the port is now closed
    engine = await started_engine(make_config(base_url))
    try:
        with pytest.raises(UpstreamUnavailableError) as info:
            await run(engine, make_request(False))
    finally:
        await engine.close()
    assert type(info.value) is UpstreamUnavailableError


async def test_not_started_engine_is_unhealthy(upstream: FakeUpstream) -> None:
    engine = RemoteEngine(make_config(upstream.base_url), data_dir="/nonexistent")
    with pytest.raises(ServiceUnavailableError):
        await engine.check_health()
    await engine.start()
    await engine.check_health()
    await engine.close()


async def test_faults_via_control_endpoint(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    root = upstream.base_url.removesuffix("/v1")
    fault = {"kind": "status", "status": 503, "times": 2}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{root}/_control", json={"faults": [fault]}) as resp:
            assert resp.status == 200
    for _ in range(2):
        with pytest.raises(UpstreamUnavailableError):
            await run(engine, make_request(False))
    await run(engine, make_request(False))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/_control") as resp:
            state = await resp.json()
    assert state["request_count"] == 3 and state["faults"] == []
    assert state["last_headers"]["authorization"] == f"Bearer {SECRET}"


PNG_URL = "data:image/png;base64,iVBORw0KGgo="
IMAGE_MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "what is"}, {"type": "text", "text": " this"},
                                 {"type": "image_url", "image_url": {"url": PNG_URL, "detail": "low"}},
                                 {"type": "image_url", "image_url": {"url": "https://x.example/a.jpg"}}]},
]


@pytest.mark.parametrize("stream", [False, True])
async def test_image_parts_are_forwarded_unchanged(engine: RemoteEngine, upstream: FakeUpstream, stream: bool) -> None:
    request = make_request(stream, messages=IMAGE_MESSAGES)
    outputs = await run(engine, request)
    usage = _check_stream(outputs)[1].usage if stream else outputs[0].usage
    assert upstream.last_body is not None and upstream.last_body["messages"] == IMAGE_MESSAGES
    assert usage is not None and not usage.estimated
    assert usage.prompt_tokens == 5 + 2 * IMAGE_TOKENS  # as the fake reports: its words and its image price


async def test_missing_usage_with_images_adds_the_allowance(engine: RemoteEngine, upstream: FakeUpstream) -> None:
    upstream.omit_usage()
    request = make_request(False, messages=IMAGE_MESSAGES)
    [response] = await run(engine, request)
    assert response.usage.estimated
    assert response.usage.prompt_tokens == count_prompt_tokens(request.messages, "upstream-model") \
        + 2 * IMAGE_PROMPT_TOKENS
