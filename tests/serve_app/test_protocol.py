"""OpenAI request schemas: tolerant of unknown fields, strict on values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.cache_protocol import CacheScope
from serve_app.api_protocol import EmbeddingRequest
from serve_app.protocol import IMAGE_PROMPT_TOKENS, ChatCompletionRequest, ImageContentPart
from serve_app.spend import estimate_prompt_tokens

USER = [{"role": "user", "content": "hi"}]


def test_unknown_fields_are_kept_not_rejected() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "logit_bias": {"1": 2},
                                                    "parallel_tool_calls": True})
    assert set(request.model_extra or {}) == {"logit_bias", "parallel_tool_calls"}


def test_text_parts_join_into_one_string() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert request.messages[0].text() == "ab"


def test_output_budget_prefers_max_completion_tokens() -> None:
    request = ChatCompletionRequest(model="m", messages=USER, max_tokens=50, max_completion_tokens=3)  # type: ignore[arg-type]
    assert request.max_output_tokens(default=9) == 3
    assert ChatCompletionRequest(model="m", messages=USER).max_output_tokens(default=9) == 9  # type: ignore[arg-type]


@pytest.mark.parametrize("field,value", [("seed", 2**64), ("seed", -(2**63) - 1), ("stop", ["a"] * 5),
                                         ("top_p", 0), ("n", 3), ("max_completion_tokens", 0),
                                         ("max_tokens", 2**31), ("max_completion_tokens", 2**63)])
def test_out_of_range_values_are_rejected(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": USER, field: value})
    assert info.value.errors()[0]["loc"][0] == field


def test_stop_accepts_a_string_or_a_list() -> None:
    assert ChatCompletionRequest(model="m", messages=USER, stop="x").stop_list() == ["x"]  # type: ignore[arg-type]
    assert ChatCompletionRequest(model="m", messages=USER, stop=["x", "y"]).stop_list() == ["x", "y"]  # type: ignore[arg-type]


def test_embedding_inputs_must_not_be_empty() -> None:
    assert EmbeddingRequest(input="a", model="e").inputs() == ["a"]
    with pytest.raises(ValueError):
        EmbeddingRequest(input=["a", ""], model="e").inputs()


LONE_SURROGATE = "a\ud800"  # what json.loads makes of a "\\ud800" escape


@pytest.mark.parametrize("where", ["content", "part", "name", "stop", "user"])
def test_text_with_a_lone_surrogate_is_rejected(where: str) -> None:
    message: dict[str, object] = {"role": "user", "content": "hi"}
    body: dict[str, object] = {"model": "m", "messages": [message]}
    if where == "content":
        message["content"] = LONE_SURROGATE
    elif where == "part":
        message["content"] = [{"type": "text", "text": LONE_SURROGATE}]
    elif where == "name":
        message["name"] = LONE_SURROGATE
    else:
        body[where] = [LONE_SURROGATE] if where == "stop" else LONE_SURROGATE
    with pytest.raises(ValidationError, match="lone surrogate"):
        ChatCompletionRequest.model_validate(body)


def test_paired_surrogates_are_fine() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user",
                                                                                 "content": "\U0001f600"}]})
    assert request.messages[0].text() == "\U0001f600"


def test_embedding_input_with_a_lone_surrogate_is_rejected() -> None:
    with pytest.raises(ValidationError, match="lone surrogate"):
        EmbeddingRequest.model_validate({"model": "m", "input": ["ok", LONE_SURROGATE]})


# --- image content parts (vision) --------------------------------------------------------

PNG_URL = "data:image/png;base64,iVBORw0KGgo="  # the PNG signature: 8 bytes


def image_part(url: str, **image: object) -> dict[str, object]:
    return {"type": "image_url", "image_url": {"url": url, **image}}


def test_user_messages_mix_text_and_image_parts() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a "}, image_part(PNG_URL, detail="low"),
                                     {"type": "text", "text": "b"}, image_part("https://x.example/y.jpg")]}]})
    user = request.messages[1]
    assert isinstance(user.content, list) and isinstance(user.content[1], ImageContentPart)
    assert user.text() == "a b"  # images contribute no text (guard, router, cache, estimates)
    assert [i.url for i in request.images()] == [PNG_URL, "https://x.example/y.jpg"]
    assert [i.detail for i in request.images()] == ["low", None]
    assert request.messages[0].images() == []
    assert request.images()[0].media_type() == "image/png" and request.images()[0].data_bytes() == 8
    assert request.images()[1].media_type() is None and request.images()[1].data_bytes() == 0


def test_image_parts_dump_as_sent() -> None:
    part = image_part("https://x.example/y.jpg", detail="high", vendor_hint=1)
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": [part]}]})
    assert request.model_dump(exclude_unset=True)["messages"][0]["content"] == [part]


@pytest.mark.parametrize("url", [
    "data:image/jpeg;base64,/9j/4AAQ", "data:image/gif;base64,R0lGODlh", "data:image/webp;base64,UklGRg==",
    "DATA:IMAGE/PNG;BASE64,iVBORw0KGgo=", "http://x.example/a.png", "https://x.example/a?b=c#d",
])
def test_accepted_image_urls(url: str) -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [image_part(url)]}]})
    assert request.images()[0].url == url


@pytest.mark.parametrize(("url", "fragment"), [
    ("ftp://x.example/a.png", "http(s) URL"),
    ("file:///etc/passwd", "http(s) URL"),
    ("https://", "http(s) URL"),
    ("x.example/a.png", "http(s) URL"),
    ("data:text/html;base64,PGgxPg==", "data:image/(png|jpeg|gif|webp)"),
    ("data:image/svg+xml;base64,PHN2Zz4=", "data:image/(png|jpeg|gif|webp)"),
    ("data:image/png,rawbytes", "data:image/(png|jpeg|gif|webp)"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64,", "holds no image"),
])
def test_bad_image_urls_name_the_part(url: str, fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "look"}, image_part(url)]}]})
    [error] = info.value.errors()
    assert error["loc"] == ("messages", 0, "content", 1, "image_url", "url")
    assert fragment in error["msg"]


@pytest.mark.parametrize("role", ["system", "developer", "assistant", "tool"])
def test_images_only_in_user_messages(role: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [
            {"role": "user", "content": "hi"}, {"role": role, "content": [image_part(PNG_URL)]}]})
    [error] = info.value.errors()
    assert error["loc"] == ("messages", 1, "content") and "only allowed in user messages" in error["msg"]


@pytest.mark.parametrize(("content", "loc", "fragment"), [
    ([{"type": "input_audio", "input_audio": {}}], ("messages", 0, "content"), "'text' or 'image_url'"),
    ([{"type": "image_url"}], ("messages", 0, "content", 0, "image_url"), "Field required"),
    ([image_part(PNG_URL, detail="ultra")], ("messages", 0, "content", 0, "image_url", "detail"), "'auto'"),
    (5, ("messages", 0, "content"), "a string or a list of content parts"),
])
def test_malformed_parts_name_the_field(content: object, loc: tuple[object, ...], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": content}]})
    [error] = info.value.errors()
    assert error["loc"] == loc and fragment in error["msg"]


def _key(content: object) -> str:
    request = ChatCompletionRequest.model_validate({"model": "m", "temperature": 0,
                                                    "messages": [{"role": "user", "content": content}]})
    return CacheScope(tenant="t", model="m").exact_key("p", request)


def test_the_exact_cache_key_hashes_the_images() -> None:
    text = [{"type": "text", "text": "what is it"}]
    keys = {_key(text + [image_part(PNG_URL)]), _key(text + [image_part("data:image/png;base64,iVBORw0KGgq=")]),
            _key(text + [image_part(PNG_URL, detail="low")]), _key([image_part(PNG_URL)] + text),
            _key(text + [image_part(PNG_URL)] * 2), _key(text)}
    assert len(keys) == 6
    assert _key(text) == _key("what is it")  # text-only keys are unchanged by the image support
    assert _key(text + [image_part(PNG_URL)]) == _key([{"type": "text", "text": "what  is it "}, image_part(PNG_URL)])


def test_the_prompt_estimate_adds_an_allowance_per_image() -> None:
    text_only = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    with_images = ChatCompletionRequest.model_validate({"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, image_part(PNG_URL), image_part(PNG_URL)]}]})
    assert estimate_prompt_tokens(with_images) == estimate_prompt_tokens(text_only) + 2 * IMAGE_PROMPT_TOKENS
