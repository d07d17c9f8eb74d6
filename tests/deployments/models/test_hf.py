"""HFEngine on the tiny model: usage, limits, sampling, stops, streaming and concurrency."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from deployments.models.base import Engine
from tests.deployments.models.contract import complete, stream, text
from deployments.models.hf import HFEngine
from deployments.models.server import ModelDeployment
from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequestError, RaygateError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour, ça va ?"}]
CONTEXT_TOKENS = 256


def _config(model_path: Path, **params: Any) -> ModelConfig:
    engine_params = {"model_path": str(model_path), "max_model_len_tokens": CONTEXT_TOKENS, **params}
    return ModelConfig(name="tiny", engine="hf", engine_params=engine_params)


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": MESSAGES, **fields})


@pytest.fixture(scope="module")
async def engine(tiny_model_path: Path) -> HFEngine:
    engine = HFEngine(_config(tiny_model_path), data_dir="/nonexistent")
    await engine.start()
    return engine


async def _complete(engine: Engine, **fields: Any) -> ChatCompletionResponse:
    return await complete(engine, _request(**fields))


async def _stream(engine: Engine, **fields: Any) -> list[ChatCompletionStreamResponse]:
    return await stream(engine, _request(**fields))


async def test_answer_counts_prompt_tokens_like_the_tokenizer(engine: HFEngine, tiny_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    expected_prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])

    response = await _complete(engine, temperature=0, max_tokens=5)
    assert response.model == "tiny"
    assert response.usage.prompt_tokens == expected_prompt_tokens
    assert response.usage.completion_tokens == 5
    assert response.usage.total_tokens == expected_prompt_tokens + 5
    assert response.choices[0].finish_reason == "length"
    assert response.choices[0].message.content


async def test_max_completion_tokens_wins_and_output_is_capped_by_the_context(
    engine: HFEngine, tiny_model_path: Path
) -> None:
    response = await _complete(engine, temperature=0, max_tokens=50, max_completion_tokens=3)
    assert response.usage.completion_tokens == 3

    small = HFEngine(_config(tiny_model_path, max_model_len_tokens=response.usage.prompt_tokens + 4), "/nonexistent")
    await small.start()
    capped = await _complete(small, temperature=0, max_tokens=50)
    assert capped.usage.completion_tokens == 4
    assert capped.choices[0].finish_reason == "length"


async def test_stream_contract_and_same_text_as_non_stream(engine: HFEngine) -> None:
    chunks = await _stream(engine, temperature=0, max_tokens=24)
    first, *middle, last = chunks
    assert first.choices[0].delta.role == "assistant" and not first.choices[0].delta.content
    assert len(middle) >= 2 and all(c.choices[0].delta.content for c in middle)
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in [first, *middle])
    assert last.choices[0].finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1

    response = await _complete(engine, temperature=0, max_tokens=24)
    assert text(chunks) == response.choices[0].message.content
    assert last.usage.prompt_tokens == response.usage.prompt_tokens


async def test_same_seed_same_text_when_sampling(engine: HFEngine) -> None:
    first = await _complete(engine, temperature=1, seed=7, max_tokens=20)
    again = await _complete(engine, temperature=1, seed=7, max_tokens=20)
    other = await _complete(engine, temperature=1, seed=8, max_tokens=20)
    streamed = await _stream(engine, temperature=1, seed=7, max_tokens=20)
    assert first.choices[0].message.content == again.choices[0].message.content
    assert first.choices[0].message.content == text(streamed)
    assert first.choices[0].message.content != other.choices[0].message.content


async def test_low_top_p_is_greedy(engine: HFEngine) -> None:
    greedy = await _complete(engine, temperature=0, max_tokens=12)
    nucleus = await _complete(engine, temperature=1, top_p=1e-6, seed=3, max_tokens=12)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize("stream", [False, True])
async def test_stop_sequence_truncates(engine: HFEngine, stream: bool) -> None:
    full = (await _complete(engine, temperature=0, max_tokens=30)).choices[0].message.content or ""
    # A stop sequence from the middle of the greedy answer, made of plain characters.
    start = next(i for i in range(len(full) // 2, len(full)) if full[i : i + 4].isascii() and full[i : i + 4].strip())
    stop = full[start : start + 4]
    expected = full[: full.find(stop)]

    fields = {"temperature": 0, "max_tokens": 30, "stop": ["never-there", stop]}
    if stream:
        chunks = await _stream(engine, **fields)
        answer, finish, usage = text(chunks), chunks[-1].choices[0].finish_reason, chunks[-1].usage
    else:
        response = await _complete(engine, **fields)
        answer, finish, usage = response.choices[0].message.content, response.choices[0].finish_reason, response.usage
    assert answer == expected
    assert finish == "stop"
    assert usage is not None and 0 < usage.completion_tokens < 30


@pytest.mark.parametrize("stream", [False, True])
async def test_too_long_prompt_is_an_invalid_request(engine: HFEngine, stream: bool) -> None:
    request = _request(stream=stream, messages=[{"role": "user", "content": "word " * CONTEXT_TOKENS}])
    with pytest.raises(InvalidRequestError) as info:
        async for _ in engine.chat(request):
            pass
    assert info.value.code == "context_length_exceeded"
    assert f"{CONTEXT_TOKENS} tokens" in info.value.message


async def _record(name: str, outputs: AsyncIterator[Any], events: list[str]) -> None:
    async for chunk in outputs:
        if chunk.choices[0].delta.content:
            events.append(name)


async def test_concurrent_requests_keep_the_event_loop_responsive(engine: HFEngine) -> None:
    events: list[str] = []
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(tick())
    try:
        await asyncio.gather(
            _record("a", engine.chat(_request(stream=True, temperature=0, max_tokens=32)), events),
            _record("b", engine.chat(_request(stream=True, temperature=1, seed=1, max_tokens=32)), events),
        )
    finally:
        ticker.cancel()
    assert events.count("a") > 1 and events.count("b") > 1
    # Both ran at once (max_concurrency 2): their chunks interleave.
    assert events.index("b") < len(events) - 1 - events[::-1].index("a")
    # The loop ran between every pair of tokens, so it never waited for a whole generation.
    assert ticks >= 64


async def test_concurrency_limit_and_release_on_early_close(tiny_model_path: Path) -> None:
    engine = HFEngine(_config(tiny_model_path, max_concurrency=1), data_dir="/nonexistent")
    await engine.start()
    abandoned = engine.chat(_request(stream=True, temperature=0, max_tokens=200))
    await anext(abandoned)
    await abandoned.aclose()  # the client went away: the slot must come back

    events: list[str] = []
    await asyncio.gather(
        _record("a", engine.chat(_request(stream=True, temperature=0, max_tokens=8)), events),
        _record("b", engine.chat(_request(stream=True, temperature=0, max_tokens=8)), events),
    )
    assert events == sorted(events)  # one at a time: all of a's chunks, then b's


async def test_not_started_engine_is_unhealthy(tiny_model_path: Path) -> None:
    engine = HFEngine(_config(tiny_model_path), data_dir="/nonexistent")
    with pytest.raises(RaygateError):
        await engine.check_health()


async def test_model_deployment_in_serve_local_testing_mode(tiny_model_config: ModelConfig, tmp_path: Path) -> None:
    from ray import serve

    app = serve.deployment(ModelDeployment).bind(tiny_model_config, str(tmp_path))
    handle = serve.run(app, _local_testing_mode=True)
    request = _request(temperature=0, max_tokens=6)

    response = await handle.complete.remote(request)
    assert isinstance(response, ChatCompletionResponse)
    assert response.usage.completion_tokens == 6 and response.choices[0].finish_reason == "length"

    chunks = [chunk async for chunk in handle.options(stream=True).stream.remote(request)]
    assert all(isinstance(c, ChatCompletionStreamResponse) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6
    assert text(chunks) == response.choices[0].message.content

    too_long = _request(messages=[{"role": "user", "content": "word " * 2100}])
    error = await handle.complete.remote(too_long)
    assert isinstance(error, InvalidRequestError) and error.code == "context_length_exceeded"
