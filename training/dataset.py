"""Fine-tuning datasets from the ledger: consenting users' conversations, filtered, scrubbed, deduplicated, split.

The ledger keeps message content only for users who consented (``deployments/privacy.py``).
``build_dataset`` reads those rows read-only (the gateway may keep writing), joins each with
its request's status, the user's feedback and the latest judge score (``deployments.evaluations``), keeps what ``DatasetConfig`` asks for, replaces
emails, phone numbers and detectable names with placeholders, drops exact and near duplicates,
and splits train/validation by a hash of each example: an example lands in the same split
whatever order it was read in, so the ``dataset_hash`` in ``stats.json`` (which the adapter
registry records) depends only on what the dataset holds. External JSONL in the same chat
format goes through the same steps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
import statistics
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, PositiveInt, computed_field, field_validator, model_validator

from deployments.evaluations import LATEST_SCORE_SQL
from serve_app.config_base import BaseConfig
from training.scrub import STOP_WORDS, detect_language, scrub_pii

__all__ = ["DatasetConfig", "DatasetReport", "InvalidLine", "LengthStats", "SourceRead", "build_dataset",
           "detect_language", "read_jsonl", "read_ledger", "scrub_pii"]

logger = logging.getLogger(__name__)

Messages = list[dict[str, str]]
ROLES = ("system", "user", "assistant")
# Order matters: a conversation is counted under the first step that removes it.
REMOVAL_STEPS = ("unsupported", "no_answer", "consent_only", "status", "tenant", "since", "until", "min_rating",
                 "thumbs_up_only", "min_judge_score", "min_turns", "languages")
class DatasetConfig(BaseConfig):
    """What goes into a dataset. Feedback, consent, status, tenant and time filters apply to ledger
    rows only (external JSONL carries none of that); turns and languages apply to every example."""

    min_rating: int | None = Field(None, ge=1, le=5, description="Keep answers rated at least this (1-5).")
    thumbs_up_only: bool = Field(False, description="Keep only answers given a thumbs up.")
    min_judge_score: int | None = Field(
        None, ge=1, le=5, description="Keep answers a judge model scored at least this (1-5; unjudged ones go).")
    min_turns: PositiveInt = Field(1, description="Keep conversations with at least this many user messages.")
    languages: list[str] | None = Field(
        None, min_length=1, description="Keep these detected languages (en, fr, es, de, it, pt).")
    consent_only: bool = Field(
        True, description="Keep only users with an explicit consent row; off also keeps default-consent content.")
    since: float | None = Field(None, description="Keep requests made at or after this epoch time (s).")
    until: float | None = Field(None, description="Keep requests made before this epoch time (s).")
    tenant: str | None = Field(None, description="Keep one tenant's requests.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of examples in the validation split.")
    seed: int = Field(0, description="Salts the split hash: another seed, another split.")
    near_duplicate_threshold: float = Field(
        0.9, gt=0, le=1, description="Jaccard similarity of word 3-shingles at which an example is a near duplicate.")

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        value = [lang.strip().lower() for lang in value]
        unknown = sorted(set(value) - set(STOP_WORDS))
        if unknown:
            raise ValueError(f"cannot detect {unknown}; known: {sorted(STOP_WORDS)}")
        return value

    @model_validator(mode="after")
    def _window(self) -> DatasetConfig:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise ValueError("since must be before until")
        return self


class InvalidLine(BaseModel):
    """A JSONL line that was not a valid chat example (reported, never fatal)."""

    source: str
    line: int
    error: str


class LengthStats(BaseModel):
    """Distribution of one length over the written examples."""

    min: int = 0
    mean: float = 0.0
    median: float = 0.0
    max: int = 0

    @classmethod
    def of(cls, values: list[int]) -> LengthStats:
        if not values:
            return cls()
        return cls(min=min(values), mean=round(statistics.fmean(values), 1), median=statistics.median(values),
                   max=max(values))


class DatasetReport(BaseModel):
    """What a build read, removed, replaced and wrote (``stats.json``)."""

    config: DatasetConfig
    sources: dict[str, int] = Field(description="Conversations read per source (ledger, each JSONL file).")
    examples_in: int
    removed: dict[str, int] = Field(description="Per filter, in REMOVAL_STEPS order; first failing filter counts.")
    invalid_lines: list[InvalidLine]
    pii: dict[str, int] = Field(description="Replacements per kind: email, phone, name.")
    duplicates: dict[str, int] = Field(description="Examples dropped as exact or near duplicates.")
    languages: dict[str, int] = Field(description="Detected language of the written examples' user messages.")
    lengths: dict[str, LengthStats] = Field(description="prompt/answer length in chars and words.")
    train: int
    validation: int
    dataset_hash: str = Field("", description="sha256 of train.jsonl's then validation.jsonl's bytes.")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def examples_out(self) -> int:
        """Examples written, both splits."""
        return self.train + self.validation

    def to_markdown(self) -> str:
        """The report as Markdown tables, for the CLI and ``stats.md``."""
        read = ", ".join(f"{name} {n}" for name, n in self.sources.items())
        lines = ["# Dataset report", "", "| Item | Value |", "|---|---|",
                 f"| Conversations read | {self.examples_in} ({read}) |",
                 f"| Invalid JSONL lines | {len(self.invalid_lines)} |",
                 f"| Examples written | {self.examples_out} (train {self.train}, validation {self.validation}) |",
                 f"| Dataset hash | `{self.dataset_hash}` |"]

        def table(title: str, head: str, rows: list[str]) -> None:
            lines.extend(["", f"## {title}", "", head, "|" + "---|" * head.count("|", 1)] + rows)

        table("Removed", "| Step | Examples |", [f"| {k} | {n} |" for k, n in self.removed.items() if n]
              + [f"| {k} duplicates | {n} |" for k, n in self.duplicates.items()])
        table("PII replaced", "| Kind | Count |", [f"| {k} | {n} |" for k, n in self.pii.items()])
        table("Languages", "| Language | Examples |", [f"| {k} | {n} |" for k, n in self.languages.items()])
        table("Lengths", "| | min | mean | median | max |",
              [f"| {k} | {s.min} | {s.mean} | {s.median} | {s.max} |" for k, s in self.lengths.items()])
        if self.invalid_lines:
            table("Invalid lines", "| Source | Line | Error |",
                  [f"| {i.source} | {i.line} | {i.error.replace('|', '/')} |" for i in self.invalid_lines])
        return "\n".join(lines) + "\n"


@dataclass
class SourceRead:
    """Conversations one source yielded, and what it dropped before the shared steps."""

    name: str
    conversations: list[Messages] = field(default_factory=list)
    read: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    invalid: list[InvalidLine] = field(default_factory=list)


def _text(content: Any) -> str | None:
    """A message's content as text: a string, or OpenAI's list of text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


