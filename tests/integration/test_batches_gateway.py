"""Background batch jobs through the official openai SDK, unmodified: upload, create, poll, download, cancel,
a Gateway replica killed mid-batch, a budget that stops a batch part way, the pause behind slow interactive
traffic, ownership and bad input.

``batch-slow`` answers from the fault-injecting fake, whose latency these tests set (and reset).
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from bench.harness import replica_actors
from tests.integration.conftest import Deployed, create_key, ledger_row

pytestmark = pytest.mark.integration
APP = "raygate"


def new_key(deployed: Deployed, tenant: str | None = None, user: str = "bea") -> str:
    return create_key(deployed.redis_url, tenant or f"batch-{uuid.uuid4().hex[:8]}", user, "premium")


def client(deployed: Deployed, key: str) -> OpenAI:
    return OpenAI(base_url=f"{deployed.base_url}/v1", api_key=key, max_retries=3, timeout=30)


def request_line(custom_id: str, model: str, question: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8, **body}}


def upload(sdk: OpenAI, lines: list[Any]) -> str:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    return sdk.files.create(file=("requests.jsonl", io.BytesIO(text.encode())), purpose="batch").id


def start(sdk: OpenAI, lines: list[Any]) -> Any:
    return sdk.batches.create(input_file_id=upload(sdk, lines), endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"suite": "batches"})


def wait_for(sdk: OpenAI, batch_id: str, done: Any, timeout_s: float = 60, what: str = "the batch to end") -> Any:
    deadline, batch = time.monotonic() + timeout_s, None
    while True:
        try:
            batch = sdk.batches.retrieve(batch_id)
        except (openai.APIConnectionError, openai.InternalServerError):
            pass  # a Gateway replica being replaced (test_a_batch_survives_...)
        else:
            if done(batch):
                return batch
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {batch}"
        time.sleep(0.1)


def ended(batch: Any) -> bool:
    return batch.status in ("completed", "failed", "cancelled", "expired")


def results(sdk: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in sdk.files.content(file_id).text.splitlines()] if file_id else []


@pytest.fixture
def slow(deployed: Deployed) -> Iterator[Any]:
    """The fake behind ``batch-slow``, with its latency set by the test and reset after."""
    yield deployed.flaky
    deployed.flaky.latency_ms = 0


def test_a_batch_runs_end_to_end_and_through_the_cache(deployed: Deployed) -> None:
    sdk = client(deployed, new_key(deployed))
    questions = ["hi", "what is a hen", "how many eggs does a hen lay in a week"]
    lines = [request_line(f"q{i}", "echo", q, temperature=0) for i, q in enumerate(questions)]
    lines.append(request_line("missing", "no-such-model", "hi"))
    batch = start(sdk, lines)
    assert (batch.status, batch.request_counts.total, batch.metadata) == ("in_progress", 4, {"suite": "batches"})
    done = wait_for(sdk, batch.id, ended)
    assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (3, 1)
    output = {r["custom_id"]: r for r in results(sdk, done.output_file_id)}
    assert sorted(output) == ["q0", "q1", "q2"]
    for row in output.values():
        assert row["response"]["status_code"] == 200 and row["error"] is None
        assert row["response"]["body"]["choices"][0]["message"]["content"]
    prompts = [output[f"q{i}"]["response"]["body"]["usage"]["prompt_tokens"] for i in range(3)]
    assert prompts == sorted(prompts) and len(set(prompts)) == 3  # each answer is its own request's
    (error,) = results(sdk, done.error_file_id)
    assert error["custom_id"] == "missing" and error["response"]["status_code"] == 404
    assert error["response"]["body"]["error"]["code"] == "model_not_found"
    # Each request is a ledger row of its own, tagged batch.
    for row in output.values():
        assert ledger_row(deployed, row["response"]["request_id"])["tags"] == "batch"
    # The same requests again are answered by the exact cache.
    again = wait_for(sdk, start(sdk, lines[:3]).id, ended)
    cached = results(sdk, again.output_file_id)
    assert {r["response"]["body"]["raygate"]["cache"] for r in cached} == {"hit"}
    # Listing.
    assert batch.id in {b.id for b in sdk.batches.list()}
    assert {f.purpose for f in sdk.files.list()} == {"batch", "batch_output"}
    assert sdk.files.retrieve(done.output_file_id).filename == f"{batch.id}_output.jsonl"


def test_files_and_batches_are_their_owners_alone(deployed: Deployed) -> None:
    owner = client(deployed, new_key(deployed))
    batch = wait_for(owner, start(owner, [request_line("a", "echo", "hi")]).id, ended)
    other_key = new_key(deployed)
    for method, path in [("GET", f"/v1/files/{batch.input_file_id}"), ("GET", f"/v1/files/{batch.output_file_id}/content"),
                         ("DELETE", f"/v1/files/{batch.input_file_id}"), ("GET", f"/v1/batches/{batch.id}"),
                         ("POST", f"/v1/batches/{batch.id}/cancel")]:
        response = httpx.request(method, f"{deployed.base_url}{path}", headers={"Authorization": f"Bearer {other_key}"})
        assert response.status_code == 404, (path, response.text)
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError):
        client(deployed, other_key).batches.create(input_file_id=batch.input_file_id, endpoint="/v1/chat/completions",
                                                   completion_window="24h")
    assert owner.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        owner.files.retrieve(batch.input_file_id)


def test_bad_input_is_refused_or_reported_by_line(deployed: Deployed) -> None:
    sdk = client(deployed, new_key(deployed))
    failed = start(sdk, [request_line("a", "echo", "hi"), "{oops", request_line("a", "echo", "dup")])
    assert failed.status == "failed" and failed.request_counts.total == 0
    assert [(e.line, e.code) for e in failed.errors.data] == [(2, "invalid_json_line"), (3, "duplicate_custom_id")]
    assert sdk.batches.retrieve(failed.id).status == "failed"  # and nothing runs
    with pytest.raises(openai.BadRequestError, match="purpose"):
        sdk.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    file_id = upload(sdk, [request_line("a", "echo", "hi")])
    for bad in ({"endpoint": "/v1/embeddings"}, {"completion_window": "1h"}):
        with pytest.raises(openai.BadRequestError):
            sdk.batches.create(**{"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                                  "completion_window": "24h", **bad})
    with pytest.raises(openai.NotFoundError):
        sdk.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    response = httpx.post(f"{deployed.base_url}/v1/files", json={"purpose": "batch"},
                          headers={"Authorization": f"Bearer {new_key(deployed)}"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


def test_cancel_stops_a_running_batch_and_keeps_what_finished(deployed: Deployed, slow: Any) -> None:
    slow.latency_ms = 500
    sdk = client(deployed, new_key(deployed))
    batch = start(sdk, [request_line(f"r{i}", "batch-slow", f"question {i}") for i in range(24)])
    wait_for(sdk, batch.id, lambda b: b.request_counts.completed > 0, 30, "a first result")
    assert sdk.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait_for(sdk, batch.id, ended, 30)
    assert done.status == "cancelled" and done.cancelled_at is not None
    finished, cancelled = results(sdk, done.output_file_id), results(sdk, done.error_file_id)
    assert 0 < len(finished) < 24 and len(finished) == done.request_counts.completed
    assert {r["error"]["code"] for r in cancelled} == {"batch_cancelled"}
    assert sorted(r["custom_id"] for r in finished + cancelled) == sorted(f"r{i}" for i in range(24))
    with pytest.raises(openai.BadRequestError):
        sdk.batches.cancel(batch.id)


def test_a_batch_survives_its_gateway_replica_being_killed(deployed: Deployed, slow: Any) -> None:
    import ray

    slow.latency_ms = 500
    sdk = client(deployed, new_key(deployed))
    batch = start(sdk, [request_line(f"r{i}", "batch-slow", f"question {i}") for i in range(32)])
    wait_for(sdk, batch.id, lambda b: b.request_counts.completed >= 8, 30, "a first page of results")
    (victim, namespace), = replica_actors(APP, "Gateway").items()
    ray.kill(ray.get_actor(victim, namespace=namespace), no_restart=True)
    done = wait_for(sdk, batch.id, ended, 120, "the batch to finish on a new replica")  # the SDK retries meanwhile
    assert done.status == "completed" and done.request_counts.completed == 32
    assert replica_actors(APP, "Gateway") and victim not in replica_actors(APP, "Gateway")
    output = results(sdk, done.output_file_id)
    assert sorted(r["custom_id"] for r in output) == sorted(f"r{i}" for i in range(32))  # each once


def test_a_budget_stops_a_batch_part_way(deployed: Deployed) -> None:
    tenant = f"batch-quota-{uuid.uuid4().hex[:6]}"
    admin = {"Authorization": f"Bearer {deployed.admin_key}"}
    budget = {"scope": "tenant", "scope_value": tenant, "limit_tokens": 100}
    assert httpx.put(f"{deployed.base_url}/admin/budgets/{tenant}", json=budget, headers=admin).status_code == 200
    try:
        sdk = client(deployed, new_key(deployed, tenant))
        done = wait_for(sdk, start(sdk, [request_line(f"r{i}", "echo", f"question number {i}") for i in range(12)]).id,
                        ended)
    finally:
        httpx.delete(f"{deployed.base_url}/admin/budgets/{tenant}", headers=admin)
    answered, refused = results(sdk, done.output_file_id), results(sdk, done.error_file_id)
    assert done.status == "completed" and answered and refused and len(answered) + len(refused) == 12
    assert {r["response"]["body"]["error"]["code"] for r in refused} == {"insufficient_quota"}
    assert sum(r["response"]["body"]["usage"]["total_tokens"] for r in answered) <= 100


def test_batch_work_pauses_while_interactive_requests_are_slow(deployed: Deployed, slow: Any) -> None:
    slow.latency_ms = 2000
    key = new_key(deployed)
    sdk = client(deployed, key)
    with ThreadPoolExecutor(3) as pool:  # three interactive requests, each 2 s to a first byte
        list(pool.map(lambda i: sdk.chat.completions.create(
            model="batch-slow", messages=[{"role": "user", "content": f"slow {i}"}], max_tokens=4), range(3)))
    slow.latency_ms = 0
    batch = start(sdk, [request_line(f"r{i}", "echo", f"fast {i}") for i in range(4)])
    paused = wait_for(sdk, batch.id, lambda b: b.model_extra["raygate"]["paused"] or ended(b), 10, "the pause")
    assert paused.model_extra["raygate"]["paused"] and paused.request_counts.completed == 0
    done = wait_for(sdk, batch.id, ended, 30)
    assert done.status == "completed" and done.request_counts.completed == 4
