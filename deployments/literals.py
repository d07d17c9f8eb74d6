"""Literal strings a regular expression's every match contains: a cheap gate before running it.

Python's ``re`` tries a pattern at every position of the text, so 55 injection patterns
cost ~55 us on a short prompt that none of them matches. Most patterns cannot match
without one of a few words (``ignore``, ``prompt``, ``system`` ...); a substring test
for those (a few hundred nanoseconds) decides that most patterns need not run at all.
The words come from the compiled pattern's own parse tree, so they cannot drift from it.
Callers test each word once per text (``contained``), not once per pattern that needs it.

The gate is exact only where ``str.lower()`` is ``re.IGNORECASE``'s folding: ASCII text
(``"ı"`` and ``"İ"`` match ``i`` under ``IGNORECASE``, ``"ſ"`` matches ``s``). Callers run
every pattern on other text.
"""

from __future__ import annotations

import re
from typing import Any

try:  # the parser ``re.compile`` uses (``sre_parse`` before Python 3.11)
    from re import _constants, _parser
except ImportError:  # pragma: no cover - a Python without it gets no gates, only slower scans
    _parser = None

MIN_LITERAL = 2  # a one-character literal is in almost every text: no gate


def required_literals(pattern: re.Pattern[str]) -> frozenset[str] | None:
    """Lowercase strings of which every match of ``pattern`` contains at least one; None if none is found."""
    if _parser is None:
        return None
    found = _required(_parser.parse(pattern.pattern, pattern.flags))
    return frozenset(found) if found else None


def contained(literals: frozenset[str], lowered: str | None) -> frozenset[str] | None:
    """Which of ``literals`` are in text whose lowercase (ASCII text only) is ``lowered``; None where not ASCII."""
    return None if lowered is None else frozenset([literal for literal in literals if literal in lowered])


def may_match(literals: frozenset[str] | None, found: frozenset[str] | None) -> bool:
    """Whether a pattern with these ``literals`` can match text that contains ``found`` (``contained``'s answer)."""
    return literals is None or found is None or not literals.isdisjoint(found)


def ascii_lower(text: str) -> str | None:
    """The text lowercased, where that is ``IGNORECASE``'s folding (ASCII text); None elsewhere."""
    return text.lower() if text.isascii() else None


def _required(items: Any) -> set[str] | None:
    """The most selective set of strings one of which every match of this sequence contains.

    A run of literal characters is in every match; so is one of a group's, a branch's
    (one set per alternative, joined) or a repeat's of at least one. Anything else
    (classes, ``\\b``, optional parts) only ends a run. The set whose shortest string is
    longest wins.
    """
    best: set[str] | None = None

    def offer(candidates: set[str] | None) -> None:
        nonlocal best
        if candidates and min(map(len, candidates)) >= MIN_LITERAL and (
                best is None or min(map(len, candidates)) > min(map(len, best))):
            best = candidates

    run: list[str] = []
    for op, arg in [*items, (None, None)]:
        if op is _constants.LITERAL:
            run.append(chr(arg).lower())
            continue
        offer({"".join(run)} if run else None)
        run = []
        if op is _constants.SUBPATTERN:
            offer(_required(arg[3]))
        elif op is _constants.BRANCH:
            alternatives = [_required(branch) for branch in arg[1]]
            offer(set().union(*alternatives) if all(alternatives) else None)
        elif op in (_constants.MAX_REPEAT, _constants.MIN_REPEAT) and arg[0] >= 1:
            offer(_required(arg[2]))
    return best