def _chat(raw: Any) -> Messages | None:
    """Role/content messages, or None when a message is not plain system/user/assistant text."""
    if not isinstance(raw, list):
        return None
    messages = [{"role": m.get("role"), "content": _text(m.get("content"))} for m in raw if isinstance(m, dict)]
    if len(messages) != len(raw) or any(m["role"] not in ROLES or m["content"] is None for m in messages):
        return None
    return messages  # type: ignore[return-value]


_LEDGER_SQL = """
SELECT m.tenant, m.messages, m.answer, m.created_at, r.status, f.rating, f.thumbs, c.consent, {judge} FROM messages m
LEFT JOIN requests r ON r.id = m.request_id LEFT JOIN feedback f ON f.request_id = m.request_id
LEFT JOIN consent c ON c.tenant = m.tenant AND c.user = m.user ORDER BY m.created_at, m.request_id
"""


def read_ledger(path: Path, config: DatasetConfig) -> SourceRead:
    """Stored conversations that pass the ledger-only filters, each ending with its answer.

    The file is opened read-only, so a running gateway's Ledger keeps writing meanwhile.

    Raises:
        FileNotFoundError: no ledger at ``path``.
        ValueError: the file has no ``messages`` table (a ledger older than consent tracking).
    """
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not {"messages", "requests", "feedback", "consent"} <= tables:
            raise ValueError(f"{path} holds no stored conversations (tables: {sorted(tables)})")
        # A ledger older than evaluations has no judge scores.
        judge = LATEST_SCORE_SQL.format(id="m.request_id") if "evaluations" in tables else "NULL"
        rows = db.execute(_LEDGER_SQL.format(judge=judge)).fetchall()
    finally:
        db.close()
    result = SourceRead("ledger", read=len(rows))
    for tenant, stored, answer, created_at, status, rating, thumbs, consent, judge_score in rows:
        try:
            messages = _chat(json.loads(stored))
        except json.JSONDecodeError:
            messages = None
        checks = (
            ("unsupported", messages is None),
            ("no_answer", not answer),
            ("consent_only", config.consent_only and consent != 1),
            ("status", status is None or status >= 400),  # no request row: success unknown
            ("tenant", config.tenant is not None and tenant != config.tenant),
            ("since", config.since is not None and created_at < config.since),
            ("until", config.until is not None and created_at >= config.until),
            ("min_rating", config.min_rating is not None and (rating is None or rating < config.min_rating)),
            ("thumbs_up_only", config.thumbs_up_only and thumbs != "up"),
            ("min_judge_score", config.min_judge_score is not None
             and (judge_score is None or judge_score < config.min_judge_score)),
        )
        reason = next((name for name, failed in checks if failed), None)
        if reason is not None:
            result.removed[reason] += 1
        else:
            result.conversations.append([*messages, {"role": "assistant", "content": answer}])  # type: ignore[misc]
    return result


