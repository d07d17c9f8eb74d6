"""Self-evaluation through the gateway, with the judge served by the fake upstream (``fake-judge`` scores the
``[score=N]`` mark of the question): sampling per tenant, scores and the judge's billed row in the ledger, an
unreadable verdict, and the sync route's single retry on the stronger model."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest

from tests.integration.conftest import JUDGED_TENANT, Deployed, create_key, ledger_row

pytestmark = pytest.mark.integration


def chat(deployed: Deployed, key: str, model: str, question: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": question}], **extra}
    response = httpx.post(f"{deployed.base_url}/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return response


def evaluations(deployed: Deployed, request_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{deployed.base_url}/admin/evaluations", params={"request_id": request_id}, timeout=30,
                         headers={"Authorization": f"Bearer {deployed.admin_key}"})
    assert response.status_code == 200, response.text
    return list(response.json())


def wait_for(deployed: Deployed, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The request's evaluations once ``count`` are stored (the sampled judge runs in the background)."""
    deadline = time.monotonic() + 15
    while len(found := evaluations(deployed, request_id)) < count:
        assert time.monotonic() < deadline, f"{request_id} was never judged"
        time.sleep(0.1)
    return found


def ledger_ids(deployed: Deployed, prefix: str) -> set[str]:
    rows = httpx.get(f"{deployed.base_url}/admin/requests", params={"limit": 200}, timeout=30,
                     headers={"Authorization": f"Bearer {deployed.admin_key}"}).json()
    return {r["id"] for r in rows if r["id"].startswith(prefix)}


def question(mark: str) -> str:
    return f"[score={mark}] Why is the sky blue? ({uuid.uuid4().hex})"  # unique: never a cache hit


def test_rate_zero_calls_no_judge(deployed: Deployed) -> None:
    response = chat(deployed, deployed.api_key, "echo", question("2"))  # tenant acme: sample_rate 0
    request_id = response.headers["x-request-id"]
    ledger_row(deployed, request_id)
    # A later answer of a judged tenant, once scored, shows the background judging has run past this one.
    key = create_key(deployed.redis_url, JUDGED_TENANT, "jo", "premium")
    wait_for(deployed, chat(deployed, key, "echo", question("3")).headers["x-request-id"])
    assert evaluations(deployed, request_id) == []
    assert ledger_ids(deployed, request_id) == {request_id}
    assert "x-raygate-judge-score" not in response.headers


def test_rate_one_scores_every_answer_and_bills_the_judge(deployed: Deployed) -> None:
    key = create_key(deployed.redis_url, JUDGED_TENANT, "jo", "premium")
    ids = [chat(deployed, key, "echo", question(str(mark)), stream=stream).headers["x-request-id"]
           for mark, stream in ((5, False), (2, False), (4, True))]
    for request_id, mark in zip(ids, (5, 2, 4)):
        [judged] = wait_for(deployed, request_id)
        assert (judged["score"], judged["judge_model"], judged["answer_model"], judged["mode"]) == \
            (mark, "judge", "echo", "sampled")
        assert judged["reason"] == f"fake judge scored {mark}"
        row = ledger_row(deployed, f"{request_id}-judge")
        assert (row["endpoint"], row["tenant"], row["model"], row["status"]) == \
            ("evaluation.judge", JUDGED_TENANT, "judge", 200)
        assert row["prompt_tokens"] > 0 and row["cost_usd"] > 0  # the tenant pays for its judge


def test_an_unreadable_verdict_stores_no_score_and_is_counted(deployed: Deployed) -> None:
    key = create_key(deployed.redis_url, JUDGED_TENANT, "jo", "premium")
    request_id = chat(deployed, key, "echo", question("none")).headers["x-request-id"]
    [judged] = wait_for(deployed, request_id)
    assert judged["score"] is None and judged["reason"] == "I cannot grade this answer."
    stats = httpx.get(f"{deployed.base_url}/admin/evaluations/stats", timeout=30,
                      headers={"Authorization": f"Bearer {deployed.admin_key}"}).json()
    assert stats["unparsed"] >= 1 and stats["judge_model"] == "judge"


def test_a_low_sync_score_retries_once_on_the_stronger_model(deployed: Deployed) -> None:
    response = chat(deployed, deployed.api_key, "weak-answer", question("2"))
    request_id = response.headers["x-request-id"]
    assert response.headers["x-raygate-model"] == "echo"  # the client got the stronger model's answer
    assert response.headers["x-raygate-retried-from"] == "weak-answer"
    assert response.json()["choices"][0]["message"]["content"]
    first = ledger_row(deployed, request_id)
    retry = ledger_row(deployed, f"{request_id}-retry")
    assert (first["model"], retry["model"], retry["endpoint"]) == ("weak-answer", "echo", "evaluation.retry")
    judged = wait_for(deployed, request_id, count=2)  # the first answer's (sync) and the retry's (background)
    by_id = {e["request_id"]: e for e in judged}
    assert by_id[request_id]["score"] == 2 and by_id[request_id]["mode"] == "sync"
    assert by_id[request_id]["answer_model"] == "weak-answer"
    assert by_id[f"{request_id}-retry"]["answer_model"] == "echo"
    # Exactly one retry: the retry's poor score does not retry again (its judge row lands last).
    expected = {request_id, f"{request_id}-judge", f"{request_id}-retry", f"{request_id}-retry-judge"}
    ledger_row(deployed, f"{request_id}-retry-judge")
    assert ledger_ids(deployed, request_id) == expected


def test_a_good_sync_score_sends_the_first_answer(deployed: Deployed) -> None:
    response = chat(deployed, deployed.api_key, "weak-answer", question("5"))
    request_id = response.headers["x-request-id"]
    assert response.headers["x-raygate-model"] == "weak-answer"
    assert response.headers["x-raygate-judge-score"] == "5"
    assert "x-raygate-retried-from" not in response.headers
    [judged] = evaluations(deployed, request_id)  # stored before the answer was sent
    assert (judged["score"], judged["mode"]) == (5, "sync")
    ledger_row(deployed, f"{request_id}-judge")
    assert ledger_ids(deployed, request_id) == {request_id, f"{request_id}-judge"}
