"""A batch's input checked line by line, its completion window, and the gate that pauses batch work."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.batch_config import BatchConfig
from serve_app.batch_input import MAX_ERRORS, completion_window_s, parse_input
from serve_app.batching import LoadGate
from serve_app.errors import InvalidRequestError

ENDPOINT = "/v1/chat/completions"


def line(custom_id: Any = "a", **overrides: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
            "body": {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}, **overrides}


def jsonl(*lines: Any) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def test_good_lines_become_items_with_their_line_numbers() -> None:
    items, errors = parse_input(jsonl(line("a"), "", line("b")) + b"\n", ENDPOINT, 10)
    assert errors == []
    assert [(n, cid) for n, cid, _ in items] == [(1, "a"), (3, "b")]
    assert json.loads(items[0][2])["model"] == "echo"


@pytest.mark.parametrize(("bad", "code", "param"), [
    ("{not json", "invalid_json_line", None),
    ([1, 2], "invalid_request", None),
    (line(custom_id=""), "invalid_custom_id", "custom_id"),
    (line(custom_id=7), "invalid_custom_id", "custom_id"),
    (line(custom_id="a"), "duplicate_custom_id", "custom_id"),
    (line("x", method="GET"), "invalid_method", "method"),
    (line("x", url="/v1/embeddings"), "mismatched_url", "url"),
    (line("x", body="text"), "invalid_request", "body"),
    (line("x", body={"model": "echo"}), "invalid_request", "body.messages"),
    (line("x", body={"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}),
     "invalid_request", "body.stream"),
])
def test_each_bad_line_is_reported_with_its_number(bad: Any, code: str, param: str | None) -> None:
    items, errors = parse_input(jsonl(line("a"), bad), ENDPOINT, 10)
    assert [(e["line"], e["code"], e["param"]) for e in errors] == [(2, code, param)]
    assert len(items) == 1


def test_whole_file_problems() -> None:
    assert parse_input(b" \n\n", ENDPOINT, 10)[1][0]["code"] == "empty_file"
    assert parse_input(b"\xff\xfe{}", ENDPOINT, 10)[1][0]["code"] == "invalid_file"
    _, errors = parse_input(jsonl(*(line(str(i)) for i in range(4))), ENDPOINT, 3)
    assert errors[0]["code"] == "too_many_requests"
    _, errors = parse_input(jsonl(*(["{"] * (MAX_ERRORS + 5))), ENDPOINT, 10_000)
    assert len(errors) == MAX_ERRORS


def test_completion_window() -> None:
    assert completion_window_s("24h", ["24h"]) == 86_400
    for bad in ("48h", "1d", "0h"):
        with pytest.raises(InvalidRequestError):
            completion_window_s(bad, ["24h"])


def test_the_gate_pauses_while_the_interactive_p95_is_above_the_limit() -> None:
    now = [0.0]
    gate = LoadGate(BatchConfig(pause_above_ms=100, pause_window_s=10, pause_min_samples=3), clock=lambda: now[0])
    gate.observe(500)
    gate.observe(500)
    assert not gate.paused()  # too few samples to judge
    gate.observe(20)
    assert gate.paused() and gate.p95_ms() == 500
    now[0] = 5.0
    for _ in range(40):
        gate.observe(20)  # mostly fast again: the p95 falls under the limit
    assert not gate.paused()
    now[0] = 20.0  # the window is empty
    assert gate.p95_ms() is None and not gate.paused()
