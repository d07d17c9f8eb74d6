"""Self-evaluation without a cluster: the judge's prompt and parser, sampling with a seeded RNG, the config's
checks, and the scores in a real ledger as an experiment metric and a dataset filter."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from scipy import stats

from deployments.evaluations import EvaluationRecord
from deployments.experiments import ExperimentSpec
from deployments.ledger import Ledger, RequestRecord
from deployments.privacy import Content
from serve_app.config import GatewayConfig, LedgerConfig
from serve_app.evaluation_config import DEFAULT_RUBRIC
from serve_app.judging import judge_messages, parse_verdict, sampled
from training.dataset import DatasetConfig, build_dataset


@pytest.mark.parametrize(("reply", "score"), [
    ('{"score": 4, "reason": "good"}', 4),
    ('```json\n{"score": 2, "reason": "partly wrong"}\n```', 2),
    ('Here is my verdict: {"score": "5", "reason": "excellent"} Hope it helps.', 5),
    ('{"score": 5.0, "reason": "x"}', 5),
    ("Score: 3 out of 5 because it is vague.", 3),  # not JSON: the first integer 1-5
    ("I'd give it 10/10, no: 1.", 1),  # 10 is no score; 1 is
    ('{"score": 7, "reason": "too high"}', None),  # an out-of-range JSON score; no standalone 1-5 either
    ("I cannot grade this answer.", None),
    ("", None),
    (None, None),
])
def test_verdicts_are_parsed_robustly(reply: str | None, score: int | None) -> None:
    assert parse_verdict(reply)[0] == score


def test_the_reason_comes_from_the_json_or_the_text() -> None:
    assert parse_verdict('{"score": 2, "reason": "wrong year"}') == (2, "wrong year")
    assert parse_verdict("Score 4: clear and correct.") == (4, "Score 4: clear and correct.")


def test_the_prompt_holds_the_rubric_the_question_and_the_answer() -> None:
    system, user = judge_messages("RUBRIC-TEXT", "What is 2+2?", "5" * 50, max_chars=20)
    assert system.role == "system" and "RUBRIC-TEXT" in system.content and '"score"' in system.content
    assert user.role == "user" and "What is 2+2?" in user.content and "5" * 20 in user.content
    assert "5" * 21 not in user.content  # cut to max_chars
    assert all(word in DEFAULT_RUBRIC for word in ("helpfulness", "correctness", "clarity", "1", "5"))


def test_sampling_honours_the_rate() -> None:
    rng = random.Random(7)
    assert not any(sampled(0.0, rng) for _ in range(1000))
    assert all(sampled(1.0, rng) for _ in range(1000))
    n, rate = 4000, 0.25
    hits = sum(sampled(rate, rng) for _ in range(n))
    low, high = stats.binom.ppf([0.0005, 0.9995], n, rate)  # a 99.9 % interval
    assert low <= hits <= high


def config(**evaluation: Any) -> GatewayConfig:
    model = {"engine": "remote", "engine_params": {"base_url": "http://x/v1", "model": "m"}}
    return GatewayConfig(models=[{"name": n, **model} for n in ("small", "big", "judge")],  # type: ignore[misc]
                         evaluation=evaluation)


def test_the_config_names_configured_models_only() -> None:
    assert config().evaluation.judge_model is None  # off by default
    ok = config(judge_model="judge", sample_rate=0.1, sync_routes=["small", "deep_analysis"],
                stronger_model={"small": "big"})
    assert ok.evaluation.retry_below == 3
    for bad, message in [({"judge_model": "nope"}, "judge_model"),
                         ({"judge_model": "judge", "stronger_model": {"small": "nope"}}, "stronger_model"),
                         ({"judge_model": "judge", "stronger_model": {"small": "small"}}, "itself"),
                         ({"judge_model": "judge", "sync_routes": ["mystery"]}, "sync_routes"),
                         ({"sample_rate": 0.5}, "need a judge_model"),
                         ({"judge_model": "judge", "sample_rate": 1.5}, "sample_rate"),
                         ({"judge_model": "judge", "tenant_sample_rates": {"t": 2}}, "tenant_sample_rates")]:
        with pytest.raises(ValidationError, match=message):
            config(**bad)


async def test_judge_score_is_an_experiment_metric(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    spec = ExperimentSpec(name="judge", match_model="echo", metric="judge_score", min_samples=20,
                          variants=[{"name": "control", "model": "small"}, {"name": "b", "model": "big"}])
    exp = await ledger.store("experiments.create", spec)
    await ledger.store("experiments.transition", exp.id, "start", None)
    rng = random.Random(3)
    rows, scores = [], []
    for i in range(120):
        variant = "b" if i % 2 else "control"
        rows.append(RequestRecord(id=f"r{i}", tenant="t", user=f"u{i}", key_id="k", requested_model="echo",
                                  experiment=exp.id, variant=variant))
        if i % 3:  # two in three judged; b scores about one point better
            score = min(5, max(1, round(rng.gauss(4.2 if variant == "b" else 3.0, 0.7))))
            scores.append(EvaluationRecord(request_id=f"r{i}", score=score, judge_model="judge"))
    scores.append(EvaluationRecord(request_id="r1", score=None, judge_model="judge"))  # unparsed: ignored
    await ledger.record(rows)
    for score in scores:
        await ledger.store("evaluations.add", score)
    result = await ledger.store("experiments.evaluate", exp.id)
    by_name = {v["name"]: v for v in result["variants"]}
    assert by_name["control"]["judge_count"] == by_name["b"]["judge_count"] == 40
    assert by_name["b"]["judge_score"] > by_name["control"]["judge_score"] + 0.5
    assert by_name["b"]["vs_control"]["significant"] and result["winner"] == "b"
    listed = await ledger.store("evaluations.listing", "r1", 10, 0)
    assert len(listed) == 2 and listed[0].score is None and listed[1].score in {1, 2, 3, 4, 5}  # newest first
    ledger.db.close()


async def test_min_judge_score_filters_the_dataset(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(default_consent=True), str(tmp_path))
    rows = [RequestRecord(id=f"r{i}", created_at=1000 + i, tenant="t", user="u", key_id="k", requested_model="m",
                          content=Content(messages=[{"role": "user", "content": f"Question number {i} about "
                                                     f"topic {'abcdefgh'[i]} in some detail?"}],
                                          answer=f"Answer {i} (ref r{i})")) for i in range(5)]
    await ledger.record(rows)
    for rid, score in [("r0", 5), ("r1", 4), ("r2", 2), ("r3", None), ("r1", 3)]:  # r1's latest score is 3
        await ledger.store("evaluations.add", EvaluationRecord(request_id=rid, score=score, judge_model="j"))
    ledger.db.close()
    report = build_dataset(DatasetConfig(consent_only=False, min_judge_score=3, validation_fraction=0),
                           tmp_path / "out", ledger_path=tmp_path / "ledger.sqlite3")
    kept = {json.loads(line)["messages"][-1]["content"]
            for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()}
    assert kept == {"Answer 0 (ref r0)", "Answer 1 (ref r1)"}
    assert report.removed["min_judge_score"] == 3  # r2 scored 2; r3 unparsed; r4 never judged
