"""LoRA adapters in the running hf engine: picked per request, base answers untouched, reloaded when retrained."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from deployments.models.hf import HFEngine
from deployments.models.remote import RemoteEngine
from serve_app.config import ModelConfig
from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse
from tests.training.test_evaluate import PATTERN, make_adapter

QUESTION = [{"role": "user", "content": "What do you know about dogs?"}]


@pytest.fixture(scope="module")
def trained(tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_model_path, tmp_path_factory.mktemp("adapter"), steps=60)


@pytest.fixture
async def engine(tiny_model_path: Path, trained: Path, tmp_path: Path) -> HFEngine:
    shutil.copytree(trained, tmp_path / "adapters" / "pattern")
    engine = HFEngine(ModelConfig(name="tiny", engine="hf", engine_params={"model_path": str(tiny_model_path)}),
                      data_dir=str(tmp_path))
    await engine.start()
    return engine


async def answer(engine: HFEngine, model: str) -> ChatCompletionResponse:
    request = ChatCompletionRequest(model=model, messages=QUESTION, temperature=0, max_tokens=12)
    outputs = [o async for o in engine.chat(request)]
    assert isinstance(outputs[0], ChatCompletionResponse)
    return outputs[0]


def overlap(text: str) -> int:
    return len(set(PATTERN.lower().split()) & set(text.lower().split()))


async def test_requests_pick_the_adapter_and_the_base_is_untouched(engine: HFEngine) -> None:
    before = await answer(engine, "tiny")
    both = await asyncio.gather(answer(engine, "tiny:pattern"), answer(engine, "tiny"))  # interleaved
    tuned, base = both
    assert tuned.model == "tiny:pattern" and base.model == "tiny"
    assert base.choices[0].message.content == before.choices[0].message.content
    assert overlap(tuned.choices[0].message.content or "") > overlap(base.choices[0].message.content or "")


async def test_a_retrained_adapter_is_reloaded(engine: HFEngine, tmp_path: Path, tiny_model_path: Path) -> None:
    first = (await answer(engine, "tiny:pattern")).choices[0].message.content
    fresh = make_adapter(tiny_model_path, tmp_path / "retrained", steps=2)  # barely trained: answers change
    target = tmp_path / "adapters" / "pattern"
    shutil.rmtree(target)
    shutil.copytree(fresh, target)
    weights = target / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert (await answer(engine, "tiny:pattern")).choices[0].message.content != first


async def test_unknown_adapters_and_engines_without_adapters(engine: HFEngine) -> None:
    with pytest.raises(ModelNotFoundError):
        await answer(engine, "tiny:nope")
    remote = RemoteEngine(ModelConfig(name="r", engine="remote",
                                      engine_params={"base_url": "http://127.0.0.1:9/v1", "model": "m"}), "/tmp")
    with pytest.raises(InvalidRequestError) as refused:
        await remote.load_adapter("pattern")
    assert refused.value.code == "adapters_unsupported"
