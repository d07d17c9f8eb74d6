"""OpenAI request schemas: tolerant of unknown fields, strict on values."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.protocol import ChatCompletionRequest, EmbeddingRequest

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
