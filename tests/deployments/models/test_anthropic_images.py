"""AnthropicEngine with images: OpenAI image parts become Anthropic image blocks, and are priced."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from deployments.models.anthropic import AnthropicEngine, translate_messages
from deployments.models.tokens import count_prompt_tokens
from serve_app.protocol import IMAGE_PROMPT_TOKENS, ChatMessage
from tests.deployments.models.test_anthropic import UPSTREAM_MODEL, answer, engine, make_request, upstream
from tests.fake_common import IMAGE_TOKENS
from tests.fake_upstream import FakeUpstream

__all__ = ["engine", "upstream"]  # the fixtures, shared with test_anthropic.py

PNG_DATA = "iVBORw0KGgo="


def image(url: str, **image: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **image}}


@pytest.mark.parametrize("stream", [False, True])
async def test_image_parts_become_image_blocks(engine: AnthropicEngine, upstream: FakeUpstream, stream: bool) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "compare"}, image(f"data:image/PNG;base64,{PNG_DATA}",
                                                                              detail="high"),
                                     {"type": "text", "text": ""}, image("https://x.example/a.jpg")]},
        {"role": "user", "content": [image(f"data:image/webp;base64,{PNG_DATA}")]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    _, _, usage = await answer(engine, make_request(stream, messages))
    assert upstream.last_body is not None
    assert upstream.last_body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "compare"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_DATA}},
            {"type": "image", "source": {"type": "url", "url": "https://x.example/a.jpg"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": PNG_DATA}},
        ]},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    assert not usage.estimated
    assert usage.prompt_tokens == 6 + 3 * IMAGE_TOKENS  # the fake's words (system included) and image price


def test_an_image_only_first_turn_is_a_user_turn() -> None:
    messages = [ChatMessage.model_validate({"role": "user", "content": [image("https://x.example/a.jpg")]})]
    assert translate_messages(messages) == (None, [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x.example/a.jpg"}}]}])


async def test_missing_usage_with_images_adds_the_allowance(engine: AnthropicEngine, upstream: FakeUpstream) -> None:
    upstream.omit_usage()
    request = make_request(False, [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                image("https://x.example/a.jpg")]}])
    _, _, usage = await answer(engine, request)
    assert usage.estimated
    assert usage.prompt_tokens == count_prompt_tokens(request.messages, UPSTREAM_MODEL) + IMAGE_PROMPT_TOKENS


async def test_the_fake_refuses_untranslated_openai_parts(upstream: FakeUpstream) -> None:
    body = {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [image("https://x.example/a")]}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{upstream.base_url}/messages", json=body) as resp:
            assert resp.status == 400
