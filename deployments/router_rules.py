"""The rule classifier: keyword and pattern cues per category and domain, in six languages, plus length.

Each category has cues; a request scores one point per cue it contains (two for the
strongest), and long requests lean to analysis. The best score wins when it leads
the runner-up by the configured margin; otherwise the rules say they cannot tell.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

_CUES: dict[str, list[str]] = {
    "simple_explanation": [
        r"^(what|who|when|where|which) (is|are|was|were|does|did)\b", r"\bdefine\b|\bdefinition\b|\bmeaning of\b",
        r"\bwhat does .{1,40} mean\b", r"^(qu'?est-ce qu|c'?est quoi|qui (est|etait|a)|quand|definis|definition)",
        r"^(que es|que son|quien (es|fue)|cuando|define)\b", r"^(was (ist|sind|bedeutet)|wer (ist|war)|wann)\b",
        r"^(cos'?e|che cos'?e|chi (e|era)|quando)\b", r"^(o que (e|sao)|quem (e|foi)|quando)\b",
        r"\bbriefly\b|\ben bref\b|\ben une phrase\b|\bin one sentence\b|\bkurz\b|\bbrevemente\b",
    ],
    "standard_exercise": [
        r"\b(solve|calculate|compute|convert|conjugate|translate|simplify|factor(i[sz]e)?|expand|balance|round)\b",
        r"\b(resous|resoudre|calcule[rz]?|convertis|convertir|conjugue[rz]?|tradui[st]|simplifie[rz]?|factorise[rz]?)\b",
        r"\b(resuelve|calcula|convierte|conjuga|traduce|simplifica)\b", r"\b(lose|berechne|konvertiere|"
        r"konjugiere|ubersetze|vereinfache)\b", r"\b(risolvi|calcola|converti|coniuga|traduci|semplifica)\b",
        r"\b(resolva|calcule|converta|conjugue|traduza|simplifique)\b",
        r"\b(write|ecris|escribe|schreibe|scrivi|escreva) (a|an|une?|una?|eine?) (function|query|sql|regex|"
        r"script|fonction|requete|funcion|consulta|funktion|abfrage|funzione|funcao)\b",
        r"\d+\s*[-+*/x×÷^]\s*\d+|=\s*\d|\d\s*=", r"\bexercise\b|\bexercice\b|\bejercicio\b|\bubung\b|\besercizio\b|\bexercicio\b",
    ],
    "complex_reasoning": [
        r"\b(prove|proof|derive|demonstrate that|show that)\b|\b(demontre[rz]?|prouve[rz]?|montre[rz]? que)\b",
        r"\b(demuestra|beweise|zeige, dass|dimostra|demonstre)\b", r"\bstep by step\b|\betape par etape\b|\bpaso a paso\b"
        r"|\bschritt fur schritt\b|\bpasso dopo passo\b|\bpasso a passo\b",
        r"\b(debug|bug|race condition|deadlock|memory leak|off-by-one|why does (my|this|the) .{0,40} (fail|crash))\b",
        r"\b(optimi[sz]e|plan|schedule|constraint|trade-?off|minimi[sz]e|maximi[sz]e)\b",
        r"\b(optimise[rz]?|planifie[rz]?|contrainte|minimise[rz]?|maximise[rz]?|diagnostic)\b",
        r"\bhow many ways\b|\bprobability that\b|\bcombien de facons\b|\bprobabilite que\b|\bwhy\b.{20,}\bbut\b",
        r"\bpourquoi\b.{20,}\bmais\b|\bwarum\b.{20,}\baber\b|\bpor que\b.{20,}\bpero\b",
    ],
    "deep_analysis": [
        r"\b(analy[sz]e|analysis|compare|contrast|discuss|evaluate|assess|critique|essay|in-depth|in depth)\b",
        r"\b(analyse[rz]?|compare[rz]?|discute[rz]?|evalue[rz]?|dissertation|commentaire|enjeux|critique)\b",
        r"\b(analiza|compara|discute|evalua|ensayo|analysiere|vergleiche|erortere|bewerte|aufsatz)\b",
        r"\b(analizza|confronta|discuti|valuta|saggio|analise|compare|discuta|avalie|ensaio)\b",
        r"\b(pros and cons|advantages and disadvantages|avantages et inconvenients|ventajas y desventajas|"
        r"vor- und nachteile|pro e contro|vantagens e desvantagens)\b",
        r"\b(strategy|strategie|estrategia|strategia|implications|consequences|long[- ]term|report|rapport)\b",
    ],
}
_DOMAIN_CUES: dict[str, list[str]] = {
    "poultry": [
        r"\b(poultry|hens?|chickens?|broilers?|pullets?|chicks?|roosters?|flocks?|coops?|laying hens|layers' feed)\b",
        r"\b(poules?|poulets?|volailles?|pondeuses?|poussins?|coqs?|poulaillers?|couvoir|aviculture|avicole)\b",
        r"\b(gallinas?|pollos?|aves de corral|avicola|huhner|huhn|geflugel|legehennen|galline|pollame|polli|"
        r"galinhas?|frangos?|aviario)\b",
        r"\b(newcastle|gumboro|marek|coccidiosis|coccidiose|avian influenza|influenza aviaire|grippe aviaire|"
        r"bronchite infectieuse|red mites?|pou rouge|egg drop|ponte)\b",
    ],
}
_COMPILED = {name: [re.compile(p) for p in patterns] for name, patterns in _CUES.items()}
_DOMAINS = {name: [re.compile(p) for p in patterns] for name, patterns in _DOMAIN_CUES.items()}
LONG_CHARS = 400


def fold(text: str) -> str:
    """Lower case without accents: one pattern serves "résous" and "resous"."""
    return "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c)).strip()


@dataclass
class RuleVerdict:
    """Scores per category, the winner when sure, and the cues that matched."""

    scores: dict[str, int] = field(default_factory=dict)
    category: str | None = None
    domain: str | None = None
    matched: list[str] = field(default_factory=list)


def classify_rules(text: str, margin: int) -> RuleVerdict:
    """Score the text's cues; name a category only when it leads by ``margin``."""
    folded = fold(text)
    verdict = RuleVerdict(scores={name: 0 for name in _COMPILED})
    for name, patterns in _COMPILED.items():
        for i, pattern in enumerate(patterns):
            if pattern.search(folded):
                verdict.scores[name] += 2 if i == 0 else 1
                verdict.matched.append(f"{name}:{i}")
    if len(folded) > LONG_CHARS:
        verdict.scores["deep_analysis"] += 1
        verdict.matched.append("length")
    ranked = sorted(verdict.scores.items(), key=lambda kv: -kv[1])
    if ranked[0][1] > 0 and ranked[0][1] - ranked[1][1] >= margin:
        verdict.category = ranked[0][0]
    verdict.domain = next((d for d, patterns in _DOMAINS.items() if any(p.search(folded) for p in patterns)), None)
    return verdict
