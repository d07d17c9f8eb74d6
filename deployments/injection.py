"""Prompt-injection detection: patterns, plus embedding similarity to known attack prompts.

Two detectors, each naming the rule it matched:

- **patterns** (``pattern:<rule>``): regular expressions for instruction overrides,
  system-prompt extraction, role-play jailbreaks, fake role delimiters, data
  exfiltration and policy bypass, in English, French, Spanish, German, Italian and
  Portuguese. They run on the text as sent and on a de-obfuscated copy (spaced
  letters joined, leetspeak undone, base64 runs decoded).
- **embedding** (``similar:<n>``): each chunk of the user's text is compared with the
  shipped list of known attacks (``deployments/data/injection_attacks.txt``, plus an
  operator's own file); cosine similarity at or above the threshold flags it.

The Gateway runs it in process and reaches the Embedder only for the second one.
Precision and recall on bench/data/injection_eval.jsonl: bench.injection, bench/RESULTS.md.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deployments.literals import ascii_lower, contained, may_match, required_literals
from serve_app.errors import InvalidRequestError
from serve_app.guard_config import InjectionConfig
from serve_app.placement import Placed

logger = logging.getLogger(__name__)

SHIPPED_ATTACKS = Path(__file__).parent / "data" / "injection_attacks.txt"
CACHED_TEXT_CHARS = 4000  # longer texts are scanned each time: 4,096 of them would hold too much memory
_FLAGS = re.IGNORECASE | re.DOTALL
_NEAR = r".{0,60}?"
_RULES: dict[str, list[str]] = {
    "override": [
        r"\b(ignore|disregard|forget|skip|bypass|override|drop|cancel)\w*\b" + _NEAR +
        r"\b(previous|prior|above|earlier|preceding|all|any|your|the|initial|original|system)\b" + _NEAR +
        r"\b(instructions?|rules?|prompts?|directives?|guidelines?|constraints?|programming|guardrails?)\b",
        r"\b(ignor\w*|oubli\w*|ne tiens? pas compte|fais abstraction)\b" + _NEAR +
        r"\b(instructions?|consignes?|r[eè]gles?|directives?)\b",
        r"\b(ignor\w*|olvid\w*|omit\w*|haz caso omiso|desobedec\w*)\b" + _NEAR +
        r"\b(instrucciones|reglas|indicaciones|directrices|normas)\b",
        r"\b(ignorier\w*|vergiss\w*|missacht\w*|[üu]bergeh\w*)\b" + _NEAR +
        r"\b(anweisungen|regeln|vorgaben|richtlinien|instruktionen)\b",
        r"\b(ignor\w*|dimentic\w*|trascur\w*)\b" + _NEAR + r"\b(istruzioni|regole|direttive|indicazioni)\b",
        r"\b(ignor\w*|esque[cç]\w*|desconsider\w*)\b" + _NEAR + r"\b(instru[cç][õo]es|regras|diretrizes)\b",
        r"\b(new|updated|real)\s+(system\s+)?(instructions?|directives?|rules?)\s*(:|follow|supersede|override)",
        r"\b(disregard|forget|scratch|ignore|drop|oublie|olvida|vergiss|dimentica|esque[cç]a)\w*\b.{0,30}?"
        r"\b(everything|what|all|tout|ce qu|todo|lo que|alles|was|tutto|quello|tudo|o que)\b.{0,30}?"
        r"\b(told|given|said|instructed|dit|donn[ée]|dicho|dado|gesagt|gegeben|detto|dato|dito)\b",
        r"\b(negeer|zignoruj|игнорируй|проигнорируй|забудь)\w*|忽略|無視|تجاهل",
        r"(priority|supersedes?|takes?\s+precedence)\b.{0,40}?\b(guidance|instructions?|rules|guidelines)",
    ],
    "extraction": [
        r"\b(reveal|print|show|output|repeat|display|dump|leak|give|tell|write|paste|recite|share)\b" + _NEAR +
        r"\b(system\s*prompt|initial\s+(instructions?|prompt)|hidden\s+(instructions?|prompt)|(your|the)\s+"
        r"(instructions|prompt|guidelines)\s+(verbatim|word for word|exactly)|developer\s+message|pre-?prompt)",
        r"\b(affiche|r[ée]v[eè]le|montre|r[ée]p[eè]te|donne|recopie|imprime)\w*\b" + _NEAR +
        r"\b(prompt\s+syst[eè]me|instructions?\s+(initiales|cach[ée]es|syst[eè]me)|consignes?\s+(initiales|cach[ée]es|syst[eè]me))",
        r"\b(muestra|revela|repite|imprime|dime|copia)\w*\b" + _NEAR +
        r"\b(prompt\s+del\s+sistema|instrucciones\s+(iniciales|del\s+sistema|ocultas|originales))",
        r"\b(zeig|gib|verrat|wiederhol|nenn|druck)\w*\b" + _NEAR +
        r"\b(system-?prompt|systemanweisungen|anfangsanweisungen|versteckten\s+anweisungen|urspr[üu]nglichen\s+anweisungen)",
        r"\b(mostra|rivela|ripeti|stampa|dimmi)\w*\b" + _NEAR + r"\b(prompt\s+di\s+sistema|istruzioni\s+(iniziali|nascoste|di\s+sistema))",
        r"\b(mostr|revel|repit|imprim|diga)\w*\b" + _NEAR + r"\b(prompt\s+do\s+sistema|instru[cç][õo]es\s+(iniciais|ocultas|do\s+sistema))",
        r"\bprompt\s+(de|del)\s+sistema\b|\bsysteemprompt|\bprompt\s+systemowy|системн\w*\s+промпт|系统提示|システムプロンプト|موجّ?ه\s+النظام",
        r"\b(initial|original|hidden|secret|exact)\s+(instructions?|preamble|prompt|rules|configuration)\b",
        r"\b(repeat|print|copy|output|reproduce)\b.{0,30}?\b(everything|all|the\s+text|the\s+words)\b.{0,20}?\b(above|before)\b",
        r"\b(rules|instructions)\s+(you\s+have\s+been|you\s+were|you've\s+been)\s+given\b",
    ],
    "jailbreak": [
        r"(?-i:\bDAN\b)|\bdo anything now\b|\bjailbr(eak|oken)\w*",
        r"\b(no|without|free\s+from|removed|liberat\w*\s+da|zonder|sin|sans|ohne|senza|sem)\b.{0,25}?"
        r"\b(ethics|content\s+polic\w+|politiche|pol[ií]ticas\s+de\s+contenido|regels|ogni\s+regola)",
        r"\b(ethics|safety)\s+(module|filter|layer)s?\b.{0,30}?\b(removed|disabled|off)\b",
        r"开发者模式|没有任何限制|制限のない",
        r"\b(developer|god|debug|admin|sudo)\s+mode\s+(is\s+)?(now\s+)?(enabled|activated|on|unlocked)\b",
        r"\b(you\s+are|you're|act\s+as|pretend\s+to\s+be|become)\b" + _NEAR +
        r"\b(no|without|free\s+(of|from))\s+(any\s+)?(restrictions?|filters?|limits?|limitations?|rules?|censorship|guidelines?)",
        r"\b(unfiltered|uncensored|unrestricted)\s+(ai|mode|assistant|model|version|chatbot)\b",
        r"\b(sans|sin|ohne|senza|sem)\s+(aucune\s+|ninguna\s+|jegliche\s+|alcuna\s+|nenhuma\s+)?"
        r"(restrictions?|restricciones|einschr[äa]nkungen|restrizioni|restri[cç][õo]es|filtres?|filtros?|filter|filtri|censure|censura|zensur)",
    ],
    "delimiter": [
        r"</?\s*(system|sys|instructions?)\s*>|<\|\s*(im_start|im_end|system|endoftext)\s*\|>|\[/?INST\]|<<\s*/?SYS\s*>>",
        r"(^|\n)\s*#{2,}\s*(system|instruction|new\s+instructions?|admin)\b",
        r"[\"']role[\"']\s*:\s*[\"'](system|developer)[\"']",
        r"\b(end\s+of\s+(user\s+)?(input|prompt|conversation)|begin\s+(system|admin)\s+(prompt|message|instructions?))\b",
        r"\[\s*(system|syst[eè]me|sistema|systeem|admin)\s*\]|#{2,}\s*(syst[eè]me|sistema|systeem)\b",
        r"</?\s*(sistema|syst[eè]me|usuario|usu[aá]rio|utilisateur|user|assistant)\s*>",
        r"\b(end|fin|fine|fim|ende)\s+(of\s+|du\s+|del\s+|do\s+|des\s+)?(the\s+)?"
        r"(user|utilisateur|usuario|utente|usu[aá]rio|benutzer)\w*\s+(message|input|nachricht|mensaje|messaggio|mensagem)",
    ],
    "indirect": [
        r"\b(note|instruction|message|attention|hinweis|nota|instrucci[oó]n|instru[cç][ãa]o|attenzione|remarque)\w*"
        r"\s+(to|for|pour|para|an|per|à|al|a)?\s*(the\s+|l'|la\s+|den\s+|o\s+|el\s+|il\s+)?"
        r"(ai|ia|ki|assistant|assistente|asistente|assistent|llm|chatbot|model|mod[eè]le|modelo|modello)\b",
        r"\b(ai|ia|ki)[- ]?(agent|assistant|assistente|asistente|assistent)\w*\s*[:,]",
        r"\b(assistant|assistente|asistente)\s*[,:]\s*(do\s+not|don't|ignore|instead|ne\s+|no\s+|non\s+)",
        r"\b(hidden|secret)\s+instruction|instrucci[oó]n\s+oculta|instruction\s+cach[ée]e",
    ],
    "exfiltration": [
        r"!\[[^\]]*\]\(\s*https?://[^)\s]*[?&][^)\s]*=",
        r"\b(send|forward|post|upload|exfiltrate|email|transmit|leak)\w*\b" + _NEAR +
        r"\b(passwords?|credentials?|api\s*keys?|tokens?|conversation|chat\s+history|user\s+data|personal\s+data|secrets?)\b"
        + _NEAR + r"\b(to|at|via)\b",
        r"https?://\S*[?&]\w+=" + _NEAR + r"\b(conversation|history|messages?|password|dato|datos|donn[ée]es|dados|daten)",
        r"\b(conversation|history|messages?|dato|datos|donn[ée]es|dados)\b" + _NEAR + r"https?://\S*[?&]\w+=",
        r"\b(image|img|alt\s+text)\b.{0,60}?\b(previous\s+messages|conversation|chat\s+history)\b",
        r"\b(previous\s+messages|conversation|chat\s+history)\b.{0,60}?\b(image|img|alt\s+text)\b",
    ],
    "policy_bypass": [
        r"\b(pretend|imagine|suppose|assume|act\s+as\s+if)\b" + _NEAR +
        r"\b(no|without)\s+(rules|restrictions|policies|guidelines|content\s+polic\w+|safety)",
        r"\b(rules|policies|guidelines|restrictions)\s+(do\s+not|don't|no\s+longer)\s+apply\b",
        r"\bfor\s+(research|educational|academic|testing)\s+purposes\b" + _NEAR +
        r"\b(ignore|bypass|disable|without|no)\b" + _NEAR + r"\b(filters?|rules|restrictions|safety|guidelines|polic\w+)",
        r"\b(turn\s+off|disable|skip|lift|bypass|switch\s+off)\w*\b.{0,30}?"
        r"\b(filters?|safety|restrictions?|guidelines?|guardrails?|polic\w+)",
        r"\b(restrictions|rules|filters|guidelines)\s+(are|were|have\s+been)\s+(lifted|off|disabled|suspended)",
        r"\b(fais\s+comme\s+si|haz\s+como\s+si|finge\s+que|tu\s+so,?\s+als|fingi\s+che|finja\s+que|doe\s+alsof)\b"
        r".{0,60}?\b(r[eè]gles?|reglas|normas|regeln|regole|regras|politiche|pol[ií]ticas|regels|restri\w+)",
        r"\b(normas|reglas|r[eè]gles|regeln|regole|regras)\b.{0,20}?\b(no\s+cuentan|ne\s+comptent\s+pas|"
        r"z[äa]hlen\s+nicht|non\s+contano|n[ãa]o\s+contam|n'existent\s+pas|no\s+existen|non\s+esistano)",
        r"\b(hypothetically|in\s+a\s+fictional\s+world)\b.{0,40}?\b(no|without)\s+(guidelines|rules|restrictions)",
    ],
    "smuggling": [
        r"\b(decode|translate|reverse|decrypt|unscramble|concatenate)\b" + _NEAR +
        r"\b(then|and)\s+(execute|follow|obey|run|do\s+what|carry\s+out|perform)\b",
        r"\b(haz\s+lo\s+que\s+(diga|dice)|fais\s+ce\s+qu'il\s+dit|fai\s+(quello|ci[oò])\s+che\s+dice|"
        r"fa[cç]a\s+o\s+que\s+(diz|disser)|do\s+what\s+it\s+says|als\s+befehl\s+aus)",
    ],
}
_COMPILED = {rule: [re.compile(p, _FLAGS) for p in patterns] for rule, patterns in _RULES.items()}
_GATED = {rule: [(required_literals(p), p) for p in compiled] for rule, compiled in _COMPILED.items()}
_LITERALS = frozenset().union(*(literals for gated in _GATED.values() for literals, _ in gated if literals))
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"})
_LEET_CHARS = frozenset("013457@$!")
_HEX_WORD = re.compile(r"[0-9a-fA-F]+")  # an ID or a hash ("3f9a2c"), not leetspeak
_WORD = re.compile(r"[\w@$!]*[^\W\d_][\w@$!]*")  # a run of word and leet characters with a letter in it
_SPACED = re.compile(r"\b(?:\w ){3,}\w\b")  # "i g n o r e"
_JOINERS = re.compile(r"(?<=[^\W\d_])[._*\-](?=[^\W\d_])")  # "I.g.n.o.r.e", "in-struc-tions"; not "2024-05"
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}){8,}\b")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_INVISIBLE = re.compile("[\u200b-\u200f\u2060\ufeff\u00ad]")


@dataclass
class Verdict:
    """What the detectors found in one request."""

    rules: list[str] = field(default_factory=list)
    similarity: float = 0.0

    @property
    def flagged(self) -> bool:
        return bool(self.rules)

    def header(self) -> str:
        """The ``x-raygate-flags`` value, e.g. ``prompt_injection:pattern:override``."""
        return ",".join(f"prompt_injection:{rule}" for rule in self.rules)


def deobfuscate(text: str) -> str:
    """A copy with the common disguises undone: invisible characters, spaced letters, leetspeak, base64."""
    text = _INVISIBLE.sub("", text)
    joined = _SPACED.sub(lambda m: m.group(0).replace(" ", ""), _JOINERS.sub("", text))
    decoded = []
    for run in _HEX.findall(text):
        try:
            decoded.append(bytes.fromhex(run).decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
    for run in _BASE64.findall(text):
        try:
            plain = base64.b64decode(run + "=" * (-len(run) % 4), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            continue
        if plain.isprintable():
            decoded.append(plain)
    return "\n".join([_WORD.sub(_unleet, joined), *decoded])


def _unleet(match: re.Match[str]) -> str:
    """A word with its leetspeak undone ("1gn0re" -> "ignore"), where it mixes letters and leet characters.

    Numbers ("2024", "5"), hexadecimal IDs ("3f9a2c") and a closing "!" stay as they
    are, so most text that has nothing to undo stays equal to the original and is
    scanned once, not twice.
    """
    word = match.group(0)
    core = word.rstrip("!")
    if _LEET_CHARS.isdisjoint(core) or _HEX_WORD.fullmatch(core):
        return word
    return core.translate(_LEET) + word[len(core):]


def match_patterns(text: str) -> list[str]:
    """Names of the pattern rules the text (or its de-obfuscated copy) matches."""
    plain = deobfuscate(text)
    variants = [(v, contained(_LITERALS, ascii_lower(v))) for v in ((text,) if plain == text else (text, plain))]
    return [f"pattern:{rule}" for rule, gated in _GATED.items()
            if any(may_match(literals, found) and p.search(v) for literals, p in gated for v, found in variants)]


@functools.lru_cache(maxsize=4096)
def _cached_rules(text: str) -> tuple[str, ...]:
    return tuple(match_patterns(text))


def pattern_rules(text: str) -> list[str]:
    """``match_patterns``, remembered for recent texts up to ``CACHED_TEXT_CHARS`` (a repeated prompt, a
    cache hit, a retried request: ~0.04 ms of regexes each time for a short prompt, more for a long one)."""
    return list(_cached_rules(text)) if len(text) <= CACHED_TEXT_CHARS else match_patterns(text)


def chunks(text: str, size: int, limit: int) -> list[str]:
    """Sentence-aligned chunks of about ``size`` characters (the last ``limit`` of them)."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?。！？\n])\s+", text) if s.strip()]
    out: list[str] = []
    for sentence in sentences:
        if out and len(out[-1]) + len(sentence) < size:
            out[-1] += " " + sentence
        else:
            out.append(sentence[:size * 2])
    return out[-limit:]


