"""Cleaning steps: text normalization, control characters, HTML, length, quality and exact dedup.

Each step is a small ``Step`` (see ``base.py``): settings in the constructor, echoed by
``config()``; ``__call__`` returns the (rewritten) record or ``Drop(reason, detail)``.
Standard library only. ``meta`` and non-text fields are never touched.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import Counter
from html.parser import HTMLParser
from typing import Any

from .base import TEXT_KEYS, Drop, Step, map_texts, texts

FIELDS = ("all", "response", *TEXT_KEYS)


# ---------------------------------------------------------------- shared helpers

def _check_field(field: str) -> str:
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, got {field!r}")
    return field


def select_texts(rec: dict, field: str = "all") -> list[str]:
    """The texts a filter looks at: every model-visible text ("all"), one text key, or "response"
    (the last assistant message, else ``completion``, else ``chosen``). Missing → ``[]``."""
    if field == "all":
        return texts(rec)
    if field == "response":
        msgs = rec.get("messages")
        if isinstance(msgs, list):
            for m in reversed(msgs):
                if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
                    return [m["content"]]
        for k in ("completion", "chosen"):
            if isinstance(rec.get(k), str):
                return [rec[k]]
        return []
    v = rec.get(field)
    return [v] if isinstance(v, str) else []


class _PunctToSpace(dict):
    """``str.translate`` table, filled lazily: Unicode punctuation (categories P*) → space."""

    def __missing__(self, cp: int) -> int | str:
        v: int | str = " " if unicodedata.category(chr(cp)).startswith("P") else cp
        self[cp] = v
        return v


_PUNCT_TABLE = _PunctToSpace()


def normalize_for_match(s: str) -> list[str]:
    """Casefolded words with Unicode punctuation removed (shared by dedup and decontamination)."""
    return s.casefold().translate(_PUNCT_TABLE).split()


# ---------------------------------------------------------------- Normalize

_FORMS = ("NFC", "NFD", "NFKC", "NFKD")
_TRAILING_WS = re.compile(r"[ \t]+(?=\n)")
_INNER_RUN = re.compile(r"(?<=[^ \t\n])[ \t]{2,}")  # runs after text on the line (indentation kept)
_ANY_RUN = re.compile(r"[ \t]{2,}")
_MANY_NL = re.compile(r"\n{3,}")
# Continuations that are concatenated to the prompt in prompt-completion / preference data.
_CONTINUATIONS = ("completion", "chosen", "rejected")


class Normalize(Step):
    """Unicode normalization, CRLF/CR → LF, whitespace runs collapsed, outer whitespace stripped.

    ``collapse_whitespace``: runs of 2+ spaces/tabs → one space (leading indentation of a line is
    kept when ``keep_indent``, so code survives), trailing spaces before a newline removed, 3+
    newlines → 2. A single tab is left alone. In prompt-completion / preference records the
    whitespace at the prompt/continuation boundary is not stripped (TRL concatenates them, so
    ``"The sky is" + " blue"`` must keep its space). Never drops.
    """

    name = "normalize"
    pure = True

    def __init__(self, form: str | None = "NFC", collapse_whitespace: bool = True, strip: bool = True,
                 fix_newlines: bool = True, keep_indent: bool = True):
        if form is not None and form not in _FORMS:
            raise ValueError(f"form must be one of {_FORMS} or None, got {form!r}")
        self.form, self.collapse_whitespace, self.strip = form, collapse_whitespace, strip
        self.fix_newlines, self.keep_indent = fix_newlines, keep_indent

    def config(self) -> dict[str, Any]:
        return {"form": self.form, "collapse_whitespace": self.collapse_whitespace, "strip": self.strip,
                "fix_newlines": self.fix_newlines, "keep_indent": self.keep_indent}

    def normalize(self, s: str, lstrip: bool = True, rstrip: bool = True) -> str:
        if self.fix_newlines:
            s = s.replace("\r\n", "\n").replace("\r", "\n")
        if self.form:
            s = unicodedata.normalize(self.form, s)
        if self.collapse_whitespace:
            s = _TRAILING_WS.sub("", s)
            s = (_INNER_RUN if self.keep_indent else _ANY_RUN).sub(" ", s)
            s = _MANY_NL.sub("\n\n", s)
        if self.strip:
            s = s.lstrip() if lstrip else s
            s = s.rstrip() if rstrip else s
        return s

    def __call__(self, rec: dict) -> dict:
        new = map_texts(rec, self.normalize)
        if self.strip and isinstance(rec.get("prompt"), str) and any(
                isinstance(rec.get(k), str) for k in _CONTINUATIONS):
            new["prompt"] = self.normalize(rec["prompt"], rstrip=False)
            for k in _CONTINUATIONS:
                if isinstance(rec.get(k), str):
                    new[k] = self.normalize(rec[k], lstrip=False)
        return new


# ---------------------------------------------------------------- ControlChars

_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff\ud800-\udfff]")
_CONTROL_KEEP_ZW = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_VERTICAL = re.compile("\r\n?|[\x0b\x0c]")


class ControlChars(Step):
    """Removes C0/C1 control characters (except \\n and \\t), zero-width characters
    (U+200B–U+200D, U+FEFF; kept with ``zero_width=False``) and lone surrogates.

    CR, CRLF, VT and FF become \\n rather than vanishing, so the lines they separate do not
    run together. Never drops.
    """

    name = "control_chars"
    pure = True

    def __init__(self, zero_width: bool = True):
        self.zero_width = zero_width
        self._re = _CONTROL if zero_width else _CONTROL_KEEP_ZW

    def config(self) -> dict[str, Any]:
        return {"zero_width": self.zero_width}

    def clean(self, s: str) -> str:
        return self._re.sub("", _VERTICAL.sub("\n", s))

    def __call__(self, rec: dict) -> dict:
        return map_texts(rec, self.clean)


# ---------------------------------------------------------------- StripHTML

_TAGS = ("a|abbr|article|aside|audio|b|blockquote|body|br|button|caption|center|code|dd|div|dl|dt|em|"
         "figcaption|figure|font|footer|form|h[1-6]|head|header|hr|html|i|iframe|img|input|label|li|link|"
         "main|meta|nav|noscript|ol|option|p|pre|script|section|select|small|source|span|strong|style|sub|"
         "sup|svg|table|tbody|td|textarea|tfoot|th|thead|title|tr|u|ul|video")
# A tag is <name>, <name/>, </name> or <name attr=...>: "a<b and c>d" in prose is not one.
_HTML = re.compile(r"<!--|<!doctype\b|</(?:%s)\s*>|<(?:%s)(?:\s*/?>|\s+[\w:-]+\s*=)" % (_TAGS, _TAGS), re.I)
_FENCE = re.compile(r"(```.*?(?:```|\Z))", re.S)  # markdown code blocks are left verbatim
_NL_BEFORE = {"br", "hr"}
_NL_AFTER = {"p", "li", "div", "tr", "ul", "ol", "dl", "dt", "dd", "table", "blockquote", "pre", "section",
             "article", "header", "footer", "h1", "h2", "h3", "h4", "h5", "h6", "title", "figcaption", "nav"}
_SKIP = {"script", "style", "noscript", "head", "template"}


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in _SKIP:
            self.skip += 1
        elif tag in _NL_BEFORE:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list) -> None:  # <br/>, <script/>
        if tag in _NL_BEFORE:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in _NL_AFTER:
            self.parts.append("\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def html_to_text(s: str) -> str:
    """Tags, comments, script/style blocks removed; entities unescaped; block ends → newlines."""
    p = _TextExtractor()
    p.feed(s)
    p.close()
    return _MANY_NL.sub("\n\n", _TRAILING_WS.sub("", "".join(p.parts)))


class StripHTML(Step):
    """HTML → plain text with the standard library's ``html.parser``.

    With ``only_if_html`` (default) a text is touched only if it contains a recognisable tag or
    comment; anything else, entities included, is returned unchanged. Fenced markdown code blocks
    (```...```) are kept verbatim when ``keep_code_blocks`` (HTML examples in chat answers).
    The text's original leading/trailing whitespace is preserved. Never drops.
    """

    name = "strip_html"
    pure = True

    def __init__(self, only_if_html: bool = True, keep_code_blocks: bool = True):
        self.only_if_html, self.keep_code_blocks = only_if_html, keep_code_blocks

    def config(self) -> dict[str, Any]:
        return {"only_if_html": self.only_if_html, "keep_code_blocks": self.keep_code_blocks}

    def strip(self, s: str) -> str:
        parts = _FENCE.split(s) if self.keep_code_blocks else [s]  # odd indices are code blocks
        prose = parts[::2]
        if self.only_if_html and not any(_HTML.search(p) for p in prose):
            return s
        out = "".join(p if i % 2 else html_to_text(p) for i, p in enumerate(parts)).strip()
        lead, trail = s[:len(s) - len(s.lstrip())], s[len(s.rstrip()):]
        return lead + out + trail if out else ""

    def __call__(self, rec: dict) -> dict:
        return map_texts(rec, self.strip)


# ---------------------------------------------------------------- LengthFilter

class LengthFilter(Step):
    """Drops records outside length bounds: "too_short" / "too_long".

    Measures the record's selected texts (``field``: "all", one text key, or "response")
    joined with "\\n": characters (separators not counted), whitespace-separated words and,
    with a Hugging Face ``tokenizer``, ``len(tokenizer(text)["input_ids"])``. A record without
    the selected field (e.g. ``field="completion"`` on a chat record) is kept untouched.
    """

    name = "length_filter"
    pure = True

    def __init__(self, min_chars: int | None = None, max_chars: int | None = None,
                 min_words: int | None = None, max_words: int | None = None,
                 min_tokens: int | None = None, max_tokens: int | None = None,
                 tokenizer: Any = None, field: str = "all"):
        self.bounds = {"chars": (min_chars, max_chars), "words": (min_words, max_words),
                       "tokens": (min_tokens, max_tokens)}
        for unit, (lo, hi) in self.bounds.items():
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{unit}={lo} > max_{unit}={hi}")
        if (min_tokens is not None or max_tokens is not None) and tokenizer is None:
            raise ValueError("min_tokens/max_tokens need a tokenizer")
        self.tokenizer = tokenizer
        self.field = _check_field(field)

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        for unit, (lo, hi) in self.bounds.items():
            cfg[f"min_{unit}"], cfg[f"max_{unit}"] = lo, hi
        tok = self.tokenizer
        cfg["tokenizer"] = None if tok is None else (getattr(tok, "name_or_path", None) or type(tok).__name__)
        cfg["field"] = self.field
        return cfg

    def _measure(self, unit: str, ts: list[str]) -> int:
        if unit == "chars":
            return sum(len(t) for t in ts)
        if unit == "words":
            return sum(len(t.split()) for t in ts)
        return len(self.tokenizer("\n".join(ts))["input_ids"])

    def __call__(self, rec: dict) -> dict | Drop:
        ts = select_texts(rec, self.field)
        if not ts and self.field != "all":
            return rec
        for unit, (lo, hi) in self.bounds.items():
            if lo is None and hi is None:
                continue
            n = self._measure(unit, ts)
            if lo is not None and n < lo:
                return Drop("too_short", f"{unit}={n} < {lo}")
            if hi is not None and n > hi:
                return Drop("too_long", f"{unit}={n} > {hi}")
        return rec


# ---------------------------------------------------------------- QualityFilter

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
_BULLETS = ("•", "●", "○", "◦", "▪", "‣", "⁃", "∙", "·", "-", "–", "*")
_EDGE_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~“”‘’«»„…–—¡¿·•"
_PARA_SPLIT = re.compile(r"\n[ \t]*\n")


def _dup_fraction(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier one, fraction of their characters)."""
    seen: set[str] = set()
    dup_n = dup_chars = 0
    for it in items:
        if it in seen:
            dup_n += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    total = sum(len(it) for it in items)
    return dup_n / max(len(items), 1), dup_chars / max(total, 1)


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return list(zip(*(words[i:] for i in range(n))))


