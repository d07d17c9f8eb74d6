"""A/B experiments: sticky weighted assignment on 10,000 users, significance with and without an effect,
auto-promotion in a real ledger."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deployments.experiment_stats import compare, results
from deployments.experiments import Experiment, ExperimentSpec, assign
from deployments.ledger import Ledger, RequestRecord
from deployments.templates import NewVersion
from serve_app.config import LedgerConfig


def experiment(status: str = "running", **spec: object) -> Experiment:
    base = {"name": "e", "match_model": "auto", "traffic": 0.5,
            "variants": [{"name": "control", "weight": 1}, {"name": "b", "weight": 3}]}
    return Experiment(**{**base, **spec}, id="exp_000000000001", status=status, created_at=0, updated_at=0)


def test_assignment_is_sticky_weighted_and_bounded_by_traffic() -> None:
    exp = experiment()
    users = [f"user-{i}" for i in range(10_000)]
    first = [assign(exp, u) for u in users]
    assert first == [assign(exp, u) for u in users]  # sticky
    inside = [v.name for v in first if v is not None]
    n = len(users)
    assert abs(len(inside) - n * 0.5) < 4 * math.sqrt(n * 0.25)  # traffic 50 %, within 4 sigma
    counts = Counter(inside)
    m = len(inside)
    assert abs(counts["b"] - m * 0.75) < 4 * math.sqrt(m * 0.75 * 0.25)  # weights 1:3
    other = experiment().model_copy(update={"id": "exp_000000000002"})
    assert sum(assign(other, u) == assign(exp, u) for u in users) < n  # another experiment, another draw


def test_status_decides_who_takes_part() -> None:
    assert assign(experiment("paused"), "u1") is None and assign(experiment("draft"), "u1") is None
    done = experiment("completed", promote=True).model_copy(update={"winner": "b"})
    assert all(assign(done, f"u{i}").name == "b" for i in range(100))  # type: ignore[union-attr]
    assert assign(experiment("completed", promote=False).model_copy(update={"winner": "b"}), "u1") is None


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="unique"):
        ExperimentSpec(name="e", match_model="m", variants=[{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="template"):
        ExperimentSpec(name="e", match_model="m", variants=[{"name": "a"}, {"name": "b", "template_version": 2}])
    with pytest.raises(ValueError, match="may not set"):
        ExperimentSpec(name="e", match_model="m", variants=[{"name": "a"}, {"name": "b", "parameters": {"n": 2}}])


def test_significance_with_a_known_effect_and_with_none() -> None:
    rng = np.random.default_rng(7)
    control = list((rng.random(2000) < 0.80).astype(float))
    better = list((rng.random(2000) < 0.88).astype(float))
    same = list((rng.random(2000) < 0.80).astype(float))
    effect = compare(control, better, "success_rate", 0.05)
    assert effect["significant"] and effect["p_value"] < 1e-6 and effect["ci_low"] > 0
    assert effect["min_samples_per_variant"] < 2000
    none = compare(control, same, "success_rate", 0.05)
    assert not none["significant"] and none["ci_low"] < 0 < none["ci_high"]
    slow, fast = list(rng.normal(500, 100, 400)), list(rng.normal(450, 100, 400))
    latency = compare(slow, fast, "latency", 0.05)
    assert latency["significant"] and latency["ci_high"] < 0
    assert not compare(slow, list(rng.normal(500, 100, 400)), "latency", 0.05)["significant"]


def test_the_winner_needs_significance_and_samples() -> None:
    exp = experiment(metric="success_rate", min_samples=100)
    rng = np.random.default_rng(1)

    def arm(p: float, n: int) -> dict[str, list[float]]:
        ok = list((rng.random(n) < p).astype(float))
        return {"ok": ok, "latency": [100.0] * n, "cost": [0.001] * n, "feedback": []}

    assert results(exp, {"control": arm(0.7, 1500), "b": arm(0.9, 1500)})["winner"] == "b"
    assert results(exp, {"control": arm(0.9, 1500), "b": arm(0.7, 1500)})["winner"] == "control"
    assert results(exp, {"control": arm(0.8, 1500), "b": arm(0.8, 1500)})["winner"] is None
    assert results(exp, {"control": arm(0.5, 50), "b": arm(1.0, 50)})["winner"] is None  # under min_samples


async def test_auto_promotion_completes_and_activates_the_template(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    await ledger.store("templates.add_version", "tone", NewVersion(body="Be formal."), "admin")
    await ledger.store("templates.add_version", "tone", NewVersion(body="Be friendly."), "admin")
    spec = ExperimentSpec(name="tone test", match_model="echo", template="tone", min_samples=100, promote=True,
                          variants=[{"name": "formal", "template_version": 1},
                                    {"name": "friendly", "template_version": 2}])
    exp = await ledger.store("experiments.create", spec)
    await ledger.store("experiments.transition", exp.id, "start", None)
    rows = [RequestRecord(id=f"r{i}", tenant="t", user=f"u{i}", key_id="k", requested_model="echo", model="echo",
                          experiment=exp.id, variant="formal" if i % 2 else "friendly",
                          status=200 if (i % 2 == 0 or i % 10 < 5) else 500) for i in range(600)]
    await ledger.record(rows)
    result = await ledger.store("experiments.evaluate", exp.id)
    assert result["winner"] == "friendly" and result["promoted"]
    assert (await ledger.store("experiments.get", exp.id)).status == "completed"
    assert (await ledger.store("templates.get", "tone")).version == 2
    counts = {v["name"]: v["requests"] for v in result["variants"]}
    assert counts == {"formal": 300, "friendly": 300}
