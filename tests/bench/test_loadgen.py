"""bench.compare's load generator (``bench.loadgen``) against the fake upstream: what it reads as an
answer, as an error, and how it carries on after one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bench.compare import Counter, Target, _call
from bench.loadgen import Connection
from tests.fake_upstream import FakeUpstream

MODEL = "echo"


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[FakeUpstream, Connection, Target]]:
    async with FakeUpstream.started() as fake:
        url = f"{fake.base_url}/chat/completions"
        target = Target("upstream", {0: url}, {"Content-Type": "application/json"}, [])
        conn = Connection(url, target.headers)
        try:
            yield fake, conn, target
        finally:
            conn.close()


async def test_answers_on_one_kept_connection(upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    fake, conn, target = upstream
    counter = Counter()
    first = await _call(conn, target, MODEL, False, counter)
    second = await _call(conn, target, MODEL, False, counter)
    assert (first[0], second[0]) == (None, None)
    assert first[2] is None  # no time to first token for a JSON answer
    assert fake.request_count == 2 and len(fake.client_ports) == 1  # kept alive, not reopened
    assert fake.last_body["messages"][0]["content"].endswith(f"{counter.nonce}-2.")


async def test_a_stream_has_its_first_token_time_and_its_end(
        upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    _, conn, target = upstream
    error, total_ms, ttft_ms = await _call(conn, target, MODEL, True, Counter())
    assert error is None
    assert ttft_ms is not None and 0 < ttft_ms <= total_ms


async def test_an_error_status_is_counted_by_its_code_and_the_next_request_goes_on(
        upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    fake, conn, target = upstream
    fake.fail(503)
    error, _, _ = await _call(conn, target, MODEL, False, Counter())
    assert error is not None and error.startswith("HTTP 503")
    assert (await _call(conn, target, MODEL, False, Counter()))[0] is None


async def test_a_dropped_stream_is_an_error_and_the_next_request_reconnects(
        upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    fake, conn, target = upstream
    fake.drop_stream(after_chunks=2)
    error, _, _ = await _call(conn, target, MODEL, True, Counter())
    assert error is not None
    assert (await _call(conn, target, MODEL, True, Counter()))[0] is None
    assert fake.request_count == 2 and len(fake.client_ports) == 2


async def test_an_answer_without_choices_is_an_error(upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    fake, conn, target = upstream
    fake.garble()
    assert (await _call(conn, target, MODEL, False, Counter()))[0] == "no choices in body"


async def test_the_cache_header_a_cell_expects_is_checked(
        upstream: tuple[FakeUpstream, Connection, Target]) -> None:
    _, conn, target = upstream
    target.cache = "hit"  # the fake upstream sends no x-raygate-cache
    assert (await _call(conn, target, MODEL, False, Counter()))[0] == "x-raygate-cache None (expected hit)"
