"""Prompt templates in a real ledger: seeding, versions, activation, rollback, diff, sandboxed rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments import templates
from deployments.ledger import Ledger
from deployments.templates import NewVersion, render
from serve_app.config import LedgerConfig
from serve_app.errors import InvalidRequestError, NotFoundError


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    return Ledger(LedgerConfig(), str(tmp_path))


async def test_seeded_from_the_prompts_dir(ledger: Ledger) -> None:
    names = {t["name"]: t for t in await ledger.store("templates.names")}
    assert {"tutor", "poultry_advisor", "exercise_coach"} <= set(names)
    assert names["tutor"]["active_version"] == 1
    tutor = await ledger.store("templates.get", "tutor")
    assert tutor.created_by == "seed:tutor.yaml" and "{{ subject }}" in tutor.body


async def test_versions_activate_rollback_and_diff(ledger: Ledger) -> None:
    await ledger.store("templates.add_version", "greeter", NewVersion(body="Hello {{ name }}."), "admin1")
    second = await ledger.store("templates.add_version", "greeter", NewVersion(body="Hi {{ name }}!"), "admin1")
    assert second.version == 2 and not second.active  # added, not yet in use
    assert (await ledger.store("templates.get", "greeter")).version == 1
    await ledger.store("templates.activate", "greeter", 2)
    assert (await ledger.store("templates.get", "greeter")).body == "Hi {{ name }}!"
    assert "-Hello {{ name }}." in await ledger.store("templates.diff", "greeter", 1, 2)
    back = await ledger.store("templates.rollback", "greeter")
    assert back.version == 1 and back.active
    with pytest.raises(InvalidRequestError, match="no earlier active version"):
        await ledger.store("templates.rollback", "greeter")
    assert [v.version for v in await ledger.store("templates.versions", "greeter")] == [1, 2]
    with pytest.raises(NotFoundError):
        await ledger.store("templates.activate", "greeter", 9)


async def test_a_bad_template_is_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidRequestError, match="syntax error") as raised:
        await ledger.store("templates.add_version", "broken", NewVersion(body="Hello {{ name "), "admin1")
    assert raised.value.code == "template_syntax"


def test_rendering_names_the_missing_variable() -> None:
    assert render("t", "Tutor for {{ level }} {{ subject }}.", {"level": "CM2", "subject": "maths"}) == \
        "Tutor for CM2 maths."
    with pytest.raises(InvalidRequestError) as raised:
        render("t", "Tutor for {{ level }} {{ subject }}.", {"level": "CM2"})
    assert raised.value.param == "variables.subject" and "'subject'" in str(raised.value)


@pytest.mark.parametrize("body", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ name.__class__.__base__.__subclasses__() }}",
])
def test_the_sandbox_stops_attribute_escapes(body: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        render("evil", body, {"name": "x"})
    assert raised.value.code in ("template_unsafe", "template_variable_missing", "template_render_error")
    assert raised.value.status_code == 400


def test_seed_skips_known_templates(tmp_path: Path) -> None:
    import sqlite3

    db = sqlite3.connect(":memory:")
    db.executescript(templates.SCHEMA)
    assert templates.seed(db) >= 3
    assert templates.seed(db) == 0
