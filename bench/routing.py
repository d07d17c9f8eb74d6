"""``python -m bench.routing``: how well each router classifier labels requests, and what routing saves.

``bench/data/routing/requests.jsonl`` holds 240 requests labelled with a category
(simple_explanation, standard_exercise, complex_reasoning, deep_analysis) and a
domain (poultry or general), in six languages; the embedding classifier's examples
(``deployments/data/routing_examples.jsonl``, 160) were written apart from them.
Printed per classifier (rules alone, where they are sure; embedding alone; both, the
default): accuracy, the confusion matrix, domain accuracy. Then the priced cost of
the routed traffic against sending everything to the premium model, with the example
tier table below and typical answer lengths per category.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from bench.retrieval import LocalEmbedder
from deployments.router import Router
from serve_app.placement import Placed
from serve_app.router_config import RouterConfig

DATA = Path(__file__).parent / "data" / "routing" / "requests.jsonl"
CATEGORIES = ["simple_explanation", "standard_exercise", "complex_reasoning", "deep_analysis"]
# USD per 1M input / output tokens, and the tier table priced here.
PRICES = {"small": (0.15, 0.60), "medium": (0.40, 1.60), "premium": (2.50, 10.00), "poultry-lora": (0.15, 0.60)}
TIERS = {"simple_explanation": "small", "standard_exercise": "small", "complex_reasoning": "medium",
         "deep_analysis": "premium"}
ANSWER_TOKENS = {"simple_explanation": 150, "standard_exercise": 300, "complex_reasoning": 700, "deep_analysis": 1200}


def cost(model: str, prompt_tokens: int, completion_tokens: int) -> float:
    price_in, price_out = PRICES[model]
    return (prompt_tokens * price_in + completion_tokens * price_out) / 1e6


async def evaluate(name: str, router: Router, rows: list[dict[str, str]]) -> list[str]:
    """Print accuracy and the confusion matrix; return the predicted categories."""
    predicted, domains, decided = [], 0, 0
    for row in rows:
        c = await router.classify(row["text"], use_cache=False)
        predicted.append(c.category)
        domains += c.domain == row["domain"]
        decided += c.classifier != "default"
    right = sum(p == r["category"] for p, r in zip(predicted, rows))
    print(f"\n### {name}: accuracy {right / len(rows):.3f} ({right}/{len(rows)}), domain accuracy "
          f"{domains / len(rows):.3f}, decided {decided}/{len(rows)} (the rest fell to the default category)")
    matrix = Counter((r["category"], p) for p, r in zip(predicted, rows))
    print("| true \\ predicted | " + " | ".join(CATEGORIES) + " |")
    print("|---" * (len(CATEGORIES) + 1) + "|")
    for truth in CATEGORIES:
        print(f"| {truth} | " + " | ".join(str(matrix[(truth, p)]) for p in CATEGORIES) + " |")
    return predicted


def priced(rows: list[dict[str, str]], predicted: list[str], domain_model: bool) -> None:
    """Cost of the routed traffic vs everything on the premium model."""
    routed = premium = 0.0
    for row, category in zip(rows, predicted):
        prompt, answer = len(row["text"]) // 4 + 30, ANSWER_TOKENS[row["category"]]
        model = "poultry-lora" if domain_model and row["domain"] == "poultry" else TIERS[category]
        routed += cost(model, prompt, answer)
        premium += cost("premium", prompt, answer)
    print(f"\npriced traffic ({len(rows)} requests; tiers {TIERS}{', poultry → poultry-lora' if domain_model else ''}):"
          f" routed ${routed:.4f} vs premium ${premium:.4f} = {routed / premium:.1%} of the cost")


async def main_async() -> None:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(f"{len(rows)} requests: {dict(Counter(r['category'] for r in rows))}; "
          f"{dict(Counter(r['domain'] for r in rows))}; {dict(Counter(r['lang'] for r in rows))}")
    embedder = Placed("Embedder", LocalEmbedder(), remote=False)
    url = "redis://127.0.0.1:1/0"  # never reached: the bench classifies without the cache
    results = {}
    for name, classifiers in (("rules", ["rules"]), ("embedding", ["embedding"]), ("rules + embedding", None)):
        config = RouterConfig(classifiers=classifiers) if classifiers else RouterConfig()
        router = Router(config, url, embedder)
        results[name] = await evaluate(name, router, rows)
        await router.close()
    priced(rows, results["rules + embedding"], domain_model=True)


if __name__ == "__main__":
    asyncio.run(main_async())
