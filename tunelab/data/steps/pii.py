"""PII and secret redaction: regex rules + validation, standard library only.

Each rule is a pattern plus, where a checksum exists, a validator, because bare digit
patterns match far too much text: card numbers must pass the Luhn check, IBANs the
ISO 13616 mod-97 check and their country's length, IPs ``ipaddress``. Everything else
is kept conservative (separators required for phones, known prefixes for keys) and the
trade-offs are listed in the rules' comments.

A ``Finding`` holds only ``(type, start, end)``, never the matched text, so findings,
counts, ``Drop.detail`` and ``config()`` can be logged without leaking what they found.

Names and addresses need NER: ``PIIStep(ner=True)`` adds PERSON/LOCATION through
presidio-analyzer and a spaCy model (``PresidioBackend``, extra ``pii``).
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from tunelab._optional import require
from tunelab.data.steps.base import Drop, Step, map_texts, texts
from tunelab.errors import ConfigError, MissingExtra

TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "URL_CREDENTIALS", "API_KEY")
NER_TYPES = ("PERSON", "LOCATION")
STYLES = ("mask", "hash", "drop")
MIN_SECRET_LEN = 8  # generic `password=...` values shorter than this are left alone


@dataclass(frozen=True)
class Finding:
    """Where a PII span is: ``text[start:end]`` of ``type``. Holds no text, so it is safe to log."""

    type: str
    start: int
    end: int

    def value(self, text: str) -> str:
        """The matched text; only call this where the value is really needed."""
        return text[self.start:self.end]


class Backend(Protocol):
    """An extra detector (e.g. NER) that adds findings of its own ``types``."""

    types: frozenset[str]

    def detect(self, text: str, types: Iterable[str]) -> list[Finding]: ...


# --------------------------------------------------------------------------- validators

def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a card number (catches every single-digit error)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 lengths per country (SWIFT IBAN registry); unknown countries are not matched.
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30,
    "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22,
    "SA": 24, "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(iban: str) -> bool:
    """ISO 7064 mod-97: move the first four characters to the end, letters → 10..35, ≡ 1 (mod 97)."""
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban[2:4].isdigit():
        return False
    s = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in s)) % 97 == 1


# --------------------------------------------------------------------------- rules

Span = tuple[int, int]
Finder = Callable[[str], Iterator[Span]]


def _regex(pattern: str, group: str | int = 0, check: Callable[[re.Match], bool] | None = None,
           flags: int = 0) -> Finder:
    rx = re.compile(pattern, flags)

    def find(text: str) -> Iterator[Span]:
        for m in rx.finditer(text):
            if check is None or check(m):
                yield m.span(group)
    return find


_EMAIL = (r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}(?![\w-])")

# Phones. A separator (space . - /) is required outside +CC numbers, so plain numbers, years,
# "NW-123456", prices and ISO dates never match; bare 10-digit runs are missed by design.
_SEP = r"[ .\-\u00a0]"
_PHONE_INTL = rf"(?<![\w+])\+[1-9]\d{{0,2}}(?:{_SEP}?\(\d{{1,4}}\))?(?:{_SEP}?\d{{1,5}}){{1,6}}(?!\w)"
# NANP: area code [2-9]dd, "(555) 123-4567", "555-123-4567", "+1"/"1-" handled above/here.
_PHONE_US = (rf"(?<![\w+.\-/])(?:1{_SEP})?(?:\([2-9]\d\d\) ?|[2-9]\d\d{_SEP})\d{{3}}{_SEP}\d{{4}}"
             r"(?!\w|[-.]\d)")
# European national format: trunk 0 + area code, e.g. "030 1234567", "06 12 34 56 78".
_PHONE_EU = r"(?<![\w+.\-/])0[1-9]\d{0,3}(?:[ .\-/]\d{2,8}){1,4}(?!\w|[-./]\d)"
_DATE_START = re.compile(r"\d{1,2}([./-])\d{1,2}\1\d{2,4}(?!\d)|\d{4}([./-])\d{1,2}\2\d{1,2}(?!\d)")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _phone_intl_ok(m: re.Match) -> bool:
    return 8 <= _digits(m.group().replace("(0)", "")) <= 15


def _phone_eu_ok(m: re.Match) -> bool:
    return 9 <= _digits(m.group()) <= 12 and not _DATE_START.match(m.group())


# Cards: runs of digit groups; a window of groups is a card if it has 13-19 digits, an issuer
# prefix 2-6 (Visa, Mastercard, Amex, Discover, JCB, Diners, UnionPay) and passes Luhn.
_DIGIT_RUN = re.compile(r"(?<![\w.,\-])\d+(?:[ -]\d+)*(?!\w)")
_GROUP = re.compile(r"\d+")


def _find_cards(text: str) -> Iterator[Span]:
    for run in _DIGIT_RUN.finditer(text):
        groups = [g.span() for g in _GROUP.finditer(text, run.start(), run.end())]
        i = 0
        while i < len(groups):
            hit = None
            for j in range(min(len(groups), i + 6), i, -1):  # longest window first (≤ 6 groups)
                window = groups[i:j]
                if len(window) > 1 and any(not 3 <= e - s <= 6 for s, e in window):
                    continue
                digits = "".join(text[s:e] for s, e in window)
                if 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_ok(digits):
                    hit = j
                    break
            if hit is None:
                i += 1
            else:
                yield groups[i][0], groups[hit - 1][1]
                i = hit


# IBAN: country + 2 check digits + BBAN, optionally grouped by spaces; trimmed to the
# country's length, then mod-97. Upper case only (lower-case IBANs are missed).
_IBAN_CAND = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){10,36}")


def _find_ibans(text: str) -> Iterator[Span]:
    for m in _IBAN_CAND.finditer(text):
        want = IBAN_LENGTHS.get(m.group()[:2])
        if want is None:
            continue
        n, end = 0, None
        for k in range(m.start(), m.end()):
            if text[k] != " ":
                n += 1
                if n == want:
                    end = k + 1
                    break
        if end is None or (end < len(text) and text[end].isalnum()):
            continue
        if iban_ok(text[m.start():end].replace(" ", "")):
            yield m.start(), end


# SSN: ddd-dd-dddd without area 000/666/9xx, group 00 or serial 0000 (never issued).
_SSN = r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\w|-\d)"

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV4_RULE = rf"(?<![\w.]){_IPV4}(?!\w|\.\d)"
_IPV6 = rf"(?<![\w:.])(?:[0-9A-Fa-f]{{0,4}}:){{2,7}}(?:{_IPV4}|[0-9A-Fa-f]{{1,4}})?(?![\w:]|\.\d)"


def _ipv6_ok(m: re.Match) -> bool:
    s = m.group()
    if sum(1 for g in re.split(r"[:.]", s) if g) < 2:  # "::", "::1" and the like are not personal
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:  # times like 10:30:00, C++ "a::b" scopes that are not addresses
        return False
    return True


# Credentials in a URL: the span is "user:password@host[:port]", the scheme is kept.
_URL_CRED = (r"\b[A-Za-z][A-Za-z0-9+.\-]{1,15}://(?P<v>[^\s:/@?#\[\]]*:[^\s/@]+@"
             r"[\w.\-\[\]:%]*[\w\]])")

_API_KEYS = [
    r"(?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])",             # AWS access key id
    r"(?<![A-Za-z0-9_])gh[pousr]_[A-Za-z0-9]{30,255}(?![A-Za-z0-9_])",       # GitHub tokens
    r"(?<![A-Za-z0-9_])github_pat_[A-Za-z0-9_]{22,255}",                      # GitHub fine-grained
    r"(?<![A-Za-z0-9_])xox[abpr]-[A-Za-z0-9\-]{10,250}",                      # Slack
    r"(?<![A-Za-z0-9_])hf_[A-Za-z0-9]{30,64}(?![A-Za-z0-9_])",               # Hugging Face
    r"(?<![A-Za-z0-9_])[rs]k_(?:live|test)_[A-Za-z0-9]{16,247}",             # Stripe
    r"(?<![\w-])AIza[0-9A-Za-z_\-]{35}(?![\w-])",                             # Google API key
    r"(?<![\w-])eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
    r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
    r"(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)",            # PEM / PGP private key
]
# OpenAI/Anthropic-style "sk-…"; must mix letters and digits so "sk-learn-…" slugs stay.
_SK = r"(?<![\w-])sk-[A-Za-z0-9_\-]{20,200}(?![\w-])"


def _mixed(m: re.Match) -> bool:
    s = m.group()[3:]
    return any(c.isdigit() for c in s) and any(c.isalpha() for c in s)


_BEARER = r"(?i)\bbearer\s+(?P<v>[A-Za-z0-9._~+/\-]{16,}=*)"

# Generic assignments: a name ending in password/secret/token/api_key/... then = : => :=,
# then a value; only the value is redacted. Quoted values count as literals; an unquoted
# value that looks like code (identifier, attribute access) or a placeholder is skipped.
_ASSIGN = (r"(?i)(?<![\w.\-\[])[\"']?(?P<name>[\w.\-]*?(?:passw(?:or)?d|pwd|passphrase|secret|token"
           r"|api[_\-]?key|access[_\-]?key|private[_\-]?key|secret[_\-]?key|client[_\-]?secret))[\"']?"
           r"[ \t]*(?::[ \t]*[A-Za-z_][\w.\[\]]*[ \t]*)?"  # optional type annotation: `password: str = ...`
           r"(?:=>|:=|=|:)[ \t]*"
           r"(?:\"(?P<dq>[^\"\n]{1,500})\"|'(?P<sq>[^'\n]{1,500})'|(?P<bare>[^\s\"'`,;<>()\[\]{}]{1,500}))")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z_]*(?:\.[A-Za-z_]\w*)*|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")
_PLACEHOLDER = re.compile(r"(?i)^[\[<{$%*]|your[_\- ]|x{4,}|\*{3,}|^(?:none|null|true|false|undefined|"
                          r"redacted|changeme|password|secret|example)$")
_ASSIGN_RX = re.compile(_ASSIGN)


def _find_assignments(text: str) -> Iterator[Span]:
    for m in _ASSIGN_RX.finditer(text):
        g = "dq" if m.group("dq") is not None else "sq" if m.group("sq") is not None else "bare"
        v = m.group(g)
        if len(v) < MIN_SECRET_LEN or _PLACEHOLDER.search(v) or len(set(v)) == 1:
            continue
        if g == "bare" and (v.isdigit() or _IDENT.fullmatch(v)):
            continue
        yield m.span(g)


# Order breaks ties between equally long overlapping matches: more specific types first.
# Gates: a cheap search that must succeed before a rule's full patterns run. Most text has
# none of these literals, which makes PII detection ~3x faster on ordinary prose.
class _Literals(tuple):
    """A gate of plain substrings (``in`` is far faster than a regex alternation); ``lower``
    marks literals matched against the lowercased text."""

    lower = False


def _literals(*items: str, lower: bool = False) -> _Literals:
    g = _Literals(items)
    g.lower = lower
    return g


_KEY_GATE = _literals("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xoxa-", "xoxb-",
                      "xoxp-", "xoxr-", "hf_", "k_live_", "k_test_", "AIza", "eyJ", "-----BEGIN")
_ASSIGN_GATE = _literals("passw", "pwd", "passphrase", "secret", "token", "key", lower=True)
_BEARER_GATE = _literals("bearer", lower=True)
_PHONE_GATE = re.compile(r"\d{3}\W{0,2}\d{3}")
_PHONE_EU_GATE = re.compile(r"0[1-9]\d{0,3}[ .\-/]\d\d")

_RULES: list[tuple[str, "str | re.Pattern | None", Finder]] = [
    # (type, substring or gate pattern that must be present, or None; finder)
    ("URL_CREDENTIALS", "://", _regex(_URL_CRED, "v")),
    *[("API_KEY", _KEY_GATE, _regex(p)) for p in _API_KEYS],
    ("API_KEY", "sk-", _regex(_SK, check=_mixed)),
    ("API_KEY", _BEARER_GATE, _regex(_BEARER, "v")),
    ("API_KEY", _ASSIGN_GATE, _find_assignments),
    ("EMAIL", "@", _regex(_EMAIL)),
    ("IBAN", None, _find_ibans),
    ("CREDIT_CARD", None, _find_cards),
    ("SSN", "-", _regex(_SSN)),
    ("IP_ADDRESS", ".", _regex(_IPV4_RULE)),
    ("IP_ADDRESS", ":", _regex(_IPV6, check=_ipv6_ok)),
    ("PHONE", "+", _regex(_PHONE_INTL, check=_phone_intl_ok)),
    ("PHONE", _PHONE_GATE, _regex(_PHONE_US)),
    ("PHONE", _PHONE_EU_GATE, _regex(_PHONE_EU, check=_phone_eu_ok)),
]


def _wanted(types: Iterable[str] | None, allowed: Iterable[str]) -> frozenset[str]:
    allowed = tuple(allowed)
    if types is None:
        return frozenset(allowed)
    if isinstance(types, str):
        types = [types]
    want = frozenset(t.upper() for t in types)
    unknown = sorted(want - set(allowed))
    if unknown:
        extra = " (PERSON/LOCATION need the NER backend: PIIStep(ner=True))" if set(unknown) & set(NER_TYPES) else ""
        raise ValueError(f"unknown PII type(s) {unknown}; known: {list(allowed)}{extra}")
    return want


def detect(text: str, types: Iterable[str] | None = None, *, backend: Backend | None = None) -> list[Finding]:
    """Non-overlapping PII findings in ``text``, sorted by start.

    Overlaps are resolved deterministically: longest match first, then earliest, then rule
    order (API keys and URL credentials before generic types).
    """
    allowed = TYPES + (tuple(sorted(backend.types)) if backend is not None else ())
    want = _wanted(types, allowed)
    if not text:
        return []
    cands: list[tuple[int, int, int, str]] = []
    gates: dict[int, bool] = {}

    lowered: list[str] = []

    def passes(needle) -> bool:
        if needle is None:
            return True
        if isinstance(needle, str):
            return needle in text
        if id(needle) not in gates and isinstance(needle, _Literals):
            if needle.lower and not lowered:
                lowered.append(text.lower())
            hay = lowered[0] if needle.lower else text
            gates[id(needle)] = any(lit in hay for lit in needle)
        if id(needle) not in gates:
            gates[id(needle)] = needle.search(text) is not None
        return gates[id(needle)]

    for order, (typ, needle, find) in enumerate(_RULES):
        if typ in want and passes(needle):
            cands += [(-(e - s), s, order, typ) for s, e in find(text) if e > s]
    if backend is not None and want & backend.types:
        cands += [(-(f.end - f.start), f.start, len(_RULES), f.type)
                  for f in backend.detect(text, want & backend.types) if f.end > f.start]
    cands.sort()
    starts: list[int] = []
    chosen: dict[int, Finding] = {}
    for neg_len, s, _order, typ in cands:
        e = s - neg_len
        i = bisect.bisect_left(starts, s)
        if i < len(starts) and starts[i] < e:  # a chosen span starts inside [s, e)
            continue
        if i > 0 and chosen[starts[i - 1]].end > s:  # the previous chosen span covers s
            continue
        starts.insert(i, s)
        chosen[s] = Finding(typ, s, e)
    return [chosen[s] for s in starts]


def _token(typ: str, value: str, style: str, salt: str) -> str:
    if style == "hash":
        return f"[{typ}:{hashlib.sha256((salt + value).encode('utf-8')).hexdigest()[:10]}]"
    return f"[{typ}]"


def redact(text: str, style: str = "mask", types: Iterable[str] | None = None, salt: str = "",
           *, backend: Backend | None = None) -> tuple[str, Counter[str]]:
    """``text`` with each finding replaced, and the count of findings per type.

    ``mask`` gives ``[EMAIL]``; ``hash`` gives ``[EMAIL:<10 hex of sha256(salt + value)>]``, so the
    same value gets the same token everywhere (joins survive) while the value itself does not.
    """
    if style not in ("mask", "hash"):
        raise ValueError(f"redact style must be 'mask' or 'hash', not {style!r}")
    findings = detect(text, types, backend=backend)
    counts: Counter[str] = Counter(f.type for f in findings)
    if not findings:
        return text, counts
    parts, pos = [], 0
    for f in findings:
        parts += [text[pos:f.start], _token(f.type, f.value(text), style, salt)]
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts), counts


# --------------------------------------------------------------------------- NER (optional)

class PresidioBackend:
    """PERSON / LOCATION findings from presidio-analyzer with a spaCy NER model (extra ``pii``).

    Regexes cannot find names or street addresses; this is the optional pass for them. The
    spaCy model must already be installed (``python -m spacy download en_core_web_lg``):
    nothing is downloaded here, a missing piece raises ``MissingExtra`` with the command.
    """

    types = frozenset(NER_TYPES)

    def __init__(self, model: str = "en_core_web_lg", language: str = "en", threshold: float = 0.5):
        analyzer = require("presidio_analyzer", "pii")
        spacy = require("spacy", "pii")
        if not spacy.util.is_package(model):
            raise MissingExtra(f"spaCy model '{model}' is not installed; install it with: "
                               f"python -m spacy download {model}")
        nlp = require("presidio_analyzer.nlp_engine", "pii")
        engine = nlp.NlpEngineProvider(nlp_configuration={
            "nlp_engine_name": "spacy", "models": [{"lang_code": language, "model_name": model}]}).create_engine()
        self._analyzer = analyzer.AnalyzerEngine(nlp_engine=engine, supported_languages=[language])
        self.language, self.threshold = language, threshold

    def detect(self, text: str, types: Iterable[str]) -> list[Finding]:
        want = sorted(self.types & set(types))
        if not want or not text.strip():
            return []
        found = self._analyzer.analyze(text=text, language=self.language, entities=want,
                                       score_threshold=self.threshold)
        return [Finding(r.entity_type, r.start, r.end) for r in found if r.entity_type in self.types]


# --------------------------------------------------------------------------- step

class PIIStep(Step):
    """Redact PII in every model-visible text (``mask``/``hash``), or drop the record (``drop``).

    ``counts`` (findings by type) and ``records_with_pii`` are running totals; like
    ``Drop.detail`` and ``config()``, they never contain a found value or the salt.
    """

    name = "pii"
    pure = True

    def __init__(self, style: str = "mask", types: list[str] | None = None, salt: str = "",
                 ner: bool = False):
        problems = []
        if style not in STYLES:
            problems.append(f"pii.style must be one of {list(STYLES)}, not {style!r}")
        allowed = TYPES + (NER_TYPES if ner else ())
        if types is not None:
            try:
                _wanted(types, allowed)
            except ValueError as e:
                problems.append(f"pii.types: {e}")
        if problems:
            raise ConfigError(problems)
        self.style, self.salt = style, salt
        self.types = None if types is None else list(dict.fromkeys(t.upper() for t in types))
        self.backend: Backend | None = PresidioBackend() if ner else None
        self._want = _wanted(self.types, allowed)
        self.counts: Counter[str] = Counter()
        self.records_with_pii = 0

    def config(self) -> dict[str, Any]:
        return {"style": self.style, "types": self.types, "salt": bool(self.salt),
                "ner": self.backend is not None}

    def _tally(self, found: Counter[str]) -> None:
        self._last = found
        if found:
            self.counts.update(found)
            self.records_with_pii += 1

    def pop_stats(self) -> Counter[str] | None:
        found, self._last = getattr(self, "_last", None), None
        return found or None

    def add_stats(self, stats: Counter[str]) -> None:
        self._tally(stats)

    def __call__(self, rec: dict) -> dict | Drop:
        found: Counter[str] = Counter()
        if self.style == "drop":
            for t in texts(rec):
                found.update(f.type for f in detect(t, self._want, backend=self.backend))
            self._tally(found)
            return Drop("pii", detail=",".join(sorted(found))) if found else rec

        def fn(t: str) -> str:
            new, c = redact(t, self.style, self._want, self.salt, backend=self.backend)
            found.update(c)
            return new

        new = map_texts(rec, fn)
        self._tally(found)
        return new if found else rec
