"""``python -m bench.injection``: precision and recall of the prompt-injection detector.

``bench/data/injection_eval.jsonl`` holds attacks and benign look-alikes ("ignore
the typo in my previous message", "what is a system prompt?", role-play for
language practice) in a dozen languages, written apart from the shipped attack list
(``deployments/data/injection_attacks.txt``) so the similarity check is measured on
prompts it has not seen. Printed: patterns alone, similarity alone per threshold,
and both together (what the Gateway runs), overall and per language; the missed
attacks and false alarms at the default settings.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from deployments.injection import chunks, load_attacks, match_patterns
from serve_app.guard_config import InjectionConfig

DATA = Path(__file__).parent / "data" / "injection_eval.jsonl"
THRESHOLDS = (0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85)


def scores(flags: list[bool], attack: list[bool]) -> tuple[float, float, int, int]:
    """(precision, recall, false positives, missed attacks)."""
    f, a = np.array(flags), np.array(attack)
    tp, fp, fn = int((f & a).sum()), int((f & ~a).sum()), int((~f & a).sum())
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), fp, fn


def similarities(rows: list[dict[str, Any]], config: InjectionConfig) -> list[float]:
    """Each prompt's highest chunk similarity to the known attacks (the detector's own chunking)."""
    from sentence_transformers import SentenceTransformer

    from deployments.embedder import default_model_path

    model = SentenceTransformer(default_model_path(), device="cpu")
    attacks = model.encode(load_attacks(None), normalize_embeddings=True)
    best = []
    for row in rows:
        pieces = chunks(row["text"], config.chunk_chars, config.max_chunks)
        best.append(float(np.max(model.encode(pieces, normalize_embeddings=True) @ attacks.T)))
    return best


def main() -> None:
    config = InjectionConfig()
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    attack = [r["label"] == "attack" for r in rows]
    print(f"{len(rows)} prompts: {sum(attack)} attacks, {len(rows) - sum(attack)} benign; "
          f"{len({r['lang'] for r in rows})} languages")
    patterns = [bool(match_patterns(r["text"])) for r in rows]
    sims = similarities(rows, config)
    print("| detector | threshold | precision | recall | false alarms | missed |")
    print("|---|---|---|---|---|---|")
    print("| patterns | – | %.3f | %.3f | %d | %d |" % scores(patterns, attack))
    for t in THRESHOLDS:
        print(f"| similarity | {t:.2f} | " + "%.3f | %.3f | %d | %d |" % scores([s >= t for s in sims], attack))
    for t in THRESHOLDS:
        both = [p or s >= t for p, s in zip(patterns, sims)]
        print(f"| both | {t:.2f} | " + "%.3f | %.3f | %d | %d |" % scores(both, attack))
    chosen = [p or s >= config.similarity_threshold for p, s in zip(patterns, sims)]
    print(f"\nper language, both at {config.similarity_threshold:.2f}: precision, recall, prompts")
    for lang, n in sorted(Counter(r["lang"] for r in rows).items()):
        idx = [i for i, r in enumerate(rows) if r["lang"] == lang]
        p, r, _, _ = scores([chosen[i] for i in idx], [attack[i] for i in idx])
        print(f"  {lang}: {p:.3f}, {r:.3f}, {n}")
    print("\nfalse alarms:")
    for i, row in enumerate(rows):
        if chosen[i] and not attack[i]:
            print(f"  [{row['lang']}/{row['kind']}] sim {sims[i]:.2f} {match_patterns(row['text'])}: {row['text'][:90]}")
    print("missed attacks:")
    for i, row in enumerate(rows):
        if attack[i] and not chosen[i]:
            print(f"  [{row['lang']}/{row['kind']}] sim {sims[i]:.2f}: {row['text'][:90]}")


if __name__ == "__main__":
    main()
