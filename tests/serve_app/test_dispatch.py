"""The Dispatcher against remote models placed both ways (``placement.models``): the same answers and errors.

``deployment`` calls a ``ModelDeployment`` through its Serve handle (Serve's local testing mode);
``embedded`` runs the ``ModelServer`` in this process, as a Gateway replica does. Every test runs
against both and asserts the same values: placement changes where the model runs, nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deployments.models.server import ModelDeployment
from serve_app.config import GatewayConfig, Placement
from serve_app.dispatch import Answer, Dispatcher
from serve_app.errors import InvalidRequestError, UpstreamUnavailableError
from serve_app.handles import next_item
from serve_app.placement import Placed, placed_models
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse
from tests.fake_common import PHRASE
from tests.fake_upstream import FakeUpstream

WORDS = 6
EXPECTED_TEXT = " ".join(PHRASE[i % len(PHRASE)] for i in range(WORDS))
FAST_RETRY = {"max_attempts": 2, "initial_backoff_s": 0.0, "max_backoff_s": 0.0, "attempt_timeout_s": 0.5,
              "total_timeout_s": 10.0, "max_retry_after_s": 0.5}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream.started(words=WORDS) as fake:
        yield fake


def make_config(base_url: str, placement: Placement, data_dir: Path) -> GatewayConfig:
    """``primary`` falls back to ``backup``; both on the same fake, whose fault queue decides who fails."""
    model = {"engine": "remote", "engine_params": {"base_url": base_url, "model": "fake"}, "retry": FAST_RETRY}
    return GatewayConfig.model_validate({
        "models": [{"name": "primary", "fallbacks": ["backup"], **model}, {"name": "backup", **model}],
        "stores": {"redis_url": "redis://127.0.0.1:1", "data_dir": str(data_dir)},
        "placement": {"models": placement},
    })


@pytest.fixture(params=["deployment", "embedded"])
async def dispatcher(request: pytest.FixtureRequest, upstream: FakeUpstream,
                     tmp_path: Path) -> AsyncIterator[Dispatcher]:
    from ray import serve

    placement: Placement = request.param
    config = make_config(upstream.base_url, placement, tmp_path)
    handles: dict[str, Any] = {}
    for model in config.models:
        if not config.placement.embeds(model):
            app = serve.deployment(ModelDeployment, name=f"Model_{model.name}").bind(model, str(tmp_path))
            handles[model.name] = serve.run(app, name=f"dispatch-{model.name}", _local_testing_mode=True)
    models = placed_models(config, handles)
    assert all(m.remote == (placement == "deployment") for m in models.values())
    dispatcher = Dispatcher(config, models, circuits=None)
    yield dispatcher
    await dispatcher.close()


def chat(stream: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "primary", "messages": [{"role": "user", "content": "say hi"}], "stream": stream})


async def first_answer(dispatcher: Dispatcher, stream: bool = False) -> Answer:
    return await dispatcher.first_answer(chat(stream), dispatcher.config.models[0], [])


async def rest(answer: Answer) -> list[ChatCompletionStreamResponse]:
    chunks = [answer.first]
    while True:
        try:
            chunks.append(await next_item(answer.stream, 5.0, "Model"))
        except StopAsyncIteration:
            return chunks


def attempts(answer_or_error: Answer | list[Any]) -> list[tuple[str, int, str | None]]:
    listed = answer_or_error.attempts if isinstance(answer_or_error, Answer) else answer_or_error
    return [(a.model, a.status, a.error_code) for a in listed]


async def test_non_streamed_answer(dispatcher: Dispatcher, upstream: FakeUpstream) -> None:
    answer = await first_answer(dispatcher)
    assert answer.stream is None and answer.model.name == "primary"
    assert isinstance(answer.first, ChatCompletionResponse)
    assert answer.first.choices[0].message.content == EXPECTED_TEXT
    assert answer.first.usage.completion_tokens == WORDS
    assert attempts(answer) == [("primary", 200, None)]
    assert upstream.last_body is not None and not upstream.last_body.get("stream")


async def test_streamed_answer(dispatcher: Dispatcher) -> None:
    answer = await first_answer(dispatcher, stream=True)
    chunks = await rest(answer)
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == EXPECTED_TEXT
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == WORDS
    assert attempts(answer) == [("primary", 200, None)]


async def test_mid_stream_failure_is_the_last_item(dispatcher: Dispatcher, upstream: FakeUpstream) -> None:
    upstream.drop_stream(after_chunks=3)
    items = await rest(await first_answer(dispatcher, stream=True))
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in items[:-1]) and len(items) == 3
    assert isinstance(items[-1], UpstreamUnavailableError) and items[-1].status_code == 503


@pytest.mark.parametrize("stream", [False, True])
async def test_client_error_is_not_retried(dispatcher: Dispatcher, upstream: FakeUpstream, stream: bool) -> None:
    upstream.fail(400, message="bad field")
    calls: list[Any] = []
    with pytest.raises(InvalidRequestError) as caught:
        await dispatcher.first_answer(chat(stream), dispatcher.config.models[0], calls)
    assert (type(caught.value), caught.value.status_code) == (InvalidRequestError, 400)
    assert "bad field" in caught.value.message
    assert attempts(calls) == [("primary", 400, None)]
    assert upstream.request_count == 1


@pytest.mark.parametrize("stream", [False, True])
async def test_retry_then_answer(dispatcher: Dispatcher, upstream: FakeUpstream, stream: bool) -> None:
    upstream.fail(500)
    answer = await first_answer(dispatcher, stream)
    assert attempts(answer) == [("primary", 503, "upstream_unavailable"), ("primary", 200, None)]
    assert answer.model.name == "primary"


@pytest.mark.parametrize("stream", [False, True])
async def test_fallback_after_the_retries(dispatcher: Dispatcher, upstream: FakeUpstream, stream: bool) -> None:
    upstream.fail(502, times=2)
    answer = await first_answer(dispatcher, stream)
    assert attempts(answer) == [("primary", 503, "upstream_unavailable")] * 2 + [("backup", 200, None)]
    assert answer.model.name == "backup"


@pytest.mark.parametrize("stream", [False, True])
async def test_embedded_timeout_then_fallback(upstream: FakeUpstream, tmp_path: Path, stream: bool) -> None:
    # Embedded only: Serve's local testing mode reports a handle call cut off by its timeout as
    # RequestCancelledError; on a cluster it is the same timeout (tests/integration/test_resilience.py).
    config = make_config(upstream.base_url, "embedded", tmp_path)
    dispatcher = Dispatcher(config, placed_models(config, {}), circuits=None)
    upstream.hang(times=2, seconds=3.0)  # both of primary's attempts outlast attempt_timeout_s
    answer = await first_answer(dispatcher, stream)
    assert attempts(answer) == [("primary", 503, "upstream_timeout")] * 2 + [("backup", 200, None)]
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in await rest(answer) if c.choices) == EXPECTED_TEXT
    await dispatcher.close()


async def test_every_model_failing_is_one_503(dispatcher: Dispatcher, upstream: FakeUpstream) -> None:
    upstream.fail(429, times=None, retry_after_s=1)  # longer than max_retry_after_s: on to the fallback at once
    calls: list[Any] = []
    with pytest.raises(UpstreamUnavailableError) as caught:
        await dispatcher.first_answer(chat(), dispatcher.config.models[0], calls)
    assert (caught.value.status_code, caught.value.code, caught.value.headers) == (
        503, "upstream_rate_limited", {"retry-after": "1"})
    assert attempts(calls) == [("primary", 503, "upstream_rate_limited"), ("backup", 503, "upstream_rate_limited")]


async def test_embedded_model_starts_once_on_first_use(upstream: FakeUpstream, tmp_path: Path) -> None:
    config = make_config(upstream.base_url, "embedded", tmp_path)
    models = placed_models(config, {})
    placed: Placed = models["primary"]
    assert placed.target.engine.client is None  # built in the Gateway's __init__, started on its event loop
    await placed.invoke("check_health")
    client = placed.target.engine.client
    assert client is not None
    await placed.invoke("check_health")
    assert placed.target.engine.client is client
    for model in models.values():
        await model.close()
