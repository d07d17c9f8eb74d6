"""Does a cached question ask the same thing as a new one? The semantic cache's second opinion.

Embedding similarity alone cannot tell "convert Celsius to Fahrenheit" from
"convert Fahrenheit to Celsius" (cosine 0.995 with all-MiniLM-L6-v2), nor 6,000
from 8,000 euros, nor "treat" from "prevent" mildew: on bench/data/cache_pairs.jsonl
no threshold gets past 0.55 precision. Those near-misses share a shape: the
question is the same but for one or two words, a number or the order of two words.
So a neighbour over the threshold is served only when

- its numbers, operators and roman numerals are the asked ones, in the same order; and
- its content words (fillers such as articles, auxiliaries and politeness aside; a
  typo of one edit or a plural is the same word) are the asked ones in the same
  order, or differ in more than ``small_edit_words`` words: a rewording, not a
  small edit of another question.

A paraphrase that changes one or two content words is missed; that is the price of
precision (measured in bench/RESULTS.md).
"""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+|[+\-*/×÷=<>^%√]")
_NUMBER = re.compile(r"\d")
_OPERATOR = re.compile(r"[+\-*/×÷=<>^%√]")
# Words whose presence or absence does not change a question: articles, auxiliaries of question
# forms, greetings and politeness. Deliberately short: pronouns, prepositions, negations and question
# words stay, because "between you and I / me" and "avec avoir / être" are different questions.
_FILLER = frozenset("""
a an the do does did can could would will please pls kindly thanks thank you hi hello hey just tell me
explain quick question is are was be actually exactly
le la les l un une des du de d est ce c qu s il vous plait svp merci bonjour salut pouvez pourriez peux
pourrais dire expliquer est-ce
el los las un una unos unas de del lo es por favor gracias hola puedes podrias podria decir explicar
der die das den dem des ein eine einen einem einer bitte danke hallo kannst konnen konntest sagen erklaren
mal ist
il lo gli una uno un di del della per favore grazie ciao puoi potresti dire spiegare e
o os as um uma de do da dos das favor obrigado obrigada ola pode poderia dizer explicar e
""".split())
_ROMAN = re.compile(r"^(?:ii|iii|iv|vi|vii|viii|ix|xi|xii)$")


def _fold(text: str) -> str:
    """Lower case without accents, so "équation" and "equation" are one word."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _close(a: str, b: str) -> bool:
    """The same word, a plural of it, or one typo (one edit) away when it is long enough to tell."""
    if a == b or a.rstrip("s") == b.rstrip("s"):
        return True
    if min(len(a), len(b)) < 5 or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i in range(len(a)) if a[i] != b[i]]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1
                                   and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]])
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def signature(text: str) -> tuple[list[str], list[str]]:
    """Return (numbers and operators, content words), in order."""
    tokens = _WORD.findall(_fold(text))
    exact = [t.replace(",", ".") for t in tokens if _is_exact(t)]
    return exact, [t for t in tokens if not _is_exact(t) and t not in _FILLER]


def _is_exact(token: str) -> bool:
    """Numbers, operators and roman numerals must match exactly ("World War II" is not "World War I")."""
    return bool(_NUMBER.match(token) or _OPERATOR.fullmatch(token) or _ROMAN.match(token))


def same_question(cached: str, asked: str, small_edit_words: int = 4) -> bool:
    """Whether ``asked`` may be served ``cached``'s answer (see the module docstring)."""
    exact_a, words_a = signature(cached)
    exact_b, words_b = signature(asked)
    if exact_a != exact_b:
        return False
    unmatched = list(range(len(words_b)))
    positions: list[int] = []
    for word in words_a:
        j = next((j for j in unmatched if _close(word, words_b[j])), None)
        if j is not None:
            positions.append(j)
            unmatched.remove(j)
    changed = len(words_a) - len(positions) + len(unmatched)
    if changed == 0:
        return positions == sorted(positions)  # the same words in another order: a swap
    return changed > small_edit_words
