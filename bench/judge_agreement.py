"""``python -m bench.judge_agreement``: how well a judge model agrees with human scores.

Runs a judge (any OpenAI-compatible ``/chat/completions``: raygate itself, a provider, a
local server) over ``bench/data/judge_labels.jsonl`` (question/answer pairs with a human
score 1-5: good, mediocre and wrong answers), with raygate's judge prompt and default
rubric (``serve_app.judging``), and reports exact agreement, agreement within one point
and Spearman's rank correlation (scipy.stats) over the pairs the judge scored.

Usage::

    python -m bench.judge_agreement --base-url http://127.0.0.1:8000/v1 --model judge --api-key $KEY
    python -m bench.judge_agreement --base-url ... --model ... --api-key ... --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from scipy import stats

from serve_app.evaluation_config import DEFAULT_RUBRIC
from serve_app.judging import judge_messages, parse_verdict

LABELS = Path(__file__).parent / "data" / "judge_labels.jsonl"


def load(path: Path) -> list[dict[str, Any]]:
    """The labelled pairs: id, question, answer, human_score."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def judge(client: httpx.Client, model: str, question: str, answer: str, rubric: str,
          max_tokens: int) -> tuple[int | None, str | None]:
    """One verdict: (score, reason); (None, why) when the call fails or the reply has no score."""
    messages = [m.model_dump(include={"role", "content"}) for m in judge_messages(rubric, question, answer)]
    try:
        response = client.post("/chat/completions", json={"model": model, "messages": messages, "temperature": 0,
                                                          "max_tokens": max_tokens})
        response.raise_for_status()
        return parse_verdict(response.json()["choices"][0]["message"]["content"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as exc:
        return None, f"call failed: {exc}"


def agreement(human: list[int], judged: list[int | None]) -> dict[str, Any]:
    """Exact and within-1 agreement and Spearman's rho over the scored pairs."""
    pairs = [(h, j) for h, j in zip(human, judged) if j is not None]
    n = len(pairs)
    rho = p_value = None
    if n >= 3 and len({h for h, _ in pairs}) > 1 and len({j for _, j in pairs}) > 1:
        result = stats.spearmanr([h for h, _ in pairs], [j for _, j in pairs])
        rho, p_value = float(result.statistic), float(result.pvalue)
    return {"pairs": len(human), "scored": n, "unscored": len(human) - n,
            "exact_agreement": sum(h == j for h, j in pairs) / n if n else None,
            "within_1_agreement": sum(abs(h - j) <= 1 for h, j in pairs) / n if n else None,
            "spearman_rho": rho, "spearman_p": p_value}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Agreement of a judge model with human scores.")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="the judge model")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--rubric-file", type=Path, default=None, help="default: raygate's default rubric")
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the per-pair verdicts and figures here")
    args = parser.parse_args(argv)
    rubric = args.rubric_file.read_text(encoding="utf-8") if args.rubric_file else DEFAULT_RUBRIC
    labels = load(args.labels)
    verdicts = []
    with httpx.Client(base_url=args.base_url.rstrip("/"), timeout=args.timeout_s,
                      headers={"Authorization": f"Bearer {args.api_key}"}) as client:
        for item in labels:
            score, reason = judge(client, args.model, item["question"], item["answer"], rubric, args.max_tokens)
            verdicts.append({"id": item["id"], "human": item["human_score"], "judge": score, "reason": reason})
    figures = agreement([v["human"] for v in verdicts], [v["judge"] for v in verdicts])
    print(f"judge {args.model} on {args.labels.name}: {figures['scored']}/{figures['pairs']} scored")
    for name in ("exact_agreement", "within_1_agreement", "spearman_rho", "spearman_p"):
        value = figures[name]
        print(f"  {name:20s} {'n/a' if value is None else f'{value:.3f}'}")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, **figures, "verdicts": verdicts}, indent=2) + "\n",
                             encoding="utf-8")
    return 0 if figures["scored"] else 1


if __name__ == "__main__":
    sys.exit(main())
