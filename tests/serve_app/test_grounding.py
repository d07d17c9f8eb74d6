"""Grounding a chat request: where the sources go, what is cited, what the retriever is asked."""

from __future__ import annotations

import pytest

from deployments.retriever_protocol import SearchHit
from serve_app.errors import InvalidRequestError
from serve_app.grounding import Grounding, grounded, query_of
from serve_app.protocol import ChatCompletionRequest

HITS = [SearchHit(index=1, document_id="light", chunk=0, score=0.8, text="Hens need 16 h of light.",
                  heading="Lighting", metadata={"lang": "en"}),
        SearchHit(index=2, document_id="mites", chunk=3, score=0.5, text="Mites bite at night.")]


def request(*messages: tuple[str, str]) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "rag": {"collection": "farm"},
                                                 "messages": [{"role": r, "content": c} for r, c in messages]})


def test_sources_join_the_existing_system_message() -> None:
    body = grounded(request(("system", "Be brief."), ("user", "Light?")), HITS)
    system = body.messages[0].text()
    assert system.startswith("Be brief.") and "Cite each source" in system
    assert "[1] (light) Lighting: Hens need 16 h of light." in system and "[2] (mites) Mites bite" in system
    assert body.rag is None and body.messages[1].text() == "Light?"


def test_a_system_message_is_added_when_there_is_none_and_none_without_hits() -> None:
    assert grounded(request(("user", "Light?")), HITS).messages[0].role == "system"
    assert [m.role for m in grounded(request(("user", "Light?")), []).messages] == ["user"]


def test_the_query_is_the_last_user_turn() -> None:
    assert query_of(request(("user", "first"), ("assistant", "a"), ("user", "second"))) == "second"
    with pytest.raises(InvalidRequestError):
        query_of(request(("system", "only a system prompt")))


def test_citations_and_ledger_fields() -> None:
    grounding = Grounding(HITS, 0.0123)
    assert grounding.chunk_ids == "light#0,mites#3" and round(grounding.ms, 1) == 12.3
    assert grounding.extension()["citations"][0] == {"index": 1, "document_id": "light", "chunk": 0, "score": 0.8,
                                                     "metadata": {"lang": "en"}}
