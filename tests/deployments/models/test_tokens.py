"""Token counting (tokens.py) and its use by RemoteEngine when an upstream reports no usage."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import tiktoken_ext.openai_public as openai_public  # type: ignore[import-untyped]

from deployments.models import tokens
from deployments.models.remote import RemoteEngine
from deployments.models.tokens import (
    count_prompt_tokens,
    count_text_tokens,
    estimate_usage,
    heuristic_tokens,
    token_counter,
)
from serve_app.config import ModelConfig
from serve_app.protocol import ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, ChatMessage
from tests.fake_common import PHRASE
from tests.fake_upstream import FakeUpstream

# OpenAI cookbook, "How to count tokens with tiktoken": these messages are 129 prompt
# tokens for gpt-3.5-turbo and gpt-4 (cl100k_base) and 124 for gpt-4o (o200k_base).
COOKBOOK_MESSAGES = [
    ChatMessage(role="system", content="You are a helpful, pattern-following assistant that translates corporate "
                                       "jargon into plain English."),
    ChatMessage(role="system", name="example_user", content="New synergies will help drive top-line growth."),
    ChatMessage(role="system", name="example_assistant", content="Things working well together will increase revenue."),
    ChatMessage(role="system", name="example_user", content="Let's circle back when we have more bandwidth to touch "
                                                            "base on opportunities for increased leverage."),
    ChatMessage(role="system", name="example_assistant", content="Let's talk later when we're less busy about how to "
                                                                 "do better."),
    ChatMessage(role="user", content="This late pivot means we don't have time to boil the ocean for the client "
                                     "deliverable."),
]


@pytest.fixture
def fresh_caches() -> Iterator[None]:
    """Forget loaded counters before and after a test that changes how they load."""
    tokens._token_counter.cache_clear()
    tokens._tiktoken_encoding.cache_clear()
    yield
    tokens._token_counter.cache_clear()
    tokens._tiktoken_encoding.cache_clear()


@pytest.mark.parametrize(
    ("model_hint", "method"),
    [
        ("gpt-4o", "tiktoken:o200k_base"),
        ("gpt-4o-mini-2024-07-18", "tiktoken:o200k_base"),
        ("openai/gpt-4.1", "tiktoken:o200k_base"),
        ("o3-mini", "tiktoken:o200k_base"),
        ("gpt-oss-120b", "tiktoken:o200k_base"),  # o200k_harmony: the same ranks
        ("gpt-4", "tiktoken:cl100k_base"),
        ("gpt-3.5-turbo", "tiktoken:cl100k_base"),
        ("text-davinci-003", "heuristic"),  # p50k_base: no offline ranks
        ("claude-sonnet-4-5", "heuristic"),
        ("upstream-model", "heuristic"),
        (None, "heuristic"),
    ],
)
def test_counter_choice(model_hint: str | None, method: str) -> None:
    assert token_counter(model_hint).method == method


@pytest.mark.parametrize("model_hint", ["gpt-4", "gpt-4o"])
def test_tiktoken_documented_counts(model_hint: str) -> None:
    # tiktoken's README and the cookbook: "tiktoken is great!" is 6 tokens in both encodings.
    assert count_text_tokens("tiktoken is great!", model_hint) == 6
    assert count_text_tokens("hello world", model_hint) == 2
    assert count_text_tokens("", model_hint) == 0


@pytest.mark.parametrize(("encoding_name", "ids"), [("cl100k_base", [83, 1609, 5963, 374, 2294, 0]),
                                                     ("o200k_base", [83, 8251, 2488, 382, 2212, 0])])
def test_tiktoken_token_ids_match_openai(encoding_name: str, ids: list[int]) -> None:
    encoding = tokens._tiktoken_encoding(encoding_name)
    assert encoding is not None and encoding.encode("tiktoken is great!") == ids


@pytest.mark.parametrize(("model_hint", "expected"), [("gpt-3.5-turbo", 129), ("gpt-4", 129), ("gpt-4o", 124),
                                                      ("gpt-4o-mini", 124)])
def test_prompt_count_matches_openai_cookbook(model_hint: str, expected: int) -> None:
    assert count_prompt_tokens(COOKBOOK_MESSAGES, model_hint) == expected


def test_special_token_text_is_counted_as_text() -> None:
    # A user who types "<|endoftext|>" sent text; tiktoken's encode() would raise on it.
    assert count_text_tokens("<|endoftext|>", "gpt-4o") > 1


@pytest.mark.parametrize("encoding_name", ["cl100k_base", "o200k_base"])
def test_encoding_definitions_match_tiktoken(encoding_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_load(blobpath: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen["sha256"] = expected_hash
        return {}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    definition = getattr(openai_public, encoding_name)()
    ours = tokens._TIKTOKEN_ENCODINGS[encoding_name]
    assert ours["sha256"] == seen["sha256"]
    assert ours["pat_str"] == definition["pat_str"]
    assert ours["special_tokens"] == definition["special_tokens"]


def test_encoders_load_once() -> None:
    first = token_counter("gpt-4o")
    assert token_counter("gpt-4o") is first
    token_counter("gpt-4.1")
    assert tokens._tiktoken_encoding("o200k_base") is tokens._tiktoken_encoding("o200k_base")
    assert tokens._tiktoken_encoding.cache_info().currsize <= 2  # one per encoding, whatever the hints


def test_missing_offline_ranks_fall_back_to_heuristic(fresh_caches: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "_bundled_ranks_path", lambda name: None)
    assert token_counter("gpt-4o").method == "heuristic"
    assert count_text_tokens("tiktoken is great!", "gpt-4o") == 5  # 18 characters


def test_tampered_ranks_are_refused(fresh_caches: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bogus = tmp_path / "o200k_base.tiktoken.gz"
    bogus.write_bytes(gzip.compress(b"aGVsbG8= 0\n"))
    monkeypatch.setattr(tokens, "_bundled_ranks_path", lambda name: bogus)
    assert tokens._tiktoken_encoding("o200k_base") is None
    assert token_counter("gpt-4o").method == "heuristic"


def test_heuristic_counts() -> None:
    assert [heuristic_tokens(t) for t in ("", "a", "abcd", "abcde", "x" * 400)] == [0, 1, 1, 2, 100]
    messages = [ChatMessage(role="user", content="abcdefgh"), ChatMessage(role="assistant", content="hi", name="bo")]
    # reply priming 3, then per message: 3 + role + content (+ 1 + name)
    assert count_prompt_tokens(messages, None) == 3 + (3 + 1 + 2) + (3 + 3 + 1 + 1 + 1)


def test_hf_tokenizer_counts_like_the_tokenizer(tiny_model_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    hint = str(tiny_model_path)
    assert token_counter(hint).method == f"hf:{tiny_model_path}"
    text = "The quick brown fox jumps over the lazy dog. Bonjour !"
    assert count_text_tokens(text, hint) == len(tokenizer(text, add_special_tokens=False)["input_ids"]) > 0
    messages = [ChatMessage(role="developer", content="be brief"), ChatMessage(role="user", content=text)]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    # As HFEngine counts its prompts: the chat template rendered, then tokenized.
    assert count_prompt_tokens(messages, hint) == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def test_dir_without_tokenizer_is_not_a_model(tmp_path: Path) -> None:
    assert token_counter(str(tmp_path)).method == "heuristic"


async def test_estimate_usage_counts_only_what_is_missing() -> None:
    messages = [ChatMessage(role="user", content="hello world")]
    usage = await estimate_usage(messages, "tiktoken is great!", "gpt-4o")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (3 + (3 + 1 + 2), 6, True)
    usage = await estimate_usage(messages, "tiktoken is great!", "gpt-4o", prompt_tokens=40)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, usage.estimated) == (40, 6, 46, True)


# -- RemoteEngine's no-usage path --------------------------------------------------

UPSTREAM_MODEL = "gpt-4o-mini"
WORDS = 8
EXPECTED_TEXT = " ".join(PHRASE[:WORDS])


@pytest.fixture
async def remote() -> AsyncIterator[tuple[RemoteEngine, FakeUpstream]]:
    fake = FakeUpstream(words=WORDS)
    await fake.start()
    config = ModelConfig.model_validate({
        "name": "remote-test", "engine": "remote",
        "engine_params": {"base_url": fake.base_url, "model": UPSTREAM_MODEL},
    })
    engine = RemoteEngine(config, data_dir="/nonexistent")
    await engine.start()
    yield engine, fake
    await engine.close()
    await fake.stop()


def make_request(stream: bool) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({
        "model": "remote-test", "stream": stream,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there friend"}],
    })


async def final_usage(engine: RemoteEngine, request: ChatCompletionRequest) -> Any:
    outputs = [o async for o in engine.chat(request)]
    if request.stream:
        chunks = [o for o in outputs if isinstance(o, ChatCompletionStreamResponse)]
        assert len(chunks) == len(outputs)
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == EXPECTED_TEXT
        return chunks[-1].usage
    assert isinstance(outputs[0], ChatCompletionResponse)
    return outputs[0].usage


@pytest.mark.parametrize("stream", [False, True])
async def test_remote_missing_usage_is_counted_with_the_tokenizer(
    remote: tuple[RemoteEngine, FakeUpstream], stream: bool
) -> None:
    engine, fake = remote
    fake.omit_usage()
    request = make_request(stream)
    usage = await final_usage(engine, request)
    assert usage.estimated
    assert usage.prompt_tokens == count_prompt_tokens(request.messages, UPSTREAM_MODEL) == 3 + (3 + 1 + 2) + (3 + 1 + 3)
    assert usage.completion_tokens == count_text_tokens(EXPECTED_TEXT, UPSTREAM_MODEL) == WORDS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
async def test_remote_reported_usage_counts_nothing(
    remote: tuple[RemoteEngine, FakeUpstream], stream: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no token counting when the upstream reports usage")

    monkeypatch.setattr("deployments.models.remote.estimate_usage", refuse)
    engine, _ = remote
    usage = await final_usage(engine, make_request(stream))
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (5, WORDS, False)
