"""One structured JSON line per finished request: who, which model and route, cache result, outcome, latency.

Lines go through the ``raygate.requests`` logger to a file under ``data_dir`` (every
Gateway replica appends to it; one ``write`` per line, so lines do not interleave) and/or
to stderr, where Ray collects them with the replica's output. Message content and
answers are never in a line unless ``logs.debug_content`` is on; keys never are (only
their public id).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field

from serve_app.config_base import BaseConfig

if TYPE_CHECKING:
    from deployments.ledger import RequestRecord

__all__ = ["JSONLineFormatter", "LogsConfig", "RequestLog"]

LOGGER_NAME = "raygate.requests"
_FIELDS = ("id", "tenant", "user", "key_id", "endpoint", "requested_model", "model", "route", "category",
           "cache_status", "status", "error_code", "stream", "latency_ms", "ttft_ms", "upstream_ms",
           "prompt_tokens", "completion_tokens", "cost_usd", "attempts", "fallback", "template", "experiment",
           "variant", "tags", "flags")
_RENAMED = {"id": "request_id", "cache_status": "cache"}


class LogsConfig(BaseConfig):
    """The request log."""

    request_log: Literal["file", "stderr", "both", "off"] = Field(
        "file", description="Where request lines go: a JSON Lines file, stderr (collected by Ray), both, or nowhere.")
    file: str = Field("logs/requests.jsonl", description="The request log file, relative to data_dir.")
    debug_content: bool = Field(
        False, description="Debug only: also log each request's messages and answer. Never on in production.")


class JSONLineFormatter(logging.Formatter):
    """A record as one JSON object: time, level, logger, event, and the fields passed as ``extra={"fields":…}``."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
                                "event": record.getMessage(), **getattr(record, "fields", {})}
        return orjson.dumps(body, default=str).decode()


class RequestLog:
    """Writes the request lines; handlers are set up once per process (replicas share a process in tests).

    Args:
        config: the logs config.
        data_dir: where a relative ``config.file`` lives.
    """

    def __init__(self, config: LogsConfig, data_dir: str) -> None:
        self.config = config
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.propagate = False  # not again through Ray's handlers
        self.logger.setLevel(logging.INFO)
        path = Path(data_dir) / config.file
        wanted = ({f"file:{path}"} if config.request_log in ("file", "both") else set()) | (
            {"stderr"} if config.request_log in ("stderr", "both") else set())
        for handler in [h for h in self.logger.handlers if h.get_name() not in wanted]:  # a live change
            self.logger.removeHandler(handler)
            handler.close()
        if f"file:{path}" in wanted:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._add_handler(f"file:{path}", lambda: logging.FileHandler(path, encoding="utf-8"))
        if "stderr" in wanted:
            self._add_handler("stderr", lambda: logging.StreamHandler(sys.stderr))
        self.enabled = config.request_log != "off"

    def _add_handler(self, name: str, make: Any) -> None:
        if any(h.get_name() == name for h in self.logger.handlers):
            return
        handler: logging.Handler = make()
        handler.set_name(name)
        handler.setFormatter(JSONLineFormatter())
        self.logger.addHandler(handler)

    def write(self, record: "RequestRecord") -> None:
        """Log one finished request (never raises: a full disk must not fail the request)."""
        if not self.enabled:
            return
        fields = {_RENAMED.get(name, name): getattr(record, name) for name in _FIELDS}
        fields["latency_ms"] = round(record.latency_ms, 3)
        if self.config.debug_content and record.content is not None:
            fields["content"] = record.content.model_dump()
        try:
            self.logger.info("request", extra={"fields": fields})
        except Exception:  # noqa: BLE001 - logging.Handler.handleError already reports it
            pass