def load_attacks(extra_file: str | None) -> list[str]:
    """The shipped attack prompts, plus the operator's file (one per line, ``#`` comments)."""
    lines: list[str] = []
    for path in [SHIPPED_ATTACKS, *([Path(extra_file)] if extra_file else [])]:
        lines += [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                  if line.strip() and not line.lstrip().startswith("#")]
    return lines


class InjectionDetector:
    """Flags prompt injections in a request's user text.

    Args:
        config: the detector's settings.
        embedder: the Embedder (placed); None turns the similarity check off.
    """

    def __init__(self, config: InjectionConfig, embedder: Placed | None) -> None:
        self.config = config
        self.embedder = embedder if config.embedding else None
        self._attacks: np.ndarray | None = None

    def action(self, tenant: str) -> str:
        """flag, block or off for this tenant."""
        return self.config.tenant_actions.get(tenant, self.config.action) if self.config.enabled else "off"

    async def screen(self, tenant: str, messages: list[Any]) -> Verdict | None:
        """Inspect a request's user text, unless the tenant turned the detector off (None)."""
        if self.action(tenant) == "off":
            return None
        return await self.inspect(user_text(messages))

    def flags(self, tenant: str, verdict: Verdict | None) -> str | None:
        """The flags to record and send; a tenant that blocks injections gets a 400 naming the rules."""
        if verdict is None or not verdict.flagged:
            return None
        if self.action(tenant) == "block":
            raise InvalidRequestError(
                f"The prompt was rejected: it looks like a prompt injection ({', '.join(verdict.rules)}).",
                param="messages", code="prompt_rejected")
        return verdict.header()

    async def inspect(self, text: str) -> Verdict:
        """Run both detectors over the user's text."""
        verdict = Verdict(rules=pattern_rules(text) if self.config.patterns else [])
        if self.embedder is not None and text.strip():
            try:
                verdict.similarity = await self.similarity(text)
            except Exception as exc:  # noqa: BLE001 - the patterns still ran; the Embedder being down fails nothing
                logger.warning("Injection similarity check skipped: %s", type(exc).__name__)
                return verdict
            if verdict.similarity >= self.config.similarity_threshold:
                verdict.rules.append("similar:known_attack")
        return verdict

    async def similarity(self, text: str) -> float:
        """The highest cosine similarity of any chunk of the text to a known attack."""
        attacks = await self._attack_vectors()
        pieces = chunks(text, self.config.chunk_chars, self.config.max_chunks)
        vectors, _ = await self.embedder("embed", pieces)  # type: ignore[misc]
        return float(np.max(np.asarray(vectors) @ attacks.T))

    async def _attack_vectors(self) -> np.ndarray:
        if self._attacks is None:
            vectors, _ = await self.embedder("embed", load_attacks(self.config.attacks_file))  # type: ignore[misc]
            self._attacks = np.asarray(vectors, dtype=np.float32)
        return self._attacks


def user_text(messages: list[Any]) -> str:
    """The text the user supplied (user turns; system prompts are the operator's)."""
    return "\n".join(m.text() for m in messages if m.role == "user")
