"""Files and batch state in a real Ledger (SQLite in a tmp dir), through ``Ledger.store``: ownership,
leases and take-over, results kept once, cancel, expiry, the output files, export and erasure."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from deployments.batches import Batch, Claim, Page
from deployments.files import FileObject
from deployments.ledger import Ledger
from serve_app.config import LedgerConfig
from serve_app.errors import InvalidRequestError, NotFoundError, RateLimitError

DAY = ("24h", 86_400.0)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(LedgerConfig(), str(tmp_path))


def items(n: int) -> list[tuple[int, str, str]]:
    return [(i + 1, f"req-{i + 1}", json.dumps({"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}))
            for i in range(n)]


def result(line: int, ok: bool = True) -> tuple[int, bool, str]:
    return line, ok, json.dumps({"custom_id": f"req-{line}", "response": {"status_code": 200 if ok else 429}})


async def new_batch(ledger: Ledger, n: int = 3, *, user: str = "ann", window: tuple[str, float] = DAY,
                    max_active: int = 10) -> Batch:
    upload: FileObject = await ledger.store("files.create", "acme", user, "batch", "in.jsonl", b"{}\n")
    batch: Batch = await ledger.store("batches.create", "acme", user, "key1", upload.id, "/v1/chat/completions",
                                      window, {"job": "nightly"}, items(n), [], max_active)
    return batch


async def lines(ledger: Ledger, file_id: str | None, user: str = "ann") -> list[dict[str, Any]]:
    assert file_id is not None
    _, content = await ledger.store("files.content", "acme", user, file_id)
    return [json.loads(line) for line in content.decode().splitlines()]


async def test_files_belong_to_their_user_and_page_in_order(ledger: Ledger) -> None:
    made = [await ledger.store("files.create", "acme", "ann", "batch", f"f{i}.jsonl", b"x" * i) for i in range(3)]
    meta, content = await ledger.store("files.content", "acme", "ann", made[2].id)
    assert (meta.bytes, content, meta.purpose) == (2, b"xx", "batch")
    with pytest.raises(NotFoundError):
        await ledger.store("files.get", "acme", "bob", made[0].id)
    with pytest.raises(NotFoundError):
        await ledger.store("files.get", "other-tenant", "ann", made[0].id)
    first, more = await ledger.store("files.listing", "acme", "ann", None, 2, None, "asc")
    rest, last = await ledger.store("files.listing", "acme", "ann", None, 2, first[-1].id, "asc")
    assert [f.id for f in first + rest] == [f.id for f in made] and more and not last
    newest, _ = await ledger.store("files.listing", "acme", "ann", None, 1, None, "desc")
    assert newest[0].id == made[2].id
    assert (await ledger.store("files.delete", "acme", "ann", made[0].id)).deleted
    with pytest.raises(NotFoundError):
        await ledger.store("files.content", "acme", "ann", made[0].id)


async def test_create_checks_the_file_and_the_active_limit(ledger: Ledger) -> None:
    output: FileObject = await ledger.store("files.create", "acme", "ann", "batch_output", "o.jsonl", b"{}\n")
    with pytest.raises(InvalidRequestError, match="purpose 'batch'"):
        await ledger.store("batches.create", "acme", "ann", "k", output.id, "/v1/chat/completions", DAY, {}, items(1),
                           [], 10)
    with pytest.raises(NotFoundError):  # bob cannot run ann's file
        upload = await ledger.store("files.create", "acme", "ann", "batch", "in.jsonl", b"{}\n")
        await ledger.store("batches.create", "acme", "bob", "k", upload.id, "/v1/chat/completions", DAY, {},
                           items(1), [], 10)
    await new_batch(ledger, max_active=2)
    await new_batch(ledger, max_active=2)
    with pytest.raises(RateLimitError) as refused:
        await new_batch(ledger, max_active=2)
    assert refused.value.code == "batch_limit_reached"
    await new_batch(ledger, user="bob", max_active=2)  # the limit is per user


async def test_a_file_with_errors_makes_a_failed_batch_that_runs_nothing(ledger: Ledger) -> None:
    upload: FileObject = await ledger.store("files.create", "acme", "ann", "batch", "in.jsonl", b"{}\n")
    errors = [{"code": "invalid_json_line", "message": "bad", "param": None, "line": 2}]
    batch: Batch = await ledger.store("batches.create", "acme", "ann", "k", upload.id, "/v1/chat/completions", DAY,
                                      {}, items(3), errors, 10)
    assert batch.status == "failed" and batch.failed_at is not None and batch.in_progress_at is None
    assert batch.errors == {"object": "list", "data": errors} and batch.request_counts.total == 0
    assert await ledger.store("batches.claim", "replica-a", 30.0) is None


async def test_a_claim_is_held_by_its_lease_and_taken_over_when_it_runs_out(ledger: Ledger) -> None:
    batch = await new_batch(ledger, 5)
    claim: Claim = await ledger.store("batches.claim", "replica-a", 0.3)
    assert (claim.id, claim.key_id, claim.status) == (batch.id, "key1", "in_progress")
    assert await ledger.store("batches.claim", "replica-b", 30.0) is None  # held
    page: Page = await ledger.store("batches.pending", batch.id, "replica-a", 0.3, 0, 2)
    assert [i.custom_id for i in page.items] == ["req-1", "req-2"]
    assert await ledger.store("batches.record", batch.id, "replica-a", 0.3, [result(1), result(2, ok=False)]) \
        == "in_progress"
    deadline = time.monotonic() + 5
    while (taken := await ledger.store("batches.claim", "replica-b", 30.0)) is None:  # replica-a stopped renewing
        assert time.monotonic() < deadline, "the lease never ran out"
    assert taken.id == batch.id
    assert await ledger.store("batches.pending", batch.id, "replica-a", 30.0, 0, 10) is None  # a lost its lease
    page = await ledger.store("batches.pending", batch.id, "replica-b", 30.0, 0, 10)
    assert [i.line for i in page.items] == [3, 4, 5]  # what a finished, b does not run again
    # A late result from a for an item b also ran is not counted twice; the first result stays.
    assert await ledger.store("batches.record", batch.id, "replica-a", 30.0, [result(1, ok=False), result(3)]) is None
    got: Batch = await ledger.store("batches.get", "acme", "ann", batch.id)
    assert (got.request_counts.completed, got.request_counts.failed) == (2, 1)


async def test_finalize_writes_output_and_error_files_in_input_order(ledger: Ledger) -> None:
    batch = await new_batch(ledger, 4)
    await ledger.store("batches.claim", "r", 30.0)
    await ledger.store("batches.record", batch.id, "r", 30.0, [result(3), result(1), result(2, ok=False), result(4)])
    done: Batch = await ledger.store("batches.finalize", batch.id, "r")
    assert done.status == "completed" and done.completed_at is not None and done.finalizing_at is not None
    assert [x["custom_id"] for x in await lines(ledger, done.output_file_id)] == ["req-1", "req-3", "req-4"]
    assert [x["custom_id"] for x in await lines(ledger, done.error_file_id)] == ["req-2"]
    output: FileObject = await ledger.store("files.get", "acme", "ann", done.output_file_id)
    assert output.purpose == "batch_output"
    with pytest.raises(NotFoundError):
        await ledger.store("files.get", "acme", "bob", done.output_file_id)
    assert (await ledger.store("batches.finalize", batch.id, "r")).output_file_id == done.output_file_id  # once


async def test_cancel_ends_an_unheld_batch_at_once_and_a_held_one_through_its_runner(ledger: Ledger) -> None:
    idle = await new_batch(ledger, 2)
    cancelled: Batch = await ledger.store("batches.cancel", "acme", "ann", idle.id)
    assert cancelled.status == "cancelled" and cancelled.output_file_id is None
    assert [x["error"]["code"] for x in await lines(ledger, cancelled.error_file_id)] == ["batch_cancelled"] * 2
    with pytest.raises(InvalidRequestError, match="status 'cancelled'"):
        await ledger.store("batches.cancel", "acme", "ann", idle.id)
    held = await new_batch(ledger, 3)
    await ledger.store("batches.claim", "r", 30.0)
    await ledger.store("batches.record", held.id, "r", 30.0, [result(1)])
    with pytest.raises(NotFoundError):
        await ledger.store("batches.cancel", "acme", "bob", held.id)
    assert (await ledger.store("batches.cancel", "acme", "ann", held.id)).status == "cancelling"
    assert await ledger.store("batches.renew", held.id, "r", 30.0) == "cancelling"  # the runner learns of it
    ended: Batch = await ledger.store("batches.finalize", held.id, "r")
    assert ended.status == "cancelled" and ended.request_counts.completed == 1
    assert len(await lines(ledger, ended.output_file_id)) == 1
    assert len(await lines(ledger, ended.error_file_id)) == 2


async def test_a_batch_past_its_window_expires_with_what_it_finished(ledger: Ledger) -> None:
    batch = await new_batch(ledger, 2, window=("1h", -1.0))  # already past its deadline
    await ledger.store("batches.claim", "r", 30.0)
    await ledger.store("batches.record", batch.id, "r", 30.0, [result(1)])
    ended: Batch = await ledger.store("batches.finalize", batch.id, "r")
    assert ended.status == "expired" and ended.expired_at is not None
    assert [x["error"]["code"] for x in await lines(ledger, ended.error_file_id)] == ["batch_expired"]


async def test_release_lets_another_replica_continue_at_once(ledger: Ledger) -> None:
    batch = await new_batch(ledger, 1)
    await ledger.store("batches.claim", "r", 3600.0)
    assert await ledger.store("batches.release", "r") == 1
    assert (await ledger.store("batches.claim", "s", 30.0)).id == batch.id


async def test_listing_pages_newest_first(ledger: Ledger) -> None:
    made = [await new_batch(ledger, 1) for _ in range(3)]
    first, more = await ledger.store("batches.listing", "acme", "ann", 2, None)
    rest, last = await ledger.store("batches.listing", "acme", "ann", 2, first[-1].id)
    assert [b.id for b in first + rest] == [b.id for b in reversed(made)] and more and not last
    assert (await ledger.store("batches.listing", "acme", "bob", 10, None)) == ([], False)


async def test_export_and_erase_include_files_and_batches(ledger: Ledger) -> None:
    batch = await new_batch(ledger, 2)
    export = await ledger.export_user("acme", "ann", "ops")
    assert [b["id"] for b in export["batches"]] == [batch.id]
    assert export["files"][0]["content"] == "{}\n"
    counts = await ledger.erase_user("acme", "ann", "ops")
    assert (counts["files"], counts["batches"], counts["batch_items"]) == (1, 1, 2)
    with pytest.raises(NotFoundError):
        await ledger.store("batches.get", "acme", "ann", batch.id)
