"""The dataset builder over a real ledger: each filter, PII scrubbing, dedup, the split, JSONL import, the CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pydantic import ValidationError

from deployments.ledger import FeedbackRecord, Ledger, RequestRecord
from deployments.privacy import Content
from serve_app.config import LedgerConfig
from training.cli import add_cli, run_cli
from training.dataset import DatasetConfig, DatasetReport, build_dataset, detect_language, read_ledger, scrub_pii

LONG = ("Tell me about the history of the old harbour town on the northern coast, how the fishermen built "
        "their first wooden houses near the cliffs, why the merchants later moved the market square closer "
        "to the lighthouse, which families ran the salt trade during the long winters, how the railway "
        "changed daily life after it reached the valley, what happened to the shipyards when steel replaced "
        "timber, and why so many young people left for the capital while the tourists slowly discovered "
        "the beaches, the narrow streets and the small museum beside the")


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def request(rid: str, who: str, at: float, messages: list[dict[str, Any]], answer: str | None, *,
            tenant: str = "acme", status: int = 200) -> RequestRecord:
    return RequestRecord(id=rid, created_at=at, tenant=tenant, user=who, key_id=f"k-{who}", requested_model="m",
                         model="m", status=status, content=Content(messages=messages, answer=answer))


# ann and zoe consented; carl never said (content kept by default consent); bob refused (nothing kept).
ROWS = [
    request("r1", "ann", 1000, [user("What is the capital of France?")],
            "Paris has been the capital of France since 987 and still is in 2024. (ref r1)"),
    request("r2", "ann", 1001, [
        user("Hi, my name is John Smith. You can reach me at john.smith@example.com or +33 6 12 34 56 78."),
        {"role": "assistant", "content": "Thanks, how can I help you today?"},
        user("What is the weather like in Paris in spring?")], "Spring in Paris is mild, Mr. Smith. (ref r2)"),
    request("r3", "ann", 1002, [user("Bonjour, je m'appelle Marie Dupont. Comment est-ce que je peux renouveler "
                                     "mon passeport ? Mon numéro est le 06 12 34 56 78.")],
            "Vous pouvez le renouveler en ligne sur le site officiel. (ref r3)"),
    request("r4", "ann", 1003, [user("  what is the Capital of   France? ")],  # r1 up to case and spaces
            "Paris has been the capital of France since 987 and still is in 2024. (ref r1)"),
    request("r5", "ann", 1004, [user(LONG + " river.")], "It is a long story. (ref r5)"),
    request("r6", "ann", 1005, [user(LONG + " church.")], "It is a long story. (ref r5)"),  # r5, one word off
    request("r7", "ann", 1006, [user("Summarise this document please.")], "partial (ref r7)", status=500),
    request("r8", "ann", 1007, [user("Hello, is anyone there?")], None),
    request("r9", "carl", 1008, [user("How do I reset my password?")], "Use the reset link. (ref r9)"),
    request("r10", "zoe", 1009, [user("Please explain how photosynthesis works in plants.")],
            "Plants turn light, water and carbon dioxide into sugar. (ref r10)", tenant="globex"),
    request("r11", "bob", 1010, [user("bob-private-question")], "bob-private-answer (ref r11)"),
]
FEEDBACK = [("r1", "ann", 5, "up"), ("r2", "ann", 4, "up"), ("r3", "ann", 2, "down"), ("r9", "carl", 5, "up"),
            ("r10", "zoe", None, "up")]
BASE_REMOVED = {"no_answer": 1, "consent_only": 1, "status": 1}  # r8, r9, r7


@pytest_asyncio.fixture(scope="module")
async def data_dir(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Path]:
    """A data dir whose ledger stays open for writing, as under a running gateway."""
    root = tmp_path_factory.mktemp("raygate-data")
    ledger = Ledger(LedgerConfig(default_consent=True), str(root))
    for tenant, who, consent in (("acme", "ann", True), ("globex", "zoe", True), ("acme", "bob", False)):
        await ledger.set_consent(tenant, who, consent, "admin-key")
    await ledger.record(ROWS)
    for rid, who, rating, thumbs in FEEDBACK:
        assert await ledger.record_feedback(FeedbackRecord(request_id=rid, key_id=f"k-{who}", rating=rating,
                                                           thumbs=thumbs))
    yield root
    ledger.db.close()


def build(data_dir: Path, out: Path, jsonl: list[Path] | None = None, *, ledger: bool = True,
          **config: Any) -> tuple[DatasetReport, list[str], list[str]]:
    report = build_dataset(DatasetConfig(**config), out, ledger_path=data_dir / "ledger.sqlite3" if ledger else None,
                           jsonl_paths=jsonl or [])
    return report, *((out / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
                     for split in ("train", "validation"))


def refs(lines: list[str]) -> set[str]:
    return {ref for line in lines for ref in re.findall(r"\(ref (r\d+)\)", line)}


@pytest.mark.parametrize(("config", "removed", "kept"), [
    ({}, BASE_REMOVED, {"r1", "r2", "r3", "r5", "r10"}),
    ({"consent_only": False}, {"no_answer": 1, "status": 1}, {"r1", "r2", "r3", "r5", "r9", "r10"}),
    ({"min_rating": 4}, {**BASE_REMOVED, "min_rating": 5}, {"r1", "r2"}),
    ({"thumbs_up_only": True}, {**BASE_REMOVED, "thumbs_up_only": 4}, {"r1", "r2", "r10"}),
    ({"min_turns": 2}, {**BASE_REMOVED, "min_turns": 6}, {"r2"}),
    ({"languages": ["fr"]}, {**BASE_REMOVED, "languages": 6}, {"r3"}),
    ({"languages": ["en", "de"]}, {**BASE_REMOVED, "languages": 1}, {"r1", "r2", "r5", "r10"}),
    ({"tenant": "globex"}, {**BASE_REMOVED, "tenant": 6}, {"r10"}),
    ({"since": 1004, "until": 1006}, {**BASE_REMOVED, "since": 4, "until": 1}, {"r5"}),
])
def test_each_filter_removes_exactly_its_rows(data_dir: Path, tmp_path: Path, config: dict[str, Any],
                                              removed: dict[str, int], kept: set[str]) -> None:
    report, train, validation = build(data_dir, tmp_path, **config)
    assert report.sources == {"ledger": 10}  # bob refused consent: his content was never stored
    assert {k: n for k, n in report.removed.items() if n} == removed
    assert refs(train + validation) == kept
    assert report.examples_in == sum(report.removed.values()) + sum(report.duplicates.values()) + len(kept)
    assert report.examples_out == len(train) + len(validation) == len(kept)


def test_pii_is_replaced_and_counted(data_dir: Path, tmp_path: Path) -> None:
    report, train, validation = build(data_dir, tmp_path)
    text = "\n".join(train + validation)
    assert report.pii == {"email": 1, "phone": 2, "name": 3}
    for secret in ("john.smith@example.com", "John", "Smith", "Marie", "Dupont", "12 34 56 78"):
        assert secret not in text
    for kept in ("my name is [NAME]", "at [EMAIL] or [PHONE]", "je m'appelle [NAME]", "le [PHONE]", "Mr. [NAME]",
                 "since 987 and still is in 2024"):
        assert kept in text


@pytest.mark.parametrize(("text", "scrubbed", "kinds"), [
    ("mail a.b+c@mail.example.org now", "mail [EMAIL] now", {"email": 1}),
    ("+1 (555) 123-4567 or 0044 20 7946 0958", "[PHONE] or [PHONE]", {"phone": 2}),
    ("06.12.34.56.78, 020 7946 0958, 555-123-4567", "[PHONE], [PHONE], [PHONE]", {"phone": 3}),
    ("In 2024 we sold 12345 units on 2024-01-15 (v1.2.3), 3 of 10, score +3 12 15", None, {}),
    ("I'm Alice, Dr. Watson and Frau Müller say hi", "I'm [NAME], Dr. [NAME] and Frau [NAME] say hi", {"name": 3}),
    ("the name is not capitalised: my name is bob", None, {}),
])
def test_scrubber_formats(text: str, scrubbed: str | None, kinds: dict[str, int]) -> None:
    out, counts = scrub_pii(text)
    assert out == (text if scrubbed is None else scrubbed)
    assert dict(counts) == kinds


def test_language_detection() -> None:
    assert detect_language("What is the capital of France?") == "en"
    assert detect_language("Bonjour, comment est-ce que je peux changer mon mot de passe ?") == "fr"
    assert detect_language("¿Cómo está el tiempo? Hola y gracias") == "es"
    assert detect_language("Ich bin nicht sicher, wie das funktioniert") == "de"
    assert detect_language("12345 ???") is None


def test_exact_and_near_duplicates_are_counted(data_dir: Path, tmp_path: Path) -> None:
    report, train, validation = build(data_dir, tmp_path)
    assert report.duplicates == {"exact": 1, "near": 1}
    assert sum("capital of France" in line for line in train + validation) == 1
    assert sum("harbour town" in line for line in train + validation) == 1
    loose, train, validation = build(data_dir, tmp_path / "loose", near_duplicate_threshold=0.99)
    assert loose.duplicates == {"exact": 1, "near": 0}
    assert sum("harbour town" in line for line in train + validation) == 2


def chats(n: int, prefix: str = "topic") -> list[dict[str, Any]]:
    return [{"messages": [user(f"Question about {prefix} number {i}: what do you think of {prefix} {i * 7}?"),
                          {"role": "assistant", "content": f"Answer {i} on {prefix}."}]} for i in range(n)]


def write_jsonl(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return path


def test_split_is_deterministic_order_independent_and_disjoint(tmp_path: Path) -> None:
    examples = chats(200)
    shuffled = examples[:]
    random.Random(1).shuffle(shuffled)
    first = build(tmp_path, tmp_path / "a", [write_jsonl(tmp_path / "a.jsonl", examples)], ledger=False,
                  validation_fraction=0.2)
    again = build(tmp_path, tmp_path / "b", [write_jsonl(tmp_path / "a.jsonl", examples)], ledger=False,
                  validation_fraction=0.2)
    reordered = build(tmp_path, tmp_path / "c", [write_jsonl(tmp_path / "c.jsonl", shuffled)], ledger=False,
                      validation_fraction=0.2)
    assert first[1:] == again[1:] == reordered[1:]
    assert first[0].dataset_hash == reordered[0].dataset_hash
    report, train, validation = first
    assert not set(train) & set(validation) and len(set(train + validation)) == 200
    assert 20 <= report.validation <= 60 and report.train + report.validation == 200
    stats = json.loads((tmp_path / "a" / "stats.json").read_text())
    files = (tmp_path / "a" / "train.jsonl").read_bytes() + (tmp_path / "a" / "validation.jsonl").read_bytes()
    assert stats["dataset_hash"] == hashlib.sha256(files).hexdigest() == report.dataset_hash
    reseeded = build(tmp_path, tmp_path / "d", [tmp_path / "a.jsonl"], ledger=False, validation_fraction=0.2, seed=1)
    assert set(reseeded[2]) != set(validation)


def test_a_small_dataset_still_gets_one_validation_example(tmp_path: Path) -> None:
    report, train, validation = build(tmp_path, tmp_path / "out", [write_jsonl(tmp_path / "x.jsonl", chats(3))],
                                      ledger=False, validation_fraction=0.01)
    assert (report.train, report.validation) == (2, 1)
    one, _, _ = build(tmp_path, tmp_path / "one", [write_jsonl(tmp_path / "y.jsonl", chats(1))], ledger=False)
    assert (one.train, one.validation) == (1, 0)


def test_external_jsonl_is_validated_scrubbed_and_deduplicated_with_the_ledger(data_dir: Path, tmp_path: Path) -> None:
    good = {"messages": [{"role": "system", "content": "Be brief."}, user("Write to me at zed@example.net"),
                         {"role": "assistant", "content": "Done."}]}
    ledger_copy = {"messages": [user("What is the capital of France?"), {"role": "assistant", "content":
                   "Paris has been the capital of France since 987 and still is in 2024. (ref r1)"}]}
    path = write_jsonl(tmp_path / "external.jsonl", [
        good, "{not json", {"conversation": []}, "", {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [user("hi"), {"role": "assistant", "content": 3}]}, {"messages": [user("no answer")]},
        ledger_copy])
    report, train, validation = build(data_dir, tmp_path / "out", [path])
    assert report.sources == {"ledger": 10, str(path): 2}
    assert [(i.line, i.error) for i in report.invalid_lines] == [
        (2, "not JSON: Expecting property name enclosed in double quotes"),
        (3, 'expected {"messages": [...]} with at least one message'),
        (5, "message 1: role must be one of system, user, assistant"),
        (6, "message 2: content must be a string"),
        (7, "the last message must be the assistant's")]
    assert report.duplicates["exact"] == 2  # r4 and the JSONL copy of r1
    assert report.pii["email"] == 2
    text = "\n".join(train + validation)
    assert "Write to me at [EMAIL]" in text and "zed@example.net" not in text
    markdown = report.to_markdown()
    assert "## Invalid lines" in markdown and "| 7 | the last message must be the assistant's |" in markdown


def test_config_refuses_what_it_cannot_do() -> None:
    for bad in ({"languages": ["xx"]}, {"languages": []}, {"since": 10, "until": 5}, {"validation_fraction": 1.0},
                {"min_turns": 0}, {"min_rating": 6}, {"no_such_option": True}):
        with pytest.raises(ValidationError):
            DatasetConfig(**bad)


def test_missing_or_old_ledgers_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_ledger(tmp_path / "absent.sqlite3", DatasetConfig())
    import sqlite3

    sqlite3.connect(tmp_path / "old.sqlite3").execute("CREATE TABLE requests (id TEXT)").connection.close()
    with pytest.raises(ValueError, match="no stored conversations"):
        read_ledger(tmp_path / "old.sqlite3", DatasetConfig())


async def test_text_parts_are_joined_and_other_content_is_skipped(tmp_path: Path) -> None:
    ledger = Ledger(LedgerConfig(), str(tmp_path))
    await ledger.set_consent("acme", "ann", True, "admin-key")
    parts = [{"type": "text", "text": "Describe the sea"}, {"type": "text", "text": "in two words."}]
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    await ledger.record([request("p1", "ann", 1, [{"role": "user", "content": parts}], "Blue, vast."),
                         request("p2", "ann", 2, [{"role": "user", "content": image}], "A cat."),
                         request("p3", "ann", 3, [{"role": "tool", "content": "42"}], "The answer.")])
    ledger.db.close()
    report, train, validation = build(tmp_path, tmp_path / "out")
    assert report.removed["unsupported"] == 2
    assert [json.loads(line)["messages"] for line in train + validation] == [
        [user("Describe the sea\nin two words."), {"role": "assistant", "content": "Blue, vast."}]]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="raygate")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["dataset", "build", *argv])


def test_cli_builds_and_prints_the_report(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ds"
    args = parse("--data-dir", str(data_dir), "--out", str(out), "--languages", "en,fr", "--min-rating", "4",
                 "--since", "1970-01-01T00:16:40", "--val-fraction", "0.5", "--seed", "3")
    assert run_cli(args) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"] | {} == {**DatasetConfig().model_dump(), "languages": ["en", "fr"], "min_rating": 4,
                                    "since": 1000.0, "validation_fraction": 0.5, "seed": 3}
    assert stats["examples_out"] == 2 and stats["removed"]["min_rating"] == 5
    files = (out / "train.jsonl").read_bytes() + (out / "validation.jsonl").read_bytes()
    assert stats["dataset_hash"] == hashlib.sha256(files).hexdigest()
    assert (out / "stats.md").read_text().startswith("# Dataset report")
    printed = capsys.readouterr().out
    assert "Dataset report" in printed and stats["dataset_hash"] in printed
    monkeypatch.setenv("RAYGATE_DATA_DIR", str(data_dir))
    assert run_cli(parse("--no-consent-only", "--thumbs-up-only")) == 0
    [made] = (data_dir / "datasets").iterdir()
    assert json.loads((made / "stats.json").read_text())["examples_out"] == 4  # r1, r2, r9, r10


def test_cli_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(parse("--data-dir", str(tmp_path), "--out", str(tmp_path / "o"))) == 1
    assert "no ledger" in capsys.readouterr().err
    assert run_cli(parse("--data-dir", str(tmp_path), "--val-fraction", "1.5")) == 2
    jsonl = write_jsonl(tmp_path / "x.jsonl", chats(4))
    assert run_cli(parse("--data-dir", str(tmp_path), "--out", str(tmp_path / "j"), "--jsonl", str(jsonl))) == 0
    assert json.loads((tmp_path / "j" / "stats.json").read_text())["examples_out"] == 4
