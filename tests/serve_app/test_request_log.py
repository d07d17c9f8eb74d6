"""The request log: one JSON line per request with the operator's fields, content only with the debug switch."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from deployments.ledger import RequestRecord
from deployments.privacy import Content
from serve_app.request_log import LOGGER_NAME, LogsConfig, RequestLog


@pytest.fixture(autouse=True)
def fresh_logger() -> Iterator[None]:
    yield
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()


def record() -> RequestRecord:
    return RequestRecord(id="req-1", tenant="acme", user="ann", key_id="k1", requested_model="auto", model="echo",
                         route="standard_exercise->echo", cache_status="miss", latency_ms=12.34567, status=200,
                         prompt_tokens=7, completion_tokens=3, cost_usd=0.0001,
                         content=Content(messages=[{"role": "user", "content": "my secret question"}], answer="hi"))


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_json_line_per_request_without_content(tmp_path: Path) -> None:
    log = RequestLog(LogsConfig(), str(tmp_path))
    log.write(record())
    log.write(record().model_copy(update={"id": "req-2", "status": 429, "error_code": "rate_limit_exceeded"}))
    first, second = lines(tmp_path / "logs" / "requests.jsonl")
    assert (first["event"], first["request_id"], first["tenant"], first["model"]) == ("request", "req-1", "acme", "echo")
    assert (first["route"], first["cache"], first["latency_ms"], first["level"]) == (
        "standard_exercise->echo", "miss", 12.346, "INFO")
    assert (second["status"], second["error_code"]) == (429, "rate_limit_exceeded")
    assert "my secret question" not in (tmp_path / "logs" / "requests.jsonl").read_text()


def test_debug_switch_adds_content(tmp_path: Path) -> None:
    RequestLog(LogsConfig(debug_content=True), str(tmp_path)).write(record())
    (line,) = lines(tmp_path / "logs" / "requests.jsonl")
    assert line["content"] == {"messages": [{"role": "user", "content": "my secret question"}], "answer": "hi"}


def test_stderr_and_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    RequestLog(LogsConfig(request_log="stderr"), str(tmp_path)).write(record())
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["request_id"] == "req-1"
    assert not (tmp_path / "logs").exists()
    fresh = tmp_path / "off"
    RequestLog(LogsConfig(request_log="off"), str(fresh)).write(record())
    assert not fresh.exists()


def test_a_second_replica_in_the_process_adds_no_second_handler(tmp_path: Path) -> None:
    RequestLog(LogsConfig(), str(tmp_path))
    RequestLog(LogsConfig(), str(tmp_path)).write(record())
    assert len(lines(tmp_path / "logs" / "requests.jsonl")) == 1
