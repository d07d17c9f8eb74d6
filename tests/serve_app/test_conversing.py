"""Fitting a stored conversation into a model's window (``serve_app.conversing``), and its config."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from deployments.conversations import Conversation, StoredMessage
from serve_app.config import GatewayConfig
from serve_app.conversing import SUMMARY_PREFIX, message_tokens, plan_history, tokens, transcript
from serve_app.protocol import ChatMessage

PNG = "data:image/png;base64,iVBORw0KGgo="


def text(n_tokens: int) -> str:
    """A text the estimate counts as ``n_tokens`` (UTF-8 bytes / 3 + 4 a message)."""
    return "x" * 3 * (n_tokens - 4)


def conversation(messages: list[dict[str, Any]], pinned: int = 0, summary: str | None = None,
                 upto: int = 0) -> Conversation:
    stored = [StoredMessage(seq=i + 1, pinned=i < pinned, message=m, created_at=0.0) for i, m in enumerate(messages)]
    return Conversation(id="conv_x", tenant="t", user="u", metadata={}, created_at=0.0, summary=summary,
                        summary_upto=upto, messages=stored)


def turns(n: int, size: int = 10) -> list[dict[str, Any]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i}" + text(size)[1:]} for i in range(n)]


def contents(messages: list[ChatMessage]) -> list[str]:
    return [m.text()[:2] for m in messages]


def test_the_estimate_is_the_reservations() -> None:
    assert message_tokens(ChatMessage(role="user", content=text(10))) == 10
    assert message_tokens(ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": PNG}}])) == 769


def test_everything_fits_or_no_window() -> None:
    stored = conversation(turns(6))
    assert len(plan_history(stored, 10, 100, 30, None).kept) == 6  # 60 + 10 + 30 = 100: just fits
    assert len(plan_history(stored, 10, None, 10_000, None).kept) == 6
    edge = plan_history(stored, 10, 99, 30, None)
    assert contents(edge.kept) == ["2x", "3x", "4x", "5x"]  # 5 fit, but a kept history opens on a user turn
    assert [m.seq for m in edge.dropped] == [1, 2] and edge.summary is None


def test_room_is_kept_for_a_summary_and_pinned_messages_always_go() -> None:
    stored = conversation([{"role": "system", "content": text(10)}, *turns(6)], pinned=1)
    plan = plan_history(stored, 10, 110, 30, None)
    assert contents(plan.pinned) == ["xx"] and len(plan.kept) == 6
    with_summary = plan_history(stored, 10, 109, 30, 25)  # 59 left for turns (too few), 25 kept for the summary
    assert contents(with_summary.kept) == ["4x", "5x"] and [m.seq for m in with_summary.dropped] == [2, 3, 4, 5]
    assert with_summary.summary_fits
    no_room = plan_history(stored, 10, 60, 30, 25)
    assert no_room.kept == [] and not no_room.summary_fits


def test_a_stored_summary_stands_for_the_turns_it_covers() -> None:
    stored = conversation(turns(6), summary="earlier", upto=2)
    plan = plan_history(stored, 0, 1000, 0, 25)
    assert contents(plan.kept) == ["2x", "3x", "4x", "5x"] and plan.summary == "earlier"
    assert plan.turns()[0].content == SUMMARY_PREFIX + "earlier"
    assert plan.turns("newer")[0].content == SUMMARY_PREFIX + "newer"
    over = plan_history(stored, 0, 45, 0, 12)
    assert contents(over.kept) == ["4x", "5x"] and [m.seq for m in over.dropped] == [3, 4]


def test_images_in_history_reach_only_vision_models() -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": PNG}}]
    stored = conversation([{"role": "user", "content": parts}])
    assert plan_history(stored, 0, None, 0, None).kept[0].content == "look"
    assert plan_history(stored, 0, None, 0, None, vision=True).kept[0].images()


def test_a_transcript_too_long_for_the_summary_model_loses_its_oldest_turns() -> None:
    stored = conversation(turns(4, size=20)).messages
    full = transcript("before", stored, None)
    assert full.startswith("Earlier summary: before\nuser: 0") and full.count("\n") == 4
    cut = transcript("before", stored, 60)
    assert cut.startswith("Earlier summary: before\nuser: 2") and tokens([ChatMessage(role="user", content=cut)]) < 70


def test_summary_model_must_be_configured() -> None:
    models = [{"name": "a", "engine": "remote", "engine_params": {"base_url": "http://x/v1", "model": "m"},
               "context_window_tokens": 8000}, {"name": "b", "engine": "hf"}]
    config = GatewayConfig.model_validate({"models": models, "conversations": {"summary_model": "a"}})
    assert config.model("a").context_window() == 8000 and config.model("b").context_window() == 2048
    with pytest.raises(ValidationError, match="conversations.summary_model: unknown model 'c'"):
        GatewayConfig.model_validate({"models": models, "conversations": {"summary_model": "c"}})
