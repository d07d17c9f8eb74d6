"""Retries, fallbacks, circuit breaking and graceful failure, against a fault-injecting upstream."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import redis

from tests.integration.conftest import UNAVAILABLE_FR, Deployed

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "how many eggs per week"}]


@pytest.fixture
def flaky(deployed: Deployed) -> Iterator[Deployed]:
    deployed.flaky.reset()
    yield deployed
    deployed.flaky.reset()


def client(deployed: Deployed) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{deployed.base_url}/v1", api_key=deployed.api_key, max_retries=0)


def attempts_of(deployed: Deployed, request_id: str) -> list[dict]:
    response = httpx.get(f"{deployed.base_url}/admin/requests/{request_id}/attempts",
                         headers={"Authorization": f"Bearer {deployed.admin_key}"})
    return response.json()


def test_retries_then_succeeds_on_the_same_model(flaky: Deployed) -> None:
    flaky.flaky.fail(503, times=2)
    raw = client(flaky).chat.completions.with_raw_response.create(model="flaky", messages=MESSAGES)
    assert raw.parse().choices[0].message.content
    assert raw.headers["x-raygate-model"] == "flaky"
    assert raw.headers["x-raygate-attempts"] == "3"
    assert raw.headers["x-raygate-fallback"] == "false"
    assert float(raw.headers["x-raygate-overhead-ms"]) >= 0
    assert flaky.flaky.request_count == 3
    rows = attempts_of(flaky, raw.headers["x-request-id"])
    assert [(r["model"], r["status"]) for r in rows] == [("flaky", 503), ("flaky", 503), ("flaky", 200)]
    assert rows[-1]["completion_tokens"] > 0 and rows[0]["completion_tokens"] == 0


def test_retry_after_is_honoured(flaky: Deployed) -> None:
    flaky.flaky.fail(429, times=1, retry_after_s=1)
    started = time.monotonic()
    raw = client(flaky).chat.completions.with_raw_response.create(model="flaky", messages=MESSAGES)
    elapsed = time.monotonic() - started
    assert raw.headers["x-raygate-attempts"] == "2"
    assert 1.0 <= elapsed < 3.0


def test_client_errors_are_never_retried(flaky: Deployed) -> None:
    flaky.flaky.fail(400, times=1)
    with pytest.raises(openai.BadRequestError):
        client(flaky).chat.completions.create(model="flaky", messages=MESSAGES)
    assert flaky.flaky.request_count == 1


def test_falls_back_in_order_when_retries_are_exhausted(flaky: Deployed) -> None:
    flaky.flaky.fail(502, times=None)
    raw = client(flaky).chat.completions.with_raw_response.create(model="flaky", messages=MESSAGES)
    assert raw.headers["x-raygate-model"] == "echo"
    assert raw.headers["x-raygate-fallback"] == "true"
    assert raw.headers["x-raygate-attempts"] == "4"
    rows = attempts_of(flaky, raw.headers["x-request-id"])
    assert [r["model"] for r in rows] == ["flaky", "flaky", "flaky", "echo"]


def test_all_options_down_is_a_clean_503_in_the_clients_language(flaky: Deployed) -> None:
    flaky.flaky.fail(500, times=None)
    response = httpx.post(f"{flaky.base_url}/v1/chat/completions",
                          json={"model": "flaky-solo", "messages": MESSAGES},
                          headers={"Authorization": f"Bearer {flaky.api_key}", "accept-language": "fr-FR,fr;q=0.9"})
    assert response.status_code == 503
    assert response.json() == {"error": {"message": UNAVAILABLE_FR, "type": "service_unavailable", "param": None,
                                         "code": "upstream_unavailable"}}
    with pytest.raises(openai.InternalServerError) as info:
        client(flaky).chat.completions.create(model="flaky-solo", messages=MESSAGES)
    assert info.value.status_code == 503 and info.value.code == "upstream_unavailable"


def test_rate_limited_everywhere_reports_retry_after(flaky: Deployed) -> None:
    flaky.flaky.fail(429, times=None, retry_after_s=60)
    response = httpx.post(f"{flaky.base_url}/v1/chat/completions", json={"model": "flaky-solo", "messages": MESSAGES},
                          headers={"Authorization": f"Bearer {flaky.api_key}"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_rate_limited"
    assert response.headers["retry-after"] == "60"
    assert response.headers["x-raygate-attempts"] == "1"
    assert flaky.flaky.request_count == 1  # 60 s is over max_retry_after_s: no wait, no retry


def test_hanging_upstream_times_out_within_the_total_budget(flaky: Deployed) -> None:
    flaky.flaky.hang(times=None, seconds=30)
    started = time.monotonic()
    response = httpx.post(f"{flaky.base_url}/v1/chat/completions", json={"model": "flaky-solo", "messages": MESSAGES},
                          headers={"Authorization": f"Bearer {flaky.api_key}"}, timeout=30)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - started < 3.0 + 1.0  # flaky-solo's total_timeout_s, plus slack


def test_no_retry_after_the_first_streamed_byte(flaky: Deployed) -> None:
    flaky.flaky.drop_stream(after_chunks=3, times=1)
    body = {"model": "flaky", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{flaky.base_url}/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {flaky.api_key}"}) as response:
        assert response.status_code == 200
        request_id = response.headers["x-request-id"]
        frames = [line for line in response.iter_lines() if line]
    assert frames[-1] == "data: [DONE]"
    assert '"error"' in frames[-2] and '"error"' not in frames[0]
    assert flaky.flaky.request_count == 1
    deadline = time.monotonic() + 10
    rows: list[dict] = []
    while not rows and time.monotonic() < deadline:
        rows = attempts_of(flaky, request_id)
    assert [r["status"] for r in rows] == [503]


def test_sdk_stream_raises_a_clean_error_mid_stream(flaky: Deployed) -> None:
    flaky.flaky.drop_stream(after_chunks=2, times=1)
    with pytest.raises(openai.APIError) as info:
        for _ in client(flaky).chat.completions.create(model="flaky", messages=MESSAGES, stream=True):
            pass
    assert info.value.code == "upstream_unavailable"
    assert info.value.message.startswith("Model flaky")


def test_circuit_opens_skips_half_opens_and_closes(flaky: Deployed) -> None:
    flaky.flaky.fail(503, times=None)
    c = client(flaky)
    for _ in range(2):  # two consecutive failures open the circuit (threshold 2)
        assert c.chat.completions.with_raw_response.create(model="circuit", messages=MESSAGES).headers[
            "x-raygate-model"] == "echo"
    seen = flaky.flaky.request_count
    skipped = c.chat.completions.with_raw_response.create(model="circuit", messages=MESSAGES)
    assert skipped.headers["x-raygate-model"] == "echo"
    assert flaky.flaky.request_count == seen  # open: not even tried
    assert attempts_of(flaky, skipped.headers["x-request-id"])[0]["error_code"] == "circuit_open"

    flaky.flaky.reset()
    deadline = time.monotonic() + 10
    model = "echo"
    while model != "circuit" and time.monotonic() < deadline:  # after the 1 s cooldown a probe goes through
        model = c.chat.completions.with_raw_response.create(model="circuit", messages=MESSAGES).headers[
            "x-raygate-model"]
    assert model == "circuit"
    state = redis.Redis.from_url(flaky.redis_url, decode_responses=True).hgetall("raygate:circuit:circuit")
    assert state["state"] == "closed" and int(state["opened"]) >= 1 and int(state["skipped"]) >= 1


def test_usage_counted_by_raygate_is_marked_estimated_in_the_ledger(flaky: Deployed) -> None:
    flaky.flaky.omit_usage(times=1)
    raw = client(flaky).chat.completions.with_raw_response.create(model="flaky-solo", messages=MESSAGES)
    usage = raw.parse().usage
    assert usage is not None and usage.completion_tokens > 0
    headers = {"Authorization": f"Bearer {flaky.admin_key}"}
    deadline = time.monotonic() + 10
    row = None
    while row is None and time.monotonic() < deadline:
        rows = httpx.get(f"{flaky.base_url}/admin/requests", params={"limit": 50}, headers=headers).json()
        row = next((r for r in rows if r["id"] == raw.headers["x-request-id"]), None)
    assert row is not None and row["usage_estimated"] in (1, True)
    assert row["completion_tokens"] == usage.completion_tokens


def test_prompt_too_long_for_the_window_goes_to_the_context_fallback(deployed: Deployed) -> None:
    long_prompt = [{"role": "user", "content": " ".join(["poultry"] * 120)}]
    raw = client(deployed).chat.completions.with_raw_response.create(model="tiny-short", messages=long_prompt)
    assert raw.headers["x-raygate-model"] == "echo"
    assert raw.headers["x-raygate-fallback"] == "true"
    rows = attempts_of(deployed, raw.headers["x-request-id"])
    assert [(r["model"], r["status"], r["error_code"]) for r in rows] == [
        ("tiny-short", 400, "context_length_exceeded"), ("echo", 200, None)]


def test_prompt_too_long_without_context_fallback_is_a_400(deployed: Deployed) -> None:
    long_prompt = [{"role": "user", "content": " ".join(["poultry"] * 3000)}]
    with pytest.raises(openai.BadRequestError) as info:
        client(deployed).chat.completions.create(model="tiny", messages=long_prompt)
    assert info.value.code == "context_length_exceeded"