def _covered_chars(lens: list[int], starts: list[int], n: int) -> int:
    covered = bytearray(len(lens))
    for i in starts:
        covered[i:i + n] = b"\x01" * n
    return sum(ln for ln, c in zip(lens, covered) if c)


class QualityFilter(Step):
    """Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", App. A,
    MassiveText), on the record's selected texts joined by a blank line. English-specific
    (stop words, word lengths). Texts with fewer than ``min_words_to_check`` words pass
    unchecked. Every threshold is a parameter with the paper's value; ``None`` disables a rule
    (for the n-gram tables: an empty dict). The drop reason names the first failing rule, e.g.
    "quality:mean_word_length", "quality:dup_lines", "quality:top_2gram", "quality:dup_5gram";
    ``detail`` gives the measured value.
    """

    name = "quality_filter"
    pure = True

    def __init__(self, min_words_to_check: int = 50,
                 min_mean_word_length: float | None = 3.0, max_mean_word_length: float | None = 10.0,
                 max_symbol_word_ratio: float | None = 0.1,
                 max_bullet_lines: float | None = 0.9, max_ellipsis_lines: float | None = 0.3,
                 min_alpha_words: float | None = 0.8,
                 min_stop_words: int | None = 2, stop_words: tuple[str, ...] | list[str] = STOP_WORDS,
                 max_dup_lines: float | None = 0.30, max_dup_paras: float | None = 0.30,
                 max_dup_line_chars: float | None = 0.20, max_dup_para_chars: float | None = 0.20,
                 top_ngram_max: dict[int, float] | None = None, dup_ngram_max: dict[int, float] | None = None,
                 field: str = "all"):
        self.min_words_to_check = min_words_to_check
        self.min_mean_word_length, self.max_mean_word_length = min_mean_word_length, max_mean_word_length
        self.max_symbol_word_ratio = max_symbol_word_ratio
        self.max_bullet_lines, self.max_ellipsis_lines = max_bullet_lines, max_ellipsis_lines
        self.min_alpha_words = min_alpha_words
        self.min_stop_words, self.stop_words = min_stop_words, tuple(stop_words)
        self.max_dup_lines, self.max_dup_paras = max_dup_lines, max_dup_paras
        self.max_dup_line_chars, self.max_dup_para_chars = max_dup_line_chars, max_dup_para_chars
        self.top_ngram_max = dict(TOP_NGRAM_MAX if top_ngram_max is None else top_ngram_max)
        self.dup_ngram_max = dict(DUP_NGRAM_MAX if dup_ngram_max is None else dup_ngram_max)
        self.field = _check_field(field)
        self._stop = frozenset(w.casefold() for w in self.stop_words)

    def config(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self).items() if not k.startswith("_")}

    def check(self, text: str) -> Drop | None:
        """The first failing rule as a ``Drop``, or ``None`` when the text passes."""
        words = text.split()
        n_words = len(words)
        if n_words < self.min_words_to_check or n_words == 0:
            return None

        def fail(rule: str, value: float) -> Drop:
            return Drop(f"quality:{rule}", f"{value:.3f}")

        # --- quality filters
        stripped = [w.strip(_EDGE_PUNCT) for w in words]
        content = [w for w in stripped if any(c.isalnum() for c in w)]
        mean_len = sum(len(w) for w in content) / len(content) if content else 0.0
        if self.min_mean_word_length is not None and mean_len < self.min_mean_word_length:
            return fail("mean_word_length", mean_len)
        if self.max_mean_word_length is not None and mean_len > self.max_mean_word_length:
            return fail("mean_word_length", mean_len)
        if self.max_symbol_word_ratio is not None:
            ratio = max(text.count("#"), text.count("...") + text.count("…")) / n_words
            if ratio > self.max_symbol_word_ratio:
                return fail("symbol_word_ratio", ratio)
        lines = [ln.strip() for ln in text.split("\n")]
        lines = [ln for ln in lines if ln]
        n_lines = max(len(lines), 1)
        if self.max_bullet_lines is not None:
            frac = sum(ln.startswith(_BULLETS) for ln in lines) / n_lines
            if frac > self.max_bullet_lines:
                return fail("bullet_lines", frac)
        if self.max_ellipsis_lines is not None:
            frac = sum(ln.endswith(("...", "…")) for ln in lines) / n_lines
            if frac > self.max_ellipsis_lines:
                return fail("ellipsis_lines", frac)
        if self.min_alpha_words is not None:
            frac = sum(any(c.isalpha() for c in w) for w in words) / n_words
            if frac < self.min_alpha_words:
                return fail("alpha_words", frac)
        norm = [w.casefold() for w in stripped if w]
        if self.min_stop_words is not None:
            found = len(self._stop.intersection(norm))
            if found < self.min_stop_words:
                return fail("stop_words", found)

        # --- repetition removal
        line_frac, line_chars = _dup_fraction(lines)
        paras = [p.strip() for p in _PARA_SPLIT.split(text)]
        para_frac, para_chars = _dup_fraction([p for p in paras if p])
        for rule, value, limit in (("dup_lines", line_frac, self.max_dup_lines),
                                   ("dup_paras", para_frac, self.max_dup_paras),
                                   ("dup_line_chars", line_chars, self.max_dup_line_chars),
                                   ("dup_para_chars", para_chars, self.max_dup_para_chars)):
            if limit is not None and value > limit:
                return fail(rule, value)
        lens = [len(w) for w in norm]
        total = max(sum(lens), 1)
        for n, limit in sorted(self.top_ngram_max.items()):
            grams = _ngrams(norm, n)
            if not grams:
                continue
            counts = Counter(grams)
            best, count = max(counts.items(), key=lambda kv: (kv[1], sum(map(len, kv[0]))))
            if count < 2:
                continue
            frac = _covered_chars(lens, [i for i, g in enumerate(grams) if g == best], n) / total
            if frac > limit:
                return fail(f"top_{n}gram", frac)
        for n, limit in sorted(self.dup_ngram_max.items()):
            seen: set[tuple[str, ...]] = set()
            starts = []
            for i, g in enumerate(_ngrams(norm, n)):
                if g in seen:
                    starts.append(i)
                else:
                    seen.add(g)
            frac = _covered_chars(lens, starts, n) / total
            if frac > limit:
                return fail(f"dup_{n}gram", frac)
        return None

    def __call__(self, rec: dict) -> dict | Drop:
        ts = select_texts(rec, self.field)
        drop = self.check("\n\n".join(ts)) if ts else None
        return rec if drop is None else drop


