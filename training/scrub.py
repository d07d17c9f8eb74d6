"""PII scrubbing and language detection for fine-tuning data: small, deterministic, no model.

``scrub_pii`` replaces emails, phone numbers and names that the text introduces ("my name
is", "je suis", "Dr.") with placeholders and counts them; ``detect_language`` tells chat
languages apart by their common short words.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable

__all__ = ["STOP_WORDS", "detect_language", "scrub_pii"]

# Common short words per language: cheap, deterministic and good enough to tell chat languages apart.
STOP_WORDS = {lang: frozenset(words.split()) for lang, words in {
    "en": "the and is are you what how of to with this that my it for can please does i your hello thanks",
    "fr": "le les et est vous je une des du pour dans pas qui comment mon ma avec sur suis ce nous bonjour merci",
    "es": "el los las y es por para con qué cómo mi del está soy hola gracias yo",
    "de": "der die das und ist ich nicht ein eine mit zu wie was mein sie bitte für",
    "it": "il lo gli è e di che non per sono mio della ciao grazie io",
    "pt": "o os as é não um uma do da em com você meu obrigado olá eu",
}.items()}

_EMAIL = re.compile(r"\b[\w.%+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}\b")
_PHONE = re.compile(r"""(?<![\w+])(?:
    (?:\+|00)[1-9]\d{0,2}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){1,4}  # +33 6 12 34 56 78, +1 (555) 123-4567
  | 0\d(?:[\s.-]?\d{2}){4}                                          # 06 12 34 56 78
  | \(\d{3}\)\s?\d{3}[\s.-]\d{4} | \d{3}(?P<sep>[.-])\d{3}(?P=sep)\d{4}  # (555) 123-4567, 555.123.4567
  | 0\d{2,4}[\s-]\d{3,4}[\s-]?\d{3,4}                               # 020 7946 0958, 030 1234567
)(?!\w)""", re.X)
_NAME_WORD = r"[A-ZÀ-ÖØ-Þ][a-zß-öø-ÿ]+"
_NAME = re.compile(
    r"(?P<lead>\b(?i:my name is|i am|i['’]m|call me|je m['’]appelle|je suis|me llamo|mi chiamo|ich heiße|ich bin"
    r"|meu nome é)[ \t]+|\b(?:Mr|Mrs|Ms|Dr|Prof|Mme|Mlle|Sr|Sra|Herr|Frau)\.?[ \t]+)"
    rf"{_NAME_WORD}(?:[ -]{_NAME_WORD})?")


def detect_language(text: str) -> str | None:
    """The language whose stop words occur most in ``text`` (ties go to the first listed); None if none occur."""
    words = Counter(re.findall(r"[^\W\d_]+", text.lower()))
    scores = {lang: sum(n for word, n in words.items() if word in stop) for lang, stop in STOP_WORDS.items()}
    best = max(scores, key=lambda lang: scores[lang])
    return best if scores[best] else None


def scrub_pii(text: str) -> tuple[str, Counter[str]]:
    """Replace emails, phone numbers and names with ``[EMAIL]``, ``[PHONE]``, ``[NAME]``.

    Names are only found where the text introduces them ("my name is", "je suis", "Dr."), so
    most names survive: the scrubber lowers the risk, it does not remove it.

    Returns:
        The scrubbed text and the number of replacements per kind.
    """
    counts: Counter[str] = Counter()

    def replace(kind: str, accept: Callable[[re.Match[str]], bool] = lambda m: True) -> Callable[[re.Match[str]], str]:
        def one(match: re.Match[str]) -> str:
            if not accept(match):
                return match.group(0)
            counts[kind] += 1
            return (match.groupdict().get("lead") or "") + f"[{kind.upper()}]"
        return one

    text = _EMAIL.sub(replace("email"), text)
    text = _PHONE.sub(replace("phone", lambda m: 8 <= sum(c.isdigit() for c in m.group(0)) <= 15), text)
    return _NAME.sub(replace("name"), text), counts
