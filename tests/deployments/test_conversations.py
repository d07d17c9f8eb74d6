"""Conversations and users' memory in a real Ledger (SQLite in a tmp dir), through ``Ledger.store``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from deployments.conversations import Conversation, Deleted
from deployments.ledger import Ledger
from deployments.memory import Memory
from serve_app.config import LedgerConfig
from serve_app.errors import InvalidRequestError, NotFoundError

SECRET = "conversation-secret-91c2"


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(LedgerConfig(), str(tmp_path))


async def test_create_get_append_in_order(ledger: Ledger) -> None:
    created: Conversation = await ledger.store("conversations.create", "acme", "ann", {"topic": "maths"},
                                               [{"role": "system", "content": "Be brief."}, user("2+2?"),
                                                assistant("4")], 100)
    assert created.id.startswith("conv_") and created.metadata == {"topic": "maths"}
    assert created.public(with_messages=False) == {"id": created.id, "object": "conversation",
                                                   "created_at": int(created.created_at), "metadata": {"topic": "maths"}}
    assert [m.pinned for m in created.messages] == [True, False, False]
    await ledger.store("conversations.append", "acme", "ann", created.id, [user("3+3?"), assistant("6")], 100)
    got: Conversation = await ledger.store("conversations.get", "acme", "ann", created.id)
    assert [m.message["content"] for m in got.messages] == ["Be brief.", "2+2?", "4", "3+3?", "6"]
    assert [m.seq for m in got.messages] == [1, 2, 3, 4, 5]
    assert got.public()["messages"][3] == user("3+3?")


async def test_trimming_deletes_the_oldest_unpinned_messages(ledger: Ledger) -> None:
    conversation: Conversation = await ledger.store("conversations.create", "acme", "ann", {},
                                                    [{"role": "system", "content": "pinned"}, user("q1"),
                                                     assistant("a1")], 5)
    deleted = await ledger.store("conversations.append", "acme", "ann", conversation.id,
                                 [user("q2"), assistant("a2"), user("q3"), assistant("a3")], 5)
    assert deleted == 2
    got: Conversation = await ledger.store("conversations.get", "acme", "ann", conversation.id)
    assert [m.message["content"] for m in got.messages] == ["pinned", "q2", "a2", "q3", "a3"]
    assert [m.seq for m in got.messages] == [1, 4, 5, 6, 7]  # numbers are never reused
    # One over: q2 goes, and its answer with it, so the kept history opens on a question.
    assert await ledger.store("conversations.append", "acme", "ann", conversation.id, [user("q4")], 5) == 2
    got = await ledger.store("conversations.get", "acme", "ann", conversation.id)
    assert [m.message["content"] for m in got.messages] == ["pinned", "q3", "a3", "q4"]
    with pytest.raises(InvalidRequestError) as too_many:
        await ledger.store("conversations.create", "acme", "ann", {}, [user(str(i)) for i in range(6)], 5)
    assert too_many.value.code == "too_many_messages"


async def test_a_summary_is_kept_only_when_it_covers_more(ledger: Ledger) -> None:
    conversation: Conversation = await ledger.store("conversations.create", "acme", "ann", {},
                                                    [user("q1"), assistant("a1"), user("q2")], 10)
    assert await ledger.store("conversations.save_summary", "acme", "ann", conversation.id, "s2", 2)
    assert not await ledger.store("conversations.save_summary", "acme", "ann", conversation.id, "s1", 1)
    assert not await ledger.store("conversations.save_summary", "acme", "bob", conversation.id, "s3", 3)
    got: Conversation = await ledger.store("conversations.get", "acme", "ann", conversation.id)
    assert (got.summary, got.summary_upto) == ("s2", 2)
    assert got.public()["summary"] == "s2"


async def test_only_the_owner_reaches_a_conversation(ledger: Ledger) -> None:
    conversation: Conversation = await ledger.store("conversations.create", "acme", "ann", {}, [user("hi")], 10)
    for tenant, name in (("acme", "bob"), ("globex", "ann")):
        for operation, args in (("get", ()), ("delete", ())):
            with pytest.raises(NotFoundError) as missing:
                await ledger.store(f"conversations.{operation}", tenant, name, conversation.id, *args)
            assert missing.value.status_code == 404 and missing.value.code == "conversation_not_found"
        assert await ledger.store("conversations.append", tenant, name, conversation.id, [user("x")], 10) == 0
    assert len((await ledger.store("conversations.get", "acme", "ann", conversation.id)).messages) == 1
    deleted: Deleted = await ledger.store("conversations.delete", "acme", "ann", conversation.id)
    assert deleted.model_dump() == {"id": conversation.id, "object": "conversation.deleted", "deleted": True}
    with pytest.raises(NotFoundError):
        await ledger.store("conversations.get", "acme", "ann", conversation.id)
    assert await ledger.store("conversations.append", "acme", "ann", conversation.id, [user("late")], 10) == 0


async def test_memory_put_patch_and_limits(ledger: Ledger) -> None:
    assert (await ledger.store("memory.get", "acme", "ann")).memory == {}
    put: Memory = await ledger.store("memory.put", "acme", "ann", {"level_math": "CM2", "likes": ["hens"],
                                                                   "gone": None}, 4, 200)
    assert put.memory == {"level_math": "CM2", "likes": ["hens"]}
    patched: Memory = await ledger.store("memory.patch", "acme", "ann", {"likes": None, "lang": "fr"}, 4, 200)
    assert patched.memory == {"level_math": "CM2", "lang": "fr"}
    assert (await ledger.store("memory.get", "acme", "ann")).memory == {"level_math": "CM2", "lang": "fr"}
    assert (await ledger.store("memory.get", "acme", "bob")).memory == {}
    for changes, code in (({f"k{i}": i for i in range(5)}, "memory_too_large"), ({"big": "x" * 200}, "memory_too_large"),
                          ({"": 1}, "invalid_memory"), ({"n": float("nan")}, "invalid_memory"),
                          ({"s": "\ud800"}, "invalid_memory")):
        with pytest.raises(InvalidRequestError) as refused:
            await ledger.store("memory.patch", "acme", "ann", changes, 4, 200)
        assert refused.value.code == code and refused.value.param == "memory"
    assert (await ledger.store("memory.get", "acme", "ann")).memory == {"level_math": "CM2", "lang": "fr"}
    assert (await ledger.store("memory.put", "acme", "ann", {}, 4, 200)).memory == {}


def database_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.glob("ledger.sqlite3*"))


async def test_export_and_erasure_include_conversations_and_memory(ledger: Ledger, tmp_path: Path) -> None:
    mine: Conversation = await ledger.store("conversations.create", "acme", "ann", {"k": "v"},
                                            [user(f"my {SECRET}")], 10)
    await ledger.store("conversations.append", "acme", "ann", mine.id, [user("more"), assistant(f"re {SECRET}")], 10)
    await ledger.store("conversations.save_summary", "acme", "ann", mine.id, f"about {SECRET}", 1)
    await ledger.store("conversations.create", "globex", "ann", {}, [user("elsewhere")], 10)
    await ledger.store("conversations.create", "acme", "bob", {}, [user("bob-keeps-this")], 10)
    await ledger.store("memory.put", "acme", "ann", {"secret": SECRET}, 64, 16384)
    await ledger.store("memory.put", "acme", "bob", {"bob": "bob-keeps-this-too"}, 64, 16384)

    export = await ledger.export_user("acme", "ann", "admin-key")
    [conversation] = export["conversations"]
    assert conversation["id"] == mine.id and conversation["tenant"] == "acme" and conversation["metadata"] == {"k": "v"}
    assert [m["content"] for m in conversation["messages"]] == [f"my {SECRET}", "more", f"re {SECRET}"]
    assert conversation["summary"] == f"about {SECRET}" and "created_at" in conversation["messages"][0]
    assert export["memory"] == [{"tenant": "acme", "memory": {"secret": SECRET},
                                 "updated_at": export["memory"][0]["updated_at"]}]
    assert len((await ledger.export_user(None, "ann", "admin-key"))["conversations"]) == 2  # every tenant

    assert SECRET.encode() in database_bytes(tmp_path)
    counts = await ledger.erase_user("acme", "ann", "admin-key")
    assert counts["conversations"] == 1 and counts["conversation_messages"] == 3 and counts["memory"] == 1
    assert SECRET.encode() not in database_bytes(tmp_path)
    assert b"bob-keeps-this" in database_bytes(tmp_path) and b"bob-keeps-this-too" in database_bytes(tmp_path)
    after = await ledger.export_user("acme", "ann", "admin-key")
    assert after["conversations"] == [] and after["memory"] == []
    with pytest.raises(NotFoundError):
        await ledger.store("conversations.get", "acme", "ann", mine.id)
    assert len((await ledger.export_user("globex", "ann", "admin-key"))["conversations"]) == 1
