"""``raygate eval``: compare a base model with base + LoRA adapter before serving the adapter.

Two views, written to one Markdown or HTML report:

* validation loss and perplexity of both on the held-out split, on the assistant's
  tokens only (what the adapter was trained to produce), token-weighted over the file;
* greedy answers of both to a list of questions, side by side, for a human to judge.

The adapter is loaded once on top of the base model; peft's ``disable_adapter()``
gives the base model's numbers from the same weights, so memory holds one model.
torch, transformers and peft are imported inside functions: importing this module
(as ``raygate``'s parser does) stays cheap.
"""

from __future__ import annotations

import functools
import html
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, Field, PositiveInt, field_validator

from serve_app.config_base import BaseConfig
from training.chat_data import IGNORE_INDEX, encode_example, load_conversations

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EvalConfig",
    "EvalResult",
    "Generation",
    "LossStats",
    "evaluate",
    "render_report",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_SUFFIXES = (".md", ".html")
T = TypeVar("T")


class EvalConfig(BaseConfig):
    """What to compare and where to write the report."""

    base_model: Path = Field(description="Dir of the base model (transformers format).")
    adapter: Path = Field(description="Dir of the adapter (peft save_pretrained output).")
    validation_file: Path = Field(description="Held-out JSONL; each line {'messages': [...]} ends with the assistant.")
    questions: list[str] | Path = Field(
        default_factory=list, description="Questions to answer side by side, or a file with one per line."
    )
    max_new_tokens: PositiveInt = Field(128, description="Cap on each generated answer, in tokens.")
    max_length: PositiveInt = Field(1024, description="Validation examples are cut to this many tokens.")
    output: Path | None = Field(None, description="Report path, '.md' or '.html'; None writes no file.")

    @field_validator("output")
    @classmethod
    def _check_suffix(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix.lower() not in REPORT_SUFFIXES:
            raise ValueError(f"the report must end in {' or '.join(REPORT_SUFFIXES)}, not {value.suffix or 'nothing'!r}")
        return value

    def question_list(self) -> list[str]:
        """The questions, read from the file when ``questions`` is a path (blank lines skipped)."""
        if isinstance(self.questions, Path):
            lines = self.questions.read_text(encoding="utf-8").splitlines()
            return [line.strip() for line in lines if line.strip()]
        return list(self.questions)


class LossStats(BaseModel):
    """One model's numbers on the validation split."""

    loss: float = Field(description="Mean cross-entropy per assistant token (nats).")
    perplexity: float = Field(description="exp(loss).")


class Generation(BaseModel):
    """One question's greedy answers."""

    question: str
    base: str
    adapter: str


class EvalResult(BaseModel):
    """The comparison, as written to the report."""

    base_model: str
    adapter: str
    validation_file: str
    examples: int = Field(description="Validation examples scored (those with assistant tokens left after cutting).")
    tokens: int = Field(description="Assistant tokens scored.")
    base: LossStats
    tuned: LossStats = Field(description="Base + adapter.")
    generations: list[Generation] = Field(default_factory=list)
    output: str | None = Field(None, description="Where the report was written.")


def validation_loss(model: PreTrainedModel, examples: list[tuple[list[int], list[int]]]) -> tuple[LossStats, int]:
    """Token-weighted mean loss over the labelled tokens of ``examples``; also their count.

    Raises:
        ValueError: no example has a labelled token.
    """
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for input_ids, labels in examples:
            logits = model(input_ids=torch.tensor([input_ids], device=model.device)).logits[0, :-1]
            targets = torch.tensor(labels[1:], device=model.device)
            total += F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum").item()
            count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise ValueError("no validation example has assistant tokens within max_length")
    loss = total / count
    return LossStats(loss=loss, perplexity=math.exp(loss)), count


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, max_new_tokens: int) -> str:
    """The greedy answer to one user message, stopped at eos."""
    import torch

    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    input_ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return str(tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True)).strip()


