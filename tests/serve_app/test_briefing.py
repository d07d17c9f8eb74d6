"""Brief-then-expand: its settings, the request's mode, the cap and the instruction (no cluster)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve_app.brief_config import DEFAULT_EXPAND_INSTRUCTION, DEFAULT_INSTRUCTION, BriefConfig
from serve_app.briefing import Brief, capped, with_instruction
from serve_app.config import GatewayConfig
from serve_app.errors import InvalidRequestError
from serve_app.protocol import ChatCompletionRequest

MODELS = [{"name": "echo", "engine": "remote", "engine_params": {"base_url": "http://x/v1", "model": "m"}}]


def request(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "echo", "messages": [{"role": "user", "content": "Hi"}],
                                                 **fields})


def test_defaults_and_the_gateway_config_take_brief() -> None:
    config = BriefConfig()
    assert config.enabled and config.max_tokens == 96
    assert config.instruction == DEFAULT_INSTRUCTION and config.expand_instruction == DEFAULT_EXPAND_INSTRUCTION
    gateway = GatewayConfig.model_validate({"models": MODELS, "brief": {"max_tokens": 64, "instruction": " Short. "}})
    assert gateway.brief.max_tokens == 64 and gateway.brief.instruction == "Short."


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": 10_000}, {"instruction": "  "},
                                 {"expand_instruction": ""}, {"instruction": "x" * 4001}, {"max_token": 5}])
def test_bad_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        BriefConfig.model_validate(bad)
    with pytest.raises(ValidationError):
        GatewayConfig.model_validate({"models": MODELS, "brief": bad})


def test_the_cap_keeps_a_smaller_budget_and_the_clients_field() -> None:
    assert capped(request(), 96).max_tokens == 96
    assert capped(request(max_tokens=20), 96).max_tokens == 20
    assert capped(request(max_tokens=500), 96).max_tokens == 96
    both = capped(request(max_completion_tokens=500, max_tokens=600), 96)
    assert both.max_output_tokens(256) == 96


def test_the_instruction_follows_the_leading_system_messages() -> None:
    body = ChatCompletionRequest.model_validate({"model": "echo", "messages": [
        {"role": "system", "content": "Tutor."}, {"role": "user", "content": "Q"}]})
    assert [m.text() for m in with_instruction(body, "Be short.").messages] == ["Tutor.", "Be short.", "Q"]
    assert [m.role for m in with_instruction(request(), "Be short.").messages] == ["system", "user"]


def test_the_mode_comes_from_the_body_or_the_header() -> None:
    config = BriefConfig()
    assert Brief.of(request(), {}, config)[1].mode is None
    body, brief = Brief.of(request(), {"x-raygate-brief": "1"}, config)
    assert brief.mode == "brief" and body.max_tokens == 96 and not body.brief
    assert Brief.of(request(brief=True), {}, config)[1].mode == "brief"
    assert Brief.of(request(), {"x-raygate-brief": "0"}, config)[1].mode is None
    body, brief = Brief.of(request(expand=True, conversation_id="c1", messages=[]), {"x-raygate-brief": "1"}, config)
    assert (brief.mode, brief.conversation_id) == ("expand", "c1")
    assert [m.text() for m in body.messages] == [DEFAULT_EXPAND_INSTRUCTION] and body.max_tokens is None
    with pytest.raises(InvalidRequestError):
        Brief.of(request(brief=True), {}, BriefConfig(enabled=False))


def test_the_handle() -> None:
    assert Brief().extension({"citations": []}) == {"citations": []}
    handle = Brief("brief", "conv_1").extension({"citations": []})
    assert handle is not None and handle["brief"] is True and handle["citations"] == []
    assert handle["expand"]["conversation_id"] == "conv_1"
    assert Brief("expand", "conv_1").extension(None) == {"brief": False, "conversation_id": "conv_1"}


@pytest.mark.parametrize("fields,param", [({"messages": []}, "messages"),
                                          ({"messages": [], "expand": True}, "conversation_id"),
                                          ({"expand": True, "brief": True, "conversation_id": "c"}, "expand")])
def test_messages_may_be_empty_only_to_expand(fields: dict[str, object], param: str) -> None:
    with pytest.raises(ValidationError) as info:
        request(**fields)
    assert info.value.errors()[0]["loc"] == (param,)
