"""AnthropicEngine against the fake upstream's Anthropic-compatible ``/v1/messages``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from deployments.models.anthropic import AnthropicEngine, translate_messages
from deployments.models.base import load_engine_class
from deployments.models.tokens import count_prompt_tokens, count_text_tokens
from serve_app.config import ModelConfig
from serve_app.errors import (
    InvalidRequestError,
    RaygateError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamUnavailableError,
)
from serve_app.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatMessage,
    UsageInfo,
)
from tests.deployments.models.contract import check_hang_times_out, check_stream, run
from tests.fake_common import PHRASE
from tests.fake_upstream import FakeUpstream

WORDS = 8
UPSTREAM_MODEL = "claude-test-model"
KEY_ENV = "RAYGATE_TEST_ANTHROPIC_KEY"
SECRET = "sk-ant-test-not-a-real-key-1234"
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": [{"type": "text", "text": "hello there "}, {"type": "text", "text": "friend"}]},
]
INPUT_WORDS = 5  # the fake counts whitespace words of system and all messages
EXPECTED_TEXT = " ".join(PHRASE[i % len(PHRASE)] for i in range(WORDS))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.started(words=WORDS) as fake:
        yield fake


def make_config(base_url: str, **params: Any) -> ModelConfig:
    return ModelConfig.model_validate({
        "name": "claude-test",
        "engine": "remote",
        "engine_params": {"provider": "anthropic", "base_url": base_url, "model": UPSTREAM_MODEL,
                          "api_key_env": KEY_ENV, **params},
    })


async def started_engine(config: ModelConfig) -> AnthropicEngine:
    engine = AnthropicEngine(config, data_dir="/nonexistent")
    await engine.start()
    return engine


@pytest.fixture
async def engine(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AnthropicEngine]:
    monkeypatch.setenv(KEY_ENV, SECRET)
    # The fake's base URL ends in /v1, as OpenAI-style ones do; the engine drops it.
    # A generous timeout: a loaded CI machine must not turn a slow connect into a failure; the hang test
    # makes its own engine with a short one.
    engine = await started_engine(make_config(upstream.base_url, extra_headers={"X-Tenant": "acme"}, timeout_s=10))
    yield engine
    await engine.close()


def make_request(stream: bool, messages: list[dict[str, Any]] | None = None, **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "claude-test", "messages": messages or MESSAGES, "stream": stream, **fields}
    )


async def answer(engine: AnthropicEngine, request: ChatCompletionRequest) -> tuple[str, str | None, UsageInfo]:
    """Run a request in its mode; return the text, finish_reason and usage."""
    outputs = await run(engine, request)
    if request.stream:
        text, last = _check_stream(outputs)
        assert last.usage is not None
        return text, last.choices[0].finish_reason, last.usage
    [response] = outputs
    assert isinstance(response, ChatCompletionResponse) and response.model == "claude-test"
    return response.choices[0].message.content or "", response.choices[0].finish_reason, response.usage


@pytest.mark.parametrize("stream", [False, True])
async def test_answer_usage_and_request_shape(engine: AnthropicEngine, upstream: FakeUpstream, stream: bool) -> None:
    text, finish, usage = await answer(engine, make_request(stream))
    assert (text, finish) == (EXPECTED_TEXT, "stop")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (INPUT_WORDS, WORDS,
                                                                                  INPUT_WORDS + WORDS)
    assert not usage.estimated
    body = upstream.last_body
    assert body is not None and upstream.last_path == "/v1/messages"
    assert body["model"] == UPSTREAM_MODEL and body["system"] == "be brief"
    assert body["messages"] == [{"role": "user", "content": "hello there friend"}]
    assert body["max_tokens"] == engine.config.default_max_tokens  # Anthropic requires it
    assert body.get("stream", False) is stream
    assert not {"stop_sequences", "temperature", "top_p", "metadata"} & set(body)


def _check_stream(chunks: list[Any]) -> tuple[str, ChatCompletionStreamResponse]:
    return check_stream(chunks, "claude-test")


async def test_multi_turn_is_merged_into_alternating_turns(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    messages = [
        {"role": "system", "content": "rule one"},
        {"role": "user", "content": "first"},
        {"role": "user", "content": "second"},
        {"role": "assistant", "content": "reply"},
        {"role": "developer", "content": "rule two"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "more"},
        {"role": "user", "content": "third"},
    ]
    _, _, usage = await answer(engine, make_request(False, messages))
    assert upstream.last_body is not None
    assert upstream.last_body["system"] == "rule one\n\nrule two"
    assert upstream.last_body["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "reply"}, {"type": "text", "text": "more"}]},
        {"role": "user", "content": "third"},
    ]
    assert usage.prompt_tokens == 9  # every word of system and turns, as the fake counts


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}], "starts with an assistant"),
        ([{"role": "system", "content": "only rules"}], "no user or assistant text"),
        ([{"role": "user", "content": "a"}, {"role": "tool", "content": "42"}], "Tool messages"),
    ],
)
async def test_untranslatable_conversations_are_refused(
    engine: AnthropicEngine, upstream: FakeUpstream, messages: list[dict[str, Any]], fragment: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        await run(engine, make_request(False, messages))
    assert fragment in info.value.message and info.value.param == "messages"
    assert upstream.request_count == 0


def test_translate_messages_keeps_a_trailing_assistant_prefill() -> None:
    messages = [ChatMessage(role="user", content="q"), ChatMessage(role="assistant", content="The answer is")]
    assert translate_messages(messages) == (None, [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": "The answer is"}])


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequences(engine: AnthropicEngine, upstream: FakeUpstream, stream: bool) -> None:
    text, finish, usage = await answer(engine, make_request(stream, stop=["fox", "zebra"]))
    assert upstream.last_body is not None and upstream.last_body["stop_sequences"] == ["fox", "zebra"]
    assert (text, finish) == ("the quick brown ", "stop")
    assert usage.completion_tokens == 4  # the fake emitted "the", " quick", " brown" and " "


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_gives_length(engine: AnthropicEngine, upstream: FakeUpstream, stream: bool) -> None:
    text, finish, usage = await answer(engine, make_request(stream, max_completion_tokens=3))
    assert upstream.last_body is not None and upstream.last_body["max_tokens"] == 3
    assert (text, finish, usage.completion_tokens) == (" ".join(PHRASE[:3]), "length", 3)


async def test_sampling_fields_are_dropped_by_default(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    # SDK 2.x sends API version 2026-10-21, which refuses sampling parameters (the fake too).
    request = make_request(False, temperature=0.5, top_p=0.9, user="u1", seed=7, presence_penalty=0.5)
    text, _, _ = await answer(engine, request)
    body = upstream.last_body
    assert body is not None and text == EXPECTED_TEXT
    assert body["metadata"] == {"user_id": "u1"}
    assert not {"temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "user"} & set(body)


@pytest.mark.parametrize(("temperature", "sent"), [(1.7, 1.0), (0.4, 0.4), (0.0, 0.0)])
async def test_sampling_fields_forwarded_under_a_pinned_older_api_version(
    upstream: FakeUpstream, temperature: float, sent: float
) -> None:
    config = make_config(upstream.base_url, extra_headers={"Anthropic-Version": "2023-06-01"})
    engine = await started_engine(config)
    try:
        text, _, _ = await answer(engine, make_request(True, temperature=temperature, top_p=0.9))
    finally:
        await engine.close()
    assert text == EXPECTED_TEXT  # the fake refuses a temperature above 1 under this version
    assert upstream.last_headers["anthropic-version"] == "2023-06-01"
    assert upstream.last_body is not None
    assert (upstream.last_body["temperature"], upstream.last_body["top_p"]) == (sent, 0.9)


async def test_api_key_and_extra_headers_reach_upstream(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    await run(engine, make_request(False))
    assert upstream.last_api_key == SECRET  # SDK 2.x sends it as a bearer token
    assert upstream.last_headers["x-tenant"] == "acme"
    assert upstream.last_headers["anthropic-version"] >= "2026-10-21"


async def test_base_url_without_v1(upstream: FakeUpstream) -> None:
    engine = await started_engine(make_config(upstream.base_url.removesuffix("/v1") + "/"))
    try:
        text, _, _ = await answer(engine, make_request(False))
    finally:
        await engine.close()
    assert text == EXPECTED_TEXT and upstream.last_path == "/v1/messages"


@pytest.mark.parametrize("stream", [False, True])
async def test_missing_usage_is_counted_and_flagged(
    engine: AnthropicEngine, upstream: FakeUpstream, stream: bool
) -> None:
    upstream.omit_usage()
    request = make_request(stream)
    text, _, usage = await answer(engine, request)
    assert usage.estimated
    assert usage.prompt_tokens == count_prompt_tokens(request.messages, UPSTREAM_MODEL)
    assert usage.completion_tokens == count_text_tokens(text, UPSTREAM_MODEL) > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert "estimated" not in usage.model_dump()  # internal: never reaches clients


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("status", "error_cls"),
    [
        (500, UpstreamUnavailableError),
        (503, UpstreamUnavailableError),
        (529, UpstreamUnavailableError),  # Anthropic's "overloaded"
        (400, InvalidRequestError),
        (401, UpstreamError),
        (403, UpstreamError),
        (404, UpstreamError),
        (409, UpstreamError),
    ],
)
async def test_status_faults_map_to_raygate_errors(
    engine: AnthropicEngine, upstream: FakeUpstream, status: int, error_cls: type[RaygateError], stream: bool
) -> None:
    upstream.fail(status, message=f"upstream says {status}")
    with pytest.raises(error_cls) as info:
        await run(engine, make_request(stream))
    assert type(info.value) is error_cls
    assert SECRET not in info.value.message
    if status == 400:
        assert info.value.message == "upstream says 400"  # read from Anthropic's error body
    if status in (401, 403):
        assert "credentials" in info.value.message
    assert len(await run(engine, make_request(stream))) >= 1  # the fault was used up


@pytest.mark.parametrize("stream", [False, True])
async def test_rate_limit_keeps_retry_after(engine: AnthropicEngine, upstream: FakeUpstream, stream: bool) -> None:
    upstream.fail(429, retry_after_s=7)
    with pytest.raises(UpstreamUnavailableError) as info:
        await run(engine, make_request(stream))
    assert (info.value.code, info.value.status_code, info.value.headers) == ("upstream_rate_limited", 503,
                                                                             {"retry-after": "7"})


async def test_rate_limit_without_retry_after(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    upstream.fail(429)
    with pytest.raises(UpstreamUnavailableError) as info:
        await run(engine, make_request(False))
    assert info.value.code == "upstream_rate_limited" and info.value.headers == {}


@pytest.mark.parametrize(
    ("status", "error_cls", "code"),
    [
        (529, UpstreamUnavailableError, "upstream_unavailable"),
        (500, UpstreamUnavailableError, "upstream_unavailable"),
        (429, UpstreamUnavailableError, "upstream_rate_limited"),
        (400, UpstreamError, "upstream_error"),
    ],
)
async def test_error_event_mid_stream(
    engine: AnthropicEngine, upstream: FakeUpstream, status: int, error_cls: type[RaygateError], code: str
) -> None:
    upstream.stream_error(status, after_chunks=5)  # message_start, block start, ping, 2 deltas
    received: list[ChatCompletionStreamResponse] = []
    with pytest.raises(error_cls) as info:
        async for chunk in engine.chat(make_request(True)):
            assert isinstance(chunk, ChatCompletionStreamResponse)
            received.append(chunk)
    assert type(info.value) is error_cls and info.value.code == code
    assert [c.choices[0].delta.content for c in received] == [PHRASE[0], " " + PHRASE[1]]


@pytest.mark.parametrize("stream", [False, True])
async def test_hang_maps_to_timeout(upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch, stream: bool) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    engine = await started_engine(make_config(upstream.base_url, timeout_s=0.5))
    upstream.hang(seconds=30)  # stop() wakes the handler
    await check_hang_times_out(engine, make_request(stream))


async def test_dropped_stream_fails_mid_way(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    upstream.drop_stream(after_chunks=5)  # message_start, block start, ping, 2 deltas
    received: list[ChatCompletionStreamResponse] = []
    with pytest.raises(UpstreamUnavailableError) as info:
        async for chunk in engine.chat(make_request(True)):
            assert isinstance(chunk, ChatCompletionStreamResponse)
            received.append(chunk)
    assert type(info.value) is UpstreamUnavailableError
    assert [c.choices[0].delta.content for c in received] == [PHRASE[0], " " + PHRASE[1]]


async def test_dropped_response_fails(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    upstream.drop_stream()
    with pytest.raises(UpstreamUnavailableError) as info:
        await run(engine, make_request(False))
    assert type(info.value) is UpstreamUnavailableError


async def test_unreachable_upstream() -> None:
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
    engine = AnthropicEngine(make_config(upstream.base_url), data_dir="/nonexistent")
    with pytest.raises(ServiceUnavailableError):
        await engine.check_health()
    with pytest.raises(ServiceUnavailableError):
        await run(engine, make_request(False))
    await engine.start()
    await engine.check_health()
    await engine.close()
    assert engine.client is None


def test_provider_anthropic_loads_this_engine() -> None:
    assert load_engine_class(make_config("https://api.anthropic.com")) is AnthropicEngine


async def test_fake_records_anthropic_faults_via_control(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    root = upstream.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{root}/_control", json={"faults": [{"kind": "status", "status": 529}]}) as resp:
            assert resp.status == 200
        async with session.post(f"{upstream.base_url}/messages", json={"model": "m", "max_tokens": 1,
                                                                       "messages": [{"role": "user", "content": "x"}]},
                                ) as resp:
            assert resp.status == 529
            assert await resp.json() == {"type": "error", "error": {"type": "overloaded_error",
                                                                    "message": "fake upstream failure"}}
    await run(engine, make_request(False))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/_control") as resp:
            state = await resp.json()
    assert state["request_count"] == 2 and state["faults"] == []
    assert state["last_headers"]["authorization"] == f"Bearer {SECRET}"
