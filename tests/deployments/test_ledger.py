"""The Ledger deployment alone (Serve local testing mode) and the gateway-side buffer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ray import serve

from deployments.ledger import FeedbackRecord, Ledger, RequestRecord
from serve_app.ledger_buffer import LedgerBuffer
from serve_app.config import LedgerConfig


def row(i: int, tenant: str = "acme") -> RequestRecord:
    return RequestRecord(id=f"r{i}", created_at=1000.0 + i, tenant=tenant, user="u", key_id="k",
                         requested_model="m", model="m", prompt_tokens=i, completion_tokens=2 * i)


async def test_record_and_list_through_a_handle(tmp_path: Path) -> None:
    handle = serve.run(serve.deployment(Ledger).bind(LedgerConfig(), str(tmp_path)), _local_testing_mode=True)
    assert await handle.record.remote([row(i) for i in range(5)] + [row(9, tenant="other")]) == 6
    rows = await handle.list_requests.remote(limit=3, tenant="acme")
    assert [r.id for r in rows] == ["r4", "r3", "r2"]
    assert rows[0].completion_tokens == 8
    assert len(await handle.list_requests.remote(limit=100)) == 6
    await handle.check_health.remote()


async def test_rows_survive_a_restart(tmp_path: Path) -> None:
    await Ledger(LedgerConfig(), str(tmp_path)).record([row(1)])
    rows = await Ledger(LedgerConfig(), str(tmp_path)).list_requests()
    assert [r.id for r in rows] == ["r1"]


async def test_buffer_batches_and_flushes_on_interval() -> None:
    batches: list[list[RequestRecord]] = []
    sent = asyncio.Event()

    async def send(rows: list[RequestRecord]) -> None:
        batches.append(rows)
        sent.set()

    buffer = LedgerBuffer(send, flush_interval_s=0.05, batch_size=1000)
    for i in range(10):
        buffer.add(row(i))
    await asyncio.wait_for(sent.wait(), 5)
    assert [len(b) for b in batches] == [10]


async def test_buffer_sends_a_full_batch_at_once() -> None:
    sent = asyncio.Event()
    batches: list[int] = []

    async def send(rows: list[RequestRecord]) -> None:
        batches.append(len(rows))
        sent.set()

    buffer = LedgerBuffer(send, flush_interval_s=3600, batch_size=4)
    for i in range(4):
        buffer.add(row(i))
    await asyncio.wait_for(sent.wait(), 5)
    assert batches == [4]


async def test_buffer_keeps_rows_when_the_ledger_is_down() -> None:
    attempts: list[int] = []

    async def send(rows: list[RequestRecord]) -> None:
        attempts.append(len(rows))
        if len(attempts) == 1:
            raise ConnectionError("ledger down")

    buffer = LedgerBuffer(send, flush_interval_s=3600, batch_size=1000)
    buffer.add(row(1))
    await buffer.flush()
    buffer.add(row(2))
    await buffer.flush()
    assert attempts == [1, 2]


@pytest.mark.parametrize("status,code", [(200, None), (503, "upstream_unavailable")])
def test_record_fields_round_trip(status: int, code: str | None) -> None:
    record = RequestRecord(id="x", tenant="t", user="u", key_id="k", requested_model="m", status=status, error_code=code)
    assert RequestRecord.model_validate(record.model_dump()) == record


async def test_feedback_only_from_the_key_that_asked(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    await ledger.record([row(1)])  # made with key "k"
    assert await ledger.record_feedback(FeedbackRecord(request_id="r1", key_id="other", rating=5)) is False
    assert await ledger.get_feedback("r1") is None
    assert await ledger.record_feedback(FeedbackRecord(request_id="r1", key_id="k", rating=2, comment="meh")) is True
    assert await ledger.record_feedback(FeedbackRecord(request_id="r1", key_id="k", thumbs="up")) is True
    stored = await ledger.get_feedback("r1")
    assert stored is not None and (stored.rating, stored.thumbs) == (None, "up")  # the latest verdict wins
    assert await ledger.record_feedback(FeedbackRecord(request_id="nope", key_id="k", rating=1)) is False
