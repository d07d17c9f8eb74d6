"""Which models may see images: config validation, the gateway's check, the local engines' refusal."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from pydantic import ValidationError

from deployments.cost_guard_protocol import ReserveDecision
from deployments.models.base import encode_chat
from serve_app.config import GatewayConfig, ModelConfig
from serve_app.errors import InvalidRequestError
from serve_app.protocol import ChatCompletionRequest
from serve_app.vision import check_images, downgrade_refused, vision_capable

REMOTE = {"base_url": "http://127.0.0.1:1/v1", "model": "up"}


def model(name: str = "m", *, vision: bool = False, engine: str = "remote", **fields: Any) -> ModelConfig:
    params = REMOTE if engine == "remote" else {}
    return ModelConfig.model_validate({"name": name, "engine": engine, "engine_params": params, "vision": vision,
                                       **fields})


def request(*images: str) -> ChatCompletionRequest:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "look"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": parts}]})


def data_url(n_bytes: int) -> str:
    return "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(n_bytes - 4)).decode()


def test_vision_defaults_off_and_is_refused_for_local_engines() -> None:
    assert model().vision is False and model(vision=True).vision is True
    for engine in ("hf", "vllm"):
        with pytest.raises(ValidationError, match=f"the {engine} engine serves text-only models"):
            model("local", vision=True, engine=engine)
        assert model("local", engine=engine).vision is False
    with pytest.raises(ValidationError, match="models.local.vision"):
        GatewayConfig.model_validate({"models": [{"name": "local", "engine": "hf", "vision": True}]})


def test_a_text_only_model_gets_no_images() -> None:
    check_images(request(), model(), 10)  # no images: nothing to check
    with pytest.raises(InvalidRequestError) as info:
        check_images(request("https://x.example/a.png"), model("plain"), 10)
    assert (info.value.code, info.value.param, info.value.status_code) == ("model_not_vision_capable", "messages", 400)
    assert "plain" in info.value.message


def test_data_urls_over_the_cap_are_refused_by_part() -> None:
    vision = model(vision=True)
    check_images(request("https://x.example/a.png", data_url(100)), vision, 100)  # at the cap: fine
    with pytest.raises(InvalidRequestError) as info:
        check_images(request("https://x.example/a.png", data_url(101)), vision, 100)
    assert info.value.code == "image_too_large" and info.value.param == "messages.0.content.2.image_url.url"
    assert request(data_url(101)).images()[0].data_bytes() == 101


def test_vision_capable_and_the_downgrade_refusal() -> None:
    png = data_url(8)
    assert vision_capable(request(), model()) and vision_capable(request(png), model(vision=True))
    assert not vision_capable(request(png), model())
    decision = ReserveDecision(outcome="downgrade", request_id="r", requested_model="big", model="small",
                               max_tokens=10, limit="plan daily quota")
    error = downgrade_refused(decision, model("small"))
    assert error.status_code == 429 and error.code == "insufficient_quota"
    assert "'big'" in error.message and "'small'" in error.message and "plan daily quota" in error.message


def test_local_engines_refuse_images_rather_than_drop_them() -> None:
    with pytest.raises(InvalidRequestError) as info:
        encode_chat(object(), request(data_url(8)), 2048, "tiny")
    assert info.value.code == "model_not_vision_capable"