def evaluate(config: EvalConfig) -> EvalResult:
    """Score base and base + adapter, generate answers, write the report if asked.

    Args:
        config: what to compare.

    Returns:
        The numbers and answers; ``output`` set when a report was written.

    Raises:
        ValueError: an invalid validation file, or nothing in it to score.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    base = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32).to(device)
    model = PeftModel.from_pretrained(base, config.adapter).eval()
    encoded = [encode_example(tokenizer, chat, config.max_length) for chat in load_conversations(config.validation_file)]
    examples = [(e["input_ids"], e["labels"]) for e in encoded if e is not None]

    def both(run: Callable[[], T]) -> tuple[T, T]:
        # The same weights with the adapter switched off, then on.
        with model.disable_adapter():
            before = run()
        return before, run()

    (base_stats, tokens), (tuned_stats, _) = both(functools.partial(validation_loss, model, examples))
    generations = []
    for question in config.question_list():
        answers = both(functools.partial(generate, model, tokenizer, question, config.max_new_tokens))
        generations.append(Generation(question=question, base=answers[0], adapter=answers[1]))
    result = EvalResult(
        base_model=str(config.base_model),
        adapter=str(config.adapter),
        validation_file=str(config.validation_file),
        examples=len(examples),
        tokens=tokens,
        base=base_stats,
        tuned=tuned_stats,
        generations=generations,
    )
    logger.info("Eval of %s: %s examples, loss %.4f -> %.4f", config.adapter, len(examples),
                base_stats.loss, tuned_stats.loss)
    if config.output is not None:
        result.output = str(write_report(result, config.output))
    return result


def write_report(result: EvalResult, path: Path) -> Path:
    """Write the report, in the format the suffix names (``.md`` or ``.html``); return ``path``."""
    fmt = "html" if path.suffix.lower() == ".html" else "md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(result, fmt), encoding="utf-8")
    return path


def render_report(result: EvalResult, fmt: str = "md") -> str:
    """The report as Markdown (``"md"``) or a standalone HTML page (``"html"``).

    Every model-written or user-written string is escaped: answers can hold ``|``,
    newlines or ``<script>``, and must not break the table or run in a browser.
    """
    rows = [
        ("base", result.base),
        ("base + adapter", result.tuned),
    ]
    if fmt == "html":
        return _render_html(result, rows)
    cell = _md_cell
    lines = [
        "# Adapter evaluation",
        "",
        f"- Base model: {cell(result.base_model)}",
        f"- Adapter: {cell(result.adapter)}",
        f"- Validation: {cell(result.validation_file)} ({result.examples} examples, {result.tokens} assistant tokens)",
        "",
        "| Model | Validation loss | Perplexity |",
        "|---|---:|---:|",
        *(f"| {name} | {stats.loss:.4f} | {stats.perplexity:.4f} |" for name, stats in rows),
        "",
        "## Generations (greedy)",
        "",
        "| # | Question | Base | Adapter |",
        "|---:|---|---|---|",
        *(f"| {i} | {cell(g.question)} | {cell(g.base)} | {cell(g.adapter)} |"
          for i, g in enumerate(result.generations, start=1)),
        "",
    ]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    """Escape text for one Markdown table cell: no raw HTML, no ``|``, no line breaks."""
    text = html.escape(text, quote=False).replace("\\", "\\\\").replace("|", "\\|")
    return "<br>".join(text.splitlines()) if text else " "


def _render_html(result: EvalResult, rows: list[tuple[str, LossStats]]) -> str:
    esc = html.escape
    stats_rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{stats.loss:.4f}</td><td>{stats.perplexity:.4f}</td></tr>" for name, stats in rows
    )
    gen_rows = "".join(
        f"<tr><td>{i}</td><td>{esc(g.question)}</td><td>{esc(g.base)}</td><td>{esc(g.adapter)}</td></tr>"
        for i, g in enumerate(result.generations, start=1)
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Adapter evaluation</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "vertical-align:top;white-space:pre-wrap}</style></head><body>\n"
        "<h1>Adapter evaluation</h1>\n<ul>"
        f"<li>Base model: {esc(result.base_model)}</li><li>Adapter: {esc(result.adapter)}</li>"
        f"<li>Validation: {esc(result.validation_file)} ({result.examples} examples, "
        f"{result.tokens} assistant tokens)</li></ul>\n"
        "<table><tr><th>Model</th><th>Validation loss</th><th>Perplexity</th></tr>"
        f"{stats_rows}</table>\n<h2>Generations (greedy)</h2>\n"
        "<table><tr><th>#</th><th>Question</th><th>Base</th><th>Adapter</th></tr>"
        f"{gen_rows}</table>\n</body></html>\n"
    )
