"""Image content parts through the gateway: forwarded to vision models, refused for the others, cached apart."""

from __future__ import annotations

import base64
import struct
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fake_common import IMAGE_TOKENS
from tests.integration.conftest import Deployed, ledger_row

pytestmark = pytest.mark.integration

IMAGE_HTTPS = "https://images.example.com/hen.jpg"


def png(rgb: tuple[int, int, int]) -> str:
    """A real 1x1 PNG of one colour, as a data URL."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\x00" + bytes(rgb))) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(raw).decode()


RED, BLUE = png((255, 0, 0)), png((0, 0, 255))


def image(url: str, detail: str | None = None) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **({"detail": detail} if detail else {})}}


def user(text: str, *images: dict[str, Any]) -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text}, *images]}


def chat(deployed: Deployed, model: str, messages: list[dict[str, Any]], **fields: Any) -> httpx.Response:
    return httpx.post(f"{deployed.base_url}/v1/chat/completions", json={"model": model, "messages": messages,
                                                                          **fields},
                      headers={"Authorization": f"Bearer {deployed.api_key}"}, timeout=30)


def error_of(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    return error


@pytest.fixture
def flaky(deployed: Deployed) -> Iterator[Deployed]:
    deployed.flaky.reset()
    yield deployed
    deployed.flaky.reset()


def test_image_parts_reach_an_openai_upstream_unchanged(deployed: Deployed) -> None:
    messages = [{"role": "system", "content": "describe briefly"},
                user("what breed is this hen", image(RED, "low"), image(IMAGE_HTTPS, "high"))]
    response = chat(deployed, "vision-echo", messages)
    assert response.status_code == 200, response.text
    assert response.headers["x-raygate-model"] == "vision-echo"
    body = deployed.upstream.last_body
    assert body is not None and body["model"] == "fake-vision"
    assert body["messages"] == messages  # the parts exactly as the client sent them
    # Usage is the provider's: the fake counts 7 words and IMAGE_TOKENS an image.
    assert response.json()["usage"]["prompt_tokens"] == 7 + 2 * IMAGE_TOKENS
    row = ledger_row(deployed, response.headers["x-request-id"])
    assert row["prompt_tokens"] == 7 + 2 * IMAGE_TOKENS


def test_openai_sdk_stream_with_an_image(deployed: Deployed) -> None:
    client = openai.OpenAI(base_url=f"{deployed.base_url}/v1", api_key=deployed.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model="vision-echo", messages=[user("what is this", image(BLUE))],  # type: ignore[list-item]
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3 + IMAGE_TOKENS
    assert deployed.upstream.last_body is not None
    assert deployed.upstream.last_body["messages"][0]["content"][1] == image(BLUE)


def test_image_parts_are_translated_for_anthropic(deployed: Deployed) -> None:
    messages = [{"role": "system", "content": "be brief"},
                user("compare these", image(RED, "high"), image(IMAGE_HTTPS)),
                {"role": "assistant", "content": "one is red"},
                {"role": "user", "content": [image(BLUE)]}]
    response = chat(deployed, "vision-claude", messages)
    assert response.status_code == 200, response.text
    body = deployed.upstream.last_body
    assert body is not None and deployed.upstream.last_path == "/v1/messages"
    assert body["system"] == "be brief"
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "compare these"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": RED.split(",", 1)[1]}},
            {"type": "image", "source": {"type": "url", "url": IMAGE_HTTPS}},
        ]},
        {"role": "assistant", "content": "one is red"},
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": BLUE.split(",", 1)[1]}},
        ]},
    ]
    # Anthropic's input_tokens as the fake reports them: 7 words (system included) and 3 images.
    assert response.json()["usage"]["prompt_tokens"] == 7 + 3 * IMAGE_TOKENS


@pytest.mark.parametrize("model", ["echo", "tiny", "claude"])
def test_a_text_only_model_refuses_images_before_any_call(deployed: Deployed, model: str) -> None:
    calls = deployed.upstream.request_count
    error = error_of(chat(deployed, model, [user("what is this", image(RED))]))
    assert error["code"] == "model_not_vision_capable" and error["param"] == "messages"
    assert model in error["message"]
    assert deployed.upstream.request_count == calls
    # Nothing is left reserved (earlier tests' reservations settle off their clients' paths).
    deadline = time.monotonic() + 10
    while httpx.get(f"{deployed.base_url}/v1/usage",
                    headers={"Authorization": f"Bearer {deployed.api_key}"}).json()["reserved_tokens"]:
        assert time.monotonic() < deadline, "a reservation was left behind"
        time.sleep(0.1)


@pytest.mark.parametrize("url", [
    "ftp://images.example.com/hen.png",
    "data:text/html;base64,PGgxPmhpPC9oMT4=",
    "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
    "data:image/png;base64,not base64!",
    "data:image/png;base64,",
    "javascript:alert(1)",
    "https://",
])
def test_bad_image_urls_are_a_400_naming_the_part(deployed: Deployed, url: str) -> None:
    error = error_of(chat(deployed, "vision-echo", [user("look", image(url))]))
    assert error["param"] == "messages.0.content.1.image_url.url"


def test_an_unknown_detail_is_a_400(deployed: Deployed) -> None:
    error = error_of(chat(deployed, "vision-echo", [user("look", image(RED, "ultra"))]))
    assert error["param"] == "messages.0.content.1.image_url.detail"


@pytest.mark.parametrize("role", ["assistant", "system", "developer"])
def test_images_outside_user_messages_are_a_400(deployed: Deployed, role: str) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": role, "content": [image(RED)]}]
    error = error_of(chat(deployed, "vision-echo", messages))
    assert error["param"] == "messages.1.content" and "only allowed in user messages" in error["message"]


def test_an_image_over_the_size_cap_is_a_400(deployed: Deployed) -> None:
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(20_000)).decode()  # cap: 16384
    error = error_of(chat(deployed, "vision-echo", [user("look", image(big))]))
    assert error["code"] == "image_too_large" and error["param"] == "messages.0.content.1.image_url.url"


def until_cached(deployed: Deployed, messages: list[dict[str, Any]], status: str = "hit") -> httpx.Response:
    """Ask until the answer comes from the cache (stores happen off the client's path)."""
    deadline = time.monotonic() + 20
    while (response := chat(deployed, "vision-echo", messages, temperature=0)).headers["x-raygate-cache"] != status:
        assert time.monotonic() < deadline, f"never a {status}: {response.headers.get('x-raygate-cache')}"
    return response


def test_different_images_do_not_share_a_cached_answer(deployed: Deployed) -> None:
    question = f"What colour is this square {uuid.uuid4().hex[:8]}?"
    assert chat(deployed, "vision-echo", [user(question, image(RED))], temperature=0).headers[
        "x-raygate-cache"] == "miss"
    until_cached(deployed, [user(question, image(RED))])
    calls = deployed.upstream.request_count
    for other in ([user(question, image(BLUE))], [user(question, image(RED, "high"))],
                  [user(question, image(RED), image(BLUE))], [user(question)]):
        assert chat(deployed, "vision-echo", other, temperature=0).headers["x-raygate-cache"] == "miss"
    assert deployed.upstream.request_count == calls + 4


def test_an_image_request_is_never_a_text_neighbours_semantic_hit(deployed: Deployed) -> None:
    question = f"What is the melting point of alloy {uuid.uuid4().hex[:8]}?"
    chat(deployed, "vision-echo", [{"role": "user", "content": question}], temperature=0)
    until_cached(deployed, [{"role": "user", "content": question}])
    reworded = "Hi, could you please tell me " + question.lower()
    until_cached(deployed, [{"role": "user", "content": reworded}], "semantic-hit")  # the neighbour is indexed
    with_image = chat(deployed, "vision-echo", [user(reworded, image(RED))], temperature=0)
    assert with_image.headers["x-raygate-cache"] == "miss"
    # Not even the same text with the image: the exact key hashes the image.
    assert chat(deployed, "vision-echo", [user(question, image(RED))],
                temperature=0).headers["x-raygate-cache"] == "miss"


def test_a_text_only_fallback_is_skipped_for_images(flaky: Deployed) -> None:
    flaky.flaky.fail(500, times=1)
    response = chat(flaky, "vision-flaky", [user("what is this", image(RED))])
    assert response.status_code == 200, response.text
    # vision-flaky failed; echo (first fallback, text-only) was skipped; vision-echo answered.
    assert response.headers["x-raygate-model"] == "vision-echo"
    assert response.headers["x-raygate-attempts"] == "2" and response.headers["x-raygate-fallback"] == "true"
    request_id = response.headers["x-request-id"]
    ledger_row(flaky, request_id)
    attempts = httpx.get(f"{flaky.base_url}/admin/requests/{request_id}/attempts",
                         headers={"Authorization": f"Bearer {flaky.admin_key}"}).json()
    assert [a["model"] for a in attempts] == ["vision-flaky", "vision-echo"]
    assert [a["status"] for a in attempts] == [503, 200]  # the upstream's 500, as raygate records it
    # Text only, the same failure falls back to echo, the first fallback.
    flaky.flaky.fail(500, times=1)
    text = chat(flaky, "vision-flaky", [{"role": "user", "content": "hello"}])
    assert text.status_code == 200 and text.headers["x-raygate-model"] == "echo"