def _validate_line(raw: str) -> Messages:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from exc
    messages = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ValueError('expected {"messages": [...]} with at least one message')
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"message {number}: role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {number}: content must be a string")
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_jsonl(path: Path) -> SourceRead:
    """Examples from a ``{"messages": [...]}`` JSONL file; bad lines are reported with their number."""
    result = SourceRead(str(path))
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                result.conversations.append(_validate_line(raw.decode("utf-8")))
                result.read += 1
            except (UnicodeDecodeError, ValueError) as exc:
                error = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)
                result.invalid.append(InvalidLine(source=str(path), line=number, error=error))
    return result


def _normalised(messages: Messages) -> str:
    return json.dumps([[m["role"], " ".join(m["content"].lower().split())] for m in messages], ensure_ascii=False)


def _shingles(messages: Messages) -> set[str]:
    words = re.findall(r"\w+", " ".join(m["content"] for m in messages).lower())
    return {" ".join(words[i:i + 3]) for i in range(max(len(words) - 2, 1))} if words else set()


def _near_duplicates(sets: list[set[str]], threshold: float) -> set[int]:
    """Indexes of sets at least ``threshold``-Jaccard-similar to an earlier kept one.

    Prefix filtering (Bayardo et al., "Scaling up all pairs similarity search"): with shingles
    ordered rarest first, two sets that similar share a shingle among their first
    ``len - ceil(threshold * len) + 1``, so only those are indexed and compared.
    """
    frequency = Counter(s for shingles in sets for s in shingles)
    index: dict[str, list[int]] = defaultdict(list)
    dropped: set[int] = set()
    for i, shingles in enumerate(sets):
        ordered = sorted(shingles, key=lambda s: (frequency[s], s))
        prefix = ordered[:len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        candidates = {j for s in prefix for j in index[s]}
        if any(len(shingles & sets[j]) / len(shingles | sets[j]) >= threshold for j in candidates):
            dropped.add(i)
            continue
        for s in prefix:
            index[s].append(i)
    return dropped


def _split_key(messages: Messages, seed: int) -> float:
    """Where an example falls in [0, 1): a hash of it and the seed, so its split never depends on order."""
    canonical = json.dumps(messages, ensure_ascii=False, sort_keys=True)
    return int(hashlib.sha256(f"{seed}\x00{canonical}".encode()).hexdigest()[:16], 16) / 2**64


def build_dataset(config: DatasetConfig, out_dir: Path, *, ledger_path: Path | None = None,
                  jsonl_paths: Sequence[Path] = ()) -> DatasetReport:
    """Build ``train.jsonl``, ``validation.jsonl``, ``stats.json`` and ``stats.md`` in ``out_dir``.

    Args:
        config: what to keep, and the split.
        out_dir: created if missing; files in it are replaced.
        ledger_path: the ledger's SQLite file (``<data_dir>/ledger.sqlite3``); None reads no ledger.
        jsonl_paths: external ``{"messages": [...]}`` files, put through the same steps.

    Returns:
        The report, also written as ``stats.json`` (with ``dataset_hash``) and ``stats.md``.
    """
    reads = ([read_ledger(ledger_path, config)] if ledger_path is not None else []) + [
        read_jsonl(path) for path in jsonl_paths]
    removed = Counter({step: 0 for step in REMOVAL_STEPS})
    pii = Counter({"email": 0, "phone": 0, "name": 0})
    examples: list[tuple[float, Messages, str]] = []
    for read in reads:
        removed.update(read.removed)
        for messages in read.conversations:
            language = detect_language(" ".join(m["content"] for m in messages if m["role"] == "user"))
            if sum(m["role"] == "user" for m in messages) < config.min_turns:
                removed["min_turns"] += 1
                continue
            if config.languages is not None and language not in config.languages:
                removed["languages"] += 1
                continue
            scrubbed = []
            for m in messages:
                content, counts = scrub_pii(m["content"])
                pii.update(counts)
                scrubbed.append({"role": m["role"], "content": content})
            examples.append((_split_key(scrubbed, config.seed), scrubbed, language or "unknown"))
    examples.sort(key=lambda e: (e[0], _normalised(e[1])))  # sorted first, so dedup keeps the same one in any order
    first: dict[str, tuple[float, Messages, str]] = {}
    for example in examples:
        first.setdefault(_normalised(example[1]), example)
    unique = list(first.values())
    near = _near_duplicates([_shingles(e[1]) for e in unique], config.near_duplicate_threshold)
    kept = [e for i, e in enumerate(unique) if i not in near]
    cut = sum(e[0] < config.validation_fraction for e in kept)  # kept is sorted by key
    if config.validation_fraction > 0 and cut == 0 and len(kept) >= 2:
        cut = 1  # the lowest key: the example nearest to falling in anyway
    validation, train = kept[:cut], kept[cut:]
    report = DatasetReport(
        config=config, sources={r.name: r.read for r in reads}, examples_in=sum(r.read for r in reads),
        removed=dict(removed), invalid_lines=[i for r in reads for i in r.invalid], pii=dict(pii),
        duplicates={"exact": len(examples) - len(unique), "near": len(near)},
        languages=dict(Counter(e[2] for e in kept).most_common()),
        lengths=_lengths([e[1] for e in kept]), train=len(train), validation=len(validation))
    return _write(report, out_dir, [e[1] for e in train], [e[1] for e in validation])


def _lengths(examples: list[Messages]) -> dict[str, LengthStats]:
    prompts = ["\n".join(m["content"] for m in e[:-1]) for e in examples]
    answers = [e[-1]["content"] for e in examples]
    return {f"{name}_{unit}": LengthStats.of([len(t) if unit == "chars" else len(t.split()) for t in texts])
            for name, texts in (("prompt", prompts), ("answer", answers)) for unit in ("chars", "words")}


def _write(report: DatasetReport, out_dir: Path, train: list[Messages], validation: list[Messages]) -> DatasetReport:
    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = ["".join(json.dumps({"messages": e}, ensure_ascii=False) + "\n" for e in split).encode()
             for split in (train, validation)]
    (out_dir / "train.jsonl").write_bytes(blobs[0])
    (out_dir / "validation.jsonl").write_bytes(blobs[1])
    report.dataset_hash = hashlib.sha256(blobs[0] + blobs[1]).hexdigest()
    (out_dir / "stats.md").write_text(report.to_markdown(), encoding="utf-8")
    (out_dir / "stats.json").write_text(report.model_dump_json(indent=2), encoding="utf-8")  # last: marks it done
    logger.info("Dataset %s: %d train, %d validation examples in %s", report.dataset_hash[:12], report.train,
                report.validation, out_dir)
    return report
