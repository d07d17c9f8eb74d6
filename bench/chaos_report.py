"""The figures of a ``bench.chaos`` run: what each request and fault recorded, per second and per event."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sample:
    """One request as the client saw it; times in seconds since the load started."""

    started: float
    ended: float
    status: int  # 0: no HTTP answer (connection reset, refused, timeout)
    kind: str  # "ok", "openai:<code>" (a JSON error in OpenAI's shape), "other" (any other body) or "conn:<error>"
    body: str = ""  # the start of an "other" answer, as received


@dataclass
class Event:
    """One fault injected by the chaos thread; times in seconds since the load started."""

    name: str
    at: float = float("nan")
    victim: str = ""
    detected_at: float | None = None  # Serve's controller no longer lists the victim as RUNNING
    recovered_at: float | None = None  # back at REPLICAS running replicas, the victim gone (kills)
    stopped_at: float | None = None  # Valkey's process gone (outage; its graceful stop takes a moment)
    restarted_at: float | None = None  # Valkey started again (outage)
    first_success_at: float | None = None  # first success among requests started after recovery began
    window_end: float = float("nan")  # the next event, or the end of the load
    notes: list[str] = field(default_factory=list)



# --- the figures --------------------------------------------------------------------------------------


def event_figures(events: list[Event], samples: list[Sample], end: float) -> list[dict[str, Any]]:
    """Per event: failed requests (ended in its window), in flight at the fault, recovery times."""
    out = []
    for index, event in enumerate(events):
        event.window_end = events[index + 1].at if index + 1 < len(events) else end
        in_window = [s for s in samples if event.at <= s.ended < event.window_end]
        failed = [s for s in in_window if s.kind != "ok"]
        recovered = event.recovered_at if event.recovered_at is not None else event.at
        later_ok = [s for s in samples if s.kind == "ok" and s.started >= recovered]
        event.first_success_at = min((s.ended for s in later_ok), default=None)
        first_ok_after_fault = min((s.ended for s in samples if s.kind == "ok" and s.started >= event.at),
                                   default=None)
        figures: dict[str, Any] = {
            "event": event.name, "victim": event.victim, "at_s": round(event.at, 2),
            "in_flight_at_fault": sum(1 for s in samples if s.started <= event.at < s.ended),
            "requests_in_window": len(in_window), "failed": len(failed),
            "failed_by_kind": dict(Counter(f"{s.status} {s.kind}" for s in failed)),
            "last_failure_after_s": round(max(s.ended for s in failed) - event.at, 2) if failed else None,
            "first_success_after_fault_s": round(first_ok_after_fault - event.at, 2)
            if first_ok_after_fault is not None else None,
            "other_bodies": sorted({s.body for s in failed if s.kind == "other"}),
            "notes": event.notes,
        }
        if event.restarted_at is None:
            figures["serve_detected_s"] = _since(event.detected_at, event.at)
            figures["serve_recovered_s"] = _since(event.recovered_at, event.at)
        else:
            figures["down_s"] = round(event.restarted_at - event.at, 2)
            figures["first_success_after_restart_s"] = _since(event.first_success_at, event.restarted_at)
            figures["stopped_after_s"] = _since(event.stopped_at, event.at)
            stopped = event.stopped_at if event.stopped_at is not None else event.at
            down = [s for s in samples if stopped <= s.started and s.ended < event.restarted_at]
            after = [s for s in samples if s.started >= event.restarted_at and s.kind != "ok"]
            figures["failed_after_restart"] = len(after)
            figures["last_failure_after_restart_s"] = round(max(s.ended for s in after) - event.restarted_at, 2) \
                if after else None
            figures["answered_while_down"] = len(down)
            figures["clean_503_while_down"] = sum(1 for s in down if s.status == 503 and s.kind.startswith("openai:"))
            figures["ok_while_down"] = sum(1 for s in down if s.kind == "ok")
        out.append(figures)
    return out


def _since(t: float | None, origin: float) -> float | None:
    return round(t - origin, 2) if t is not None else None


def per_second(samples: list[Sample], events: list[Event], replicas: int) -> list[dict[str, Any]]:
    """Requests ended in each second: successes and failures by status and kind; the events in it."""
    end = int(max((s.ended for s in samples), default=0)) + 1
    rows = []
    for second in range(end):
        ended = [s for s in samples if second <= s.ended < second + 1]
        marks = []
        for e in events:
            kill = e.restarted_at is None
            for t, label in ((e.at, e.name), (e.detected_at, f"{e.victim} no longer RUNNING" if kill else ""),
                             (e.recovered_at, f"{e.name.split()[1]} back at {replicas}" if kill else ""),
                             (e.restarted_at, "Valkey restarted")):
                if label and t is not None and second <= t < second + 1:
                    marks.append(label)
        rows.append({"second": second, "ok": sum(1 for s in ended if s.kind == "ok"),
                     "failed": dict(Counter(f"{s.status} {s.kind}" for s in ended if s.kind != "ok")),
                     "events": marks})
    return rows


def print_report(rows: list[dict[str, Any]], figures: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(title="Requests ended per second")
    for column in ("s", "ok", "failed (status kind: n)", "event"):
        table.add_column(column)
    for row in rows:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(row["failed"].items()))
        table.add_row(str(row["second"]), str(row["ok"]), failed, "; ".join(row["events"]))
    console.print(table)
    table = Table(title="Per event")
    columns = ("event", "at s", "in flight", "failed", "failures", "Serve noticed s", "back s",
               "first ok after fault s")
    for column in columns:
        table.add_column(column)
    for f in figures:
        failures = ", ".join(f"{k}: {v}" for k, v in sorted(f["failed_by_kind"].items()))
        back = f.get("serve_recovered_s", f.get("first_success_after_restart_s"))
        table.add_row(f["event"], f"{f['at_s']:.1f}", str(f["in_flight_at_fault"]), str(f["failed"]), failures,
                      str(f.get("serve_detected_s", "-")), str(back), str(f["first_success_after_fault_s"]))
    console.print(table)
    console.print_json(json.dumps(summary))