# ---------------------------------------------------------------- ExactDedup

class ExactDedup(Step):
    """Drops records whose model-visible text was seen before: reason "duplicate", ``detail`` the
    0-based index (among records this step has seen) of the first occurrence.

    The key is the first 8 bytes of the SHA-1 of all texts joined with "\\x1f"; with ``normalize``
    each text is first casefolded, Unicode punctuation replaced by spaces and whitespace collapsed.
    Keys live in a numpy table (~24 bytes a record; two distinct texts share a 64-bit key with
    probability ~n²/2^65, 3·10^-8 at a million records). State lives in the step: use one instance
    per pass over the data.
    """

    name = "exact_dedup"

    def __init__(self, normalize: bool = True):
        from tunelab.data._table import IntMultiMap

        self.normalize = normalize
        self.seen = IntMultiMap(4096)
        self.count = 0

    def config(self) -> dict[str, Any]:
        return {"normalize": self.normalize}

    def key(self, rec: dict) -> int:
        ts = texts(rec)
        if self.normalize:
            ts = [" ".join(normalize_for_match(t)) for t in ts]
        return int.from_bytes(hashlib.sha1("\x1f".join(ts).encode("utf-8", "surrogatepass")).digest()[:8], "big") or 1

    def precompute(self, rec: dict) -> int:
        return self.key(rec)

    def apply(self, rec: dict, key: int) -> dict | Drop:
        i = self.count
        self.count += 1
        first = self.seen.setdefault(key, i)
        return rec if first == i else Drop("duplicate", str(first))

    def __call__(self, rec: dict) -> dict | Drop:
        return self.apply(rec, self.key(rec))
