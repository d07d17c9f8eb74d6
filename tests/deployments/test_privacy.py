"""The ledger's personal data: content only with consent, a complete export, an erasure that leaves nothing."""

from __future__ import annotations

from pathlib import Path

from deployments.ledger import FeedbackRecord, Ledger, RequestRecord
from deployments.privacy import Content, pseudonym
from serve_app.config import LedgerConfig

SECRET = "my-secret-diagnosis-7f3a"


def row(i: int, user: str = "ann", tenant: str = "acme", text: str = SECRET) -> RequestRecord:
    return RequestRecord(id=f"r{i}-{user}", created_at=1000.0 + i, tenant=tenant, user=user, key_id=f"k-{user}",
                         requested_model="m", model="m", prompt_tokens=10, completion_tokens=5, cost_usd=0.01,
                         content=Content(messages=[{"role": "user", "content": f"{text} question {i}"}],
                                         answer=f"answer about {text}"))


def database_bytes(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in path.glob("ledger.sqlite3*"))


async def test_content_is_kept_only_with_consent(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    await ledger.record([row(1)])
    assert (await ledger.export_user("acme", "ann", "admin-key"))["messages"] == []
    await ledger.set_consent("acme", "ann", True, "admin-key")
    await ledger.record([row(2)])
    export = await ledger.export_user("acme", "ann", "admin-key")
    assert [m["request_id"] for m in export["messages"]] == ["r2-ann"]
    assert export["messages"][0]["answer"] == f"answer about {SECRET}"
    assert len(export["requests"]) == 2  # usage is kept either way
    always = Ledger(LedgerConfig(db_file="other.sqlite3", default_consent=True), str(tmp_path))
    await always.record([row(3, user="bob")])
    assert len((await always.export_user(None, "bob", "admin-key"))["messages"]) == 1


async def test_export_is_complete_and_scoped(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(default_consent=True), str(tmp_path))
    await ledger.record([row(1), row(2), row(3, user="bob"), row(4, tenant="globex")])
    await ledger.record_feedback(FeedbackRecord(request_id="r1-ann", key_id="k-ann", rating=2, comment="too vague"))
    export = await ledger.export_user("acme", "ann", "admin-key")
    assert [r["id"] for r in export["requests"]] == ["r1-ann", "r2-ann"]
    assert len(export["messages"]) == 2 and export["feedback"][0]["comment"] == "too vague"
    assert export["usage"] == {"requests": 2, "prompt_tokens": 20, "completion_tokens": 10, "cost_usd": 0.02}
    assert len((await ledger.export_user(None, "ann", "admin-key"))["requests"]) == 3  # every tenant


async def test_erasure_leaves_no_content_anywhere_in_the_file(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(default_consent=True), str(tmp_path))
    await ledger.record([row(i) for i in range(20)] + [row(1, user="bob", text="bob-keeps-this")])
    await ledger.record_feedback(FeedbackRecord(request_id="r1-ann", key_id="k-ann", thumbs="down",
                                                comment=f"about {SECRET}"))
    assert SECRET.encode() in database_bytes(tmp_path)
    counts = await ledger.erase_user("acme", "ann", "admin-key")
    assert counts == {"messages": 20, "feedback_comments": 1, "consent": 0, "conversations": 0,
                      "conversation_messages": 0, "memory": 0, "files": 0, "batches": 0, "batch_items": 0,
                      "requests_pseudonymised": 20}
    assert SECRET.encode() not in database_bytes(tmp_path)
    assert b"bob-keeps-this" in database_bytes(tmp_path)
    export = await ledger.export_user("acme", "ann", "admin-key")
    assert export["requests"] == export["messages"] == export["feedback"] == []
    rows = await ledger.list_requests(limit=100)
    assert sum(r.user == pseudonym("acme", "ann") for r in rows) == 20  # usage survives, pseudonymised
    feedback = await ledger.get_feedback("r1-ann")
    assert feedback is not None and feedback.thumbs == "down" and feedback.comment is None
    audit = await ledger.audit_log()
    assert [(e.action, e.actor) for e in audit][:2] == [("export", "admin-key"), ("erase", "admin-key")]
    assert audit[1].detail["messages"] == 20
