"""An experiment's results from the ledger, with significance (scipy.stats) and the winner.

Per variant: requests, success rate, latency p50/p95, cost per request and feedback
score (a 1–5 rating scaled to 0–1, else thumbs up 1 / down 0) and judge score (the
mean 1–5 score of the judged requests, ``deployments.evaluations``). Each challenger is
compared with the control (the first variant): success rates by a two-proportion
z-test, latency, cost, feedback and judge score by Welch's t-test, each with a 95 % confidence
interval of the difference and the sample size per variant that would detect the
observed difference (or 5 points of success rate) with 80 % power. A winner is
named only when both arms have ``min_samples`` requests and the difference on the
experiment's metric is significant at ``alpha``.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any

import numpy as np
from scipy import stats

from deployments import evaluations, experiments, templates
from deployments.experiments import Experiment

_LOWER_IS_BETTER = {"latency", "cost"}
_POWER_Z = stats.norm.ppf(0.8)


def rows_by_variant(db: sqlite3.Connection, experiment_id: str) -> dict[str, dict[str, list[float]]]:
    """Each variant's outcomes: ok (1/0), latency ms, cost USD, feedback score (rated requests only), judge score
    (1-5, judged requests only)."""
    data: dict[str, dict[str, list[float]]] = {}
    sql = (f"SELECT r.variant, r.status, r.latency_ms, r.cost_usd, f.rating, f.thumbs, "
           f"{evaluations.LATEST_SCORE_SQL.format(id='r.id')} FROM requests r "
           "LEFT JOIN feedback f ON f.request_id = r.id WHERE r.experiment = ?")
    for variant, status, latency, cost, rating, thumbs, score in db.execute(sql, [experiment_id]):
        d = data.setdefault(variant, {"ok": [], "latency": [], "cost": [], "feedback": [], "judge_score": []})
        if score is not None:
            d["judge_score"].append(float(score))
        d["ok"].append(1.0 if status == 200 else 0.0)
        d["latency"].append(float(latency))
        d["cost"].append(float(cost))
        if rating is not None or thumbs is not None:
            d["feedback"].append((rating - 1) / 4 if rating is not None else float(thumbs == "up"))
    return data


def _values(d: dict[str, list[float]], metric: str) -> list[float]:
    return d["ok"] if metric == "success_rate" else d.get(metric, [])


def compare(control: list[float], other: list[float], metric: str, alpha: float) -> dict[str, Any]:
    """Test ``other`` against ``control`` on one metric (difference = other - control)."""
    n1, n2 = len(control), len(other)
    if n1 < 2 or n2 < 2:
        return {"p_value": None, "ci_low": None, "ci_high": None, "significant": False, "min_samples_per_variant": None}
    if metric == "success_rate":
        p1, p2 = float(np.mean(control)), float(np.mean(other))
        pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
        se0 = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        p_value = 1.0 if se0 == 0 else float(2 * stats.norm.sf(abs(p2 - p1) / se0))
        se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
        low, high = p2 - p1 - 1.96 * se, p2 - p1 + 1.96 * se
        delta = max(abs(p2 - p1), 0.05)
        needed = (stats.norm.ppf(1 - alpha / 2) + _POWER_Z) ** 2 * (p1 * (1 - p1) + p2 * (1 - p2) or 0.01) / delta**2
    else:
        result = stats.ttest_ind(other, control, equal_var=False)
        p_value = 1.0 if math.isnan(result.pvalue) else float(result.pvalue)
        interval = result.confidence_interval(0.95)
        low, high = float(interval.low), float(interval.high)
        spread = float(np.var(control, ddof=1) + np.var(other, ddof=1)) or 1e-12
        delta = abs(float(np.mean(other) - np.mean(control))) or math.sqrt(spread)
        needed = (stats.norm.ppf(1 - alpha / 2) + _POWER_Z) ** 2 * spread / delta**2
    return {"p_value": p_value, "ci_low": low, "ci_high": high, "significant": p_value < alpha,
            "min_samples_per_variant": math.ceil(needed)}


def summary(name: str, d: dict[str, list[float]]) -> dict[str, Any]:
    n = len(d["ok"])
    return {"name": name, "requests": n, "success_rate": float(np.mean(d["ok"])) if n else None,
            "latency_p50_ms": float(np.percentile(d["latency"], 50)) if n else None,
            "latency_p95_ms": float(np.percentile(d["latency"], 95)) if n else None,
            "cost_per_request_usd": float(np.mean(d["cost"])) if n else None,
            "feedback_score": float(np.mean(d["feedback"])) if d["feedback"] else None,
            "feedback_count": len(d["feedback"]),
            "judge_score": float(np.mean(d["judge_score"])) if d.get("judge_score") else None,
            "judge_count": len(d.get("judge_score", []))}


def results(experiment: Experiment, data: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per-variant figures, each challenger against the control, and the winner when there is one."""
    empty: dict[str, list[float]] = {"ok": [], "latency": [], "cost": [], "feedback": [], "judge_score": []}
    control = experiment.variants[0].name
    base = data.get(control, empty)
    variants, candidates = [], []
    sign = -1 if experiment.metric in _LOWER_IS_BETTER else 1
    for variant in experiment.variants:
        d = data.get(variant.name, empty)
        row = summary(variant.name, d)
        if variant.name != control:
            test = compare(_values(base, experiment.metric), _values(d, experiment.metric), experiment.metric,
                           experiment.alpha)
            enough = min(len(base["ok"]), len(d["ok"])) >= experiment.min_samples
            row["vs_control"] = {**test, "enough_samples": enough}
            if test["significant"] and enough:
                diff = float(np.mean(_values(d, experiment.metric)) - np.mean(_values(base, experiment.metric)))
                candidates.append((sign * diff, variant.name))
        variants.append(row)
    better = [c for c in candidates if c[0] > 0]
    worse = [c for c in candidates if c[0] < 0]
    winner = max(better)[1] if better else (control if worse and len(worse) == len(experiment.variants) - 1
                                            else None)
    return {"object": "experiment.results", "experiment": experiment.id, "status": experiment.status,
            "metric": experiment.metric, "alpha": experiment.alpha, "control": control, "variants": variants,
            "winner": winner}


def evaluate(db: sqlite3.Connection, experiment_id: str) -> dict[str, Any]:
    """An experiment's results; a running one set to ``promote`` completes with a significant winner, whose
    template version (if it has one) becomes the active one."""
    experiment = experiments.get(db, experiment_id)
    result = results(experiment, rows_by_variant(db, experiment_id))
    winner = experiment.variant(result["winner"])
    if experiment.status == "running" and experiment.promote and winner is not None:
        experiments.transition(db, experiment_id, "complete", winner.name)
        if winner.template_version and experiment.template:
            templates.activate(db, experiment.template, winner.template_version)
        result["status"], result["promoted"] = "completed", True
    return result
