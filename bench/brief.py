"""``python -m bench.brief``: tokens spent with brief-then-expand answers versus full answers for all.

Workload: the questions of ``bench/data/brief_questions.txt`` (factual, how-to, explanation).
Each is asked two ways against ``tests.fake_upstream`` in its ``lengths="budget"`` mode, with the
requests built by ``serve_app.briefing`` exactly as the Gateway builds them:

- **full**: the question alone, with the full output budget (``--full-max-tokens``);
- **brief**: ``brief.instruction`` as a system message and the budget capped at
  ``brief.max_tokens``; then, for a share of the questions (``--expand-rate``, chosen with a fixed
  seed), the expand request: the question, the brief answer and ``brief.expand_instruction``,
  with the full budget again (what the conversation sends on expand).

Tokens are the upstream's usage (prompt + completion) summed over the workload. The fake's answer
length is synthetic: a share (50-100 %, set by a hash of the question) of ``max_tokens``, halved when
a system message asks for brevity. So the figure shows the mechanism's arithmetic (what a cap and an
expansion rate do to the tokens billed), not how long a real model's answers are.

Usage::

    python -m bench.brief
    python -m bench.brief --expand-rate 0.4 --full-max-tokens 1024
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import httpx

from serve_app.brief_config import BriefConfig
from serve_app.briefing import capped, with_expand_turn, with_instruction
from serve_app.protocol import ChatCompletionRequest, ChatMessage
from tests.fake_upstream import FakeUpstream

QUESTIONS = Path(__file__).parent / "data" / "brief_questions.txt"
RATES = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def load_questions(path: Path = QUESTIONS) -> list[str]:
    """The workload's questions (blank lines and ``#`` comments skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class Tokens:
    prompt: int = 0
    completion: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion

    def add(self, usage: dict[str, int]) -> None:
        self.prompt += usage["prompt_tokens"]
        self.completion += usage["completion_tokens"]


def send(client: httpx.Client, body: ChatCompletionRequest) -> tuple[str, dict[str, int]]:
    """One upstream call, as the remote engine makes it: the answer and its usage."""
    payload = {"model": "bench", "max_tokens": body.max_output_tokens(0),
               "messages": [{"role": m.role, "content": m.text()} for m in body.messages]}
    data = client.post("/chat/completions", json=payload).raise_for_status().json()
    return data["choices"][0]["message"]["content"], data["usage"]


def measure(questions: list[str], config: BriefConfig, full_max_tokens: int,
            base_url: str) -> tuple[list[dict[str, int]], list[dict[str, int]], list[dict[str, int]]]:
    """Per question: the full answer's usage, the brief answer's, and its expansion's."""
    full, brief, expand = [], [], []
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for question in questions:
            body = ChatCompletionRequest(model="bench", max_tokens=full_max_tokens,
                                         messages=[ChatMessage(role="user", content=question)])
            full.append(send(client, body)[1])
            short_body = with_instruction(capped(body, config.max_tokens), config.instruction)
            answer, usage = send(client, short_body)
            brief.append(usage)
            # Expand: the stored turns (the request's system instruction is not kept) plus the expand turn.
            history = body.model_copy(update={"messages": [*body.messages,
                                                           ChatMessage(role="assistant", content=answer)]})
            expand.append(send(client, with_expand_turn(history, config.expand_instruction))[1])
    return full, brief, expand


def totals(full: list[dict[str, int]], brief: list[dict[str, int]], expand: list[dict[str, int]],
           rate: float, seed: int) -> tuple[Tokens, Tokens, int]:
    """Tokens for full answers to all, and for brief answers with ``rate`` of them expanded."""
    n = len(full)
    expanded = set(random.Random(seed).sample(range(n), round(rate * n)))
    all_full, briefed = Tokens(), Tokens()
    for i in range(n):
        all_full.add(full[i])
        briefed.add(brief[i])
        if i in expanded:
            briefed.add(expand[i])
    return all_full, briefed, len(expanded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--expand-rate", type=float, default=0.25, help="share of brief answers expanded")
    parser.add_argument("--full-max-tokens", type=int, default=512, help="output budget of a full answer")
    parser.add_argument("--brief-max-tokens", type=int, default=BriefConfig().max_tokens)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    config = BriefConfig(max_tokens=args.brief_max_tokens)
    questions = load_questions()
    with FakeUpstream(lengths="budget", words=args.full_max_tokens).run_in_thread() as base_url:
        full, brief, expand = measure(questions, config, args.full_max_tokens, base_url)

    print(f"{len(questions)} questions; full budget {args.full_max_tokens} tokens, brief cap {config.max_tokens}; "
          f"synthetic answer lengths (tests.fake_upstream lengths=budget)")
    print(f"mean completion tokens: full {sum(u['completion_tokens'] for u in full) / len(full):.1f}, "
          f"brief {sum(u['completion_tokens'] for u in brief) / len(brief):.1f}, "
          f"expansion {sum(u['completion_tokens'] for u in expand) / len(expand):.1f}")
    print("| expanded | full: total (completion) | brief+expand: total (completion) | saved total | saved completion |")
    print("|---|---|---|---|---|")
    for rate in sorted({*RATES, args.expand_rate}):
        all_full, briefed, k = totals(full, brief, expand, rate, args.seed)
        mark = " **" if rate == args.expand_rate else ""
        print(f"| {k}/{len(full)} ({rate:.0%}){mark} | {all_full.total} ({all_full.completion}) | "
              f"{briefed.total} ({briefed.completion}) | {all_full.total - briefed.total} "
              f"({1 - briefed.total / all_full.total:.1%}) | {1 - briefed.completion / all_full.completion:.1%} |")
    all_full, briefed, k = totals(full, brief, expand, args.expand_rate, args.seed)
    print(f"\nAt {args.expand_rate:.0%} expanded ({k} of {len(full)}): {all_full.total - briefed.total} tokens saved "
          f"of {all_full.total} ({1 - briefed.total / all_full.total:.1%}).")


if __name__ == "__main__":
    main()
