"""Streaming readers: every input file → (source, line, raw record or BadRecord), never all in memory.

JSONL (also .gz): one record per line; invalid JSON or invalid UTF-8 on a line becomes a
BadRecord for that line only, and so does a value nested deeper than ``MAX_DEPTH`` levels. JSON
arrays (or objects keyed by id). CSV/TSV: encoding found by an incremental UTF-8 scan (falls back
to cp1252/latin-1), CRLF handled, a malformed row (e.g. an unterminated quote) is rejected alone
and the lines after it are read again. Parquet: in batches. CoNLL token/tag columns (NER). Plain
text: a file, one document per file or per paragraph. A folder: every supported file in it.

A file that breaks off (a truncated ``.gz``, a read error) ends with one BadRecord that names the
position; the records read before it are kept.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import zlib
from collections import deque
from pathlib import Path
from typing import Iterator, Literal

from tunelab._optional import require
from tunelab.data.records import BadRecord
from tunelab.errors import TunelabError

Item = tuple[str, int, "dict | BadRecord"]
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")
JSON_SUFFIXES = (".json", ".json.gz")
CSV_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
PARQUET_SUFFIXES = (".parquet",)
CONLL_SUFFIXES = (".conll", ".conllu", ".annotated")
SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + JSON_SUFFIXES + CSV_SUFFIXES + PARQUET_SUFFIXES + CONLL_SUFFIXES
# No real record nests deeper than a few levels (a Bedrock conversation: 5). Deeper values are
# rejected here, before anything recursive (pickling to a worker, repr) can overflow the stack.
MAX_DEPTH = 100
_BOM = b"\xef\xbb\xbf"


def _open_binary(p: Path):
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")


def detect_encoding(p: Path, chunk: int = 1 << 20) -> str:
    """'utf-8-sig' if the whole file decodes as UTF-8 (scanned incrementally), else cp1252 or latin-1.

    A compressed file that breaks off is judged on the part that can be read (the reader then
    reports where it ends)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    raw_all_cp1252 = True
    with _open_binary(p) as f:
        try:
            while b := _read_some(f, chunk):
                dec.decode(b)
            dec.decode(b"", final=True)
            return "utf-8-sig"
        except UnicodeDecodeError:
            pass
    with _open_binary(p) as f:
        while b := _read_some(f, chunk):
            try:
                b.decode("cp1252")
            except UnicodeDecodeError:
                raw_all_cp1252 = False
                break
    return "cp1252" if raw_all_cp1252 else "latin-1"


def _read_some(f, n: int) -> bytes:
    try:
        return f.read(n)
    except (EOFError, OSError, zlib.error):  # truncated or corrupt: stop here
        return b""


def _depth_over(obj: object, limit: int) -> bool:
    """Whether ``obj`` nests lists/dicts deeper than ``limit`` (iterative: no recursion)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if d > limit:
                return True
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def parse_json(text: str) -> object:
    """One JSON value, or BadRecord with the reason (bad syntax, too deep, an over-long number)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return BadRecord(f"invalid JSON: {e.msg}")
    except RecursionError:
        return BadRecord(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    except ValueError:  # an integer longer than Python's int_max_str_digits
        return BadRecord("invalid JSON: a number too long to convert")
    # a cheap count first: only values with many brackets are walked
    if text.count("[") + text.count("{") > MAX_DEPTH and _depth_over(obj, MAX_DEPTH):
        return BadRecord(f"invalid JSON: nested deeper than {MAX_DEPTH} levels")
    return obj


def read_jsonl(p: Path) -> Iterator[Item]:
    with _open_binary(p) as f:
        for i, raw in enumerate(f, 1):
            if i == 1 and raw.startswith(_BOM):  # a UTF-8 byte-order mark (Windows editors) is not data
                raw = raw[len(_BOM):]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield str(p), i, BadRecord(f"invalid UTF-8 at byte {e.start}", "invalid UTF-8")
                continue
            yield str(p), i, parse_json(line)


def read_json(p: Path) -> Iterator[Item]:
    with _open_binary(p) as f:
        blob = f.read()
    try:
        text = blob.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        yield str(p), 0, BadRecord(f"invalid UTF-8 at byte {e.start}: the whole JSON file is unreadable", "invalid UTF-8")
        return
    data = parse_json(text)
    if isinstance(data, BadRecord):
        yield str(p), 1, BadRecord(f"{data} (the whole file is unreadable)", data.kind)
        return
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list):
        yield str(p), 1, BadRecord("expected a JSON array of records or an object keyed by id")
        return
    for i, rec in enumerate(data, 1):
        yield str(p), i, rec


class _Tape:
    """The lines of a text file with their numbers, for ``csv.reader``. It keeps the lines of the row
    being read, so that when a row turns out broken (an unterminated quote swallows the lines after
    it) every line but the first can be read again."""

    def __init__(self, f):
        self._lines = enumerate(f, 1)
        self._again: deque = deque()
        self.row: list[tuple[int, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        item = self._again.popleft() if self._again else next(self._lines)
        self.row.append(item)
        return item[1]

    def start_row(self) -> None:
        self.row = []

    def reread_all_but_first(self) -> None:
        self._again.extendleft(reversed(self.row[1:]))
        self.row = []


def read_csv(p: Path, delimiter: str | None = None) -> Iterator[Item]:
    enc = detect_encoding(p)
    if delimiter is None:
        delimiter = "\t" if p.name.lower().removesuffix(".gz").endswith(".tsv") else ","
    with _open_binary(p) as fb, io.TextIOWrapper(fb, encoding=enc, newline="") as f:
        tape = _Tape(f)
        # strict: a stray quote is an error for that row, not a silent merge of the lines after it
        reader = csv.reader(tape, delimiter=delimiter, strict=True)
        header: list[str] | None = None
        while True:
            tape.start_row()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                start = tape.row[0][0] if tape.row else 0
                yield str(p), start, BadRecord(_csv_reason(str(e), len(tape.row)), "malformed CSV row")
                tape.reread_all_but_first()
                continue
            if not row or not any(c.strip() for c in row):
                continue
            line = tape.row[0][0]
            if header is None:
                header = row
                continue
            if len(row) > len(header):
                yield str(p), line, BadRecord(f"row has {len(row)} cells, header has {len(header)}")
                continue
            yield str(p), line, {k: (row[i] if i < len(row) else None) for i, k in enumerate(header)}


def _csv_reason(err: str, n_lines: int) -> str:
    if "unexpected end of data" in err or n_lines > 1 and "expected after" in err:
        return "malformed CSV row: a quote is not closed (unterminated quote)"
    if "field larger than field limit" in err:
        return f"malformed CSV row: a field is longer than {csv.field_size_limit():,} characters " \
               "(often an unterminated quote)"
    return f"malformed CSV row: {err}"


def read_parquet(p: Path, batch_size: int = 4096) -> Iterator[Item]:
    pq = require("pyarrow.parquet", "data")
    n = 0
    for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size):
        for rec in batch.to_pylist():
            n += 1
            yield str(p), n, rec


def read_text(p: Path, unit: Literal["document", "paragraph"] = "document") -> Iterator[Item]:
    files = sorted(f for f in p.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES) if p.is_dir() else [p]
    for f in files:
        enc = detect_encoding(f)
        text = f.read_text(encoding=enc).replace("\r\n", "\n").replace("\r", "\n")
        if unit == "document":
            yield str(f), 1, {"text": text}
            continue
        line = 1
        for para in text.split("\n\n"):
            if para.strip():
                yield str(f), line, {"text": para.strip()}
            line += para.count("\n") + 2


def read_conll(p: Path) -> Iterator[Item]:
    """CoNLL columns (token, tag), sentences separated by blank lines → {text, tokens, ner_tags}."""
    enc = detect_encoding(p)
    tokens: list[str] = []
    tags: list[str] = []
    start = 1
    with open(p, encoding=enc) as f:
        for i, line in enumerate(f, 1):
            cols = line.rstrip("\r\n").split("\t") if "\t" in line else line.split()
            if not cols or not cols[0]:
                if tokens:
                    yield str(p), start, {"text": " ".join(tokens), "tokens": tokens, "ner_tags": tags}
                tokens, tags, start = [], [], i + 1
                continue
            tokens.append(cols[0])
            tags.append(cols[-1] if len(cols) > 1 else "O")
    if tokens:
        yield str(p), start, {"text": " ".join(tokens), "tokens": tokens, "ner_tags": tags}


def _broken_off(e: Exception, last: int) -> BadRecord:
    where = f"after line {last}" if last else "at the start"
    if isinstance(e, EOFError):
        what = "the file is truncated (the compressed data ends early)"
    elif isinstance(e, (zlib.error, gzip.BadGzipFile)):
        what = "the compressed data is corrupt"
    else:
        what = f"the file cannot be read further ({type(e).__name__})"
    return BadRecord(f"{what} {where}; the records before it are kept", "file truncated or unreadable")


def _guard(p: Path, items: Iterator[Item]) -> Iterator[Item]:
    """A reader's items; an error that stops the reader (truncation, corruption) becomes one last reject."""
    last = 0
    try:
        for item in items:
            last = max(last, item[1])
            yield item
    except TunelabError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever broke the file, its readable prefix is kept
        yield str(p), last + 1, _broken_off(e, last)


def files_in(p: Path) -> list[Path]:
    """The files an input path stands for: itself, or every supported file in a folder (sorted, hidden
    files and folders skipped)."""
    if not p.is_dir():
        return [p]
    return sorted(f for f in p.rglob("*") if f.is_file() and f.name.lower().endswith(SUFFIXES)
                  and not any(part.startswith(".") for part in f.relative_to(p).parts))


def read_file(p: Path, text_unit: Literal["document", "paragraph"] = "document") -> Iterator[Item]:
    """One file, by its name."""
    name = p.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        items = read_text(p, text_unit)
    elif name.endswith(JSONL_SUFFIXES):
        items = read_jsonl(p)
    elif name.endswith(JSON_SUFFIXES):
        items = read_json(p)
    elif name.endswith(CSV_SUFFIXES):
        items = read_csv(p)
    elif name.endswith(PARQUET_SUFFIXES):
        items = read_parquet(p)
    elif name.endswith(CONLL_SUFFIXES):
        items = read_conll(p)
    else:
        raise TunelabError(f"{p}: unsupported file type; use .jsonl(.gz), .json, .csv, .tsv, .parquet, .conll, "
                           ".txt/.md or a folder of them")
    return _guard(p, items)


def read(path: str | Path, text_unit: Literal["document", "paragraph"] = "document") -> Iterator[Item]:
    """Dispatch on the file name; a folder is read file by file (every supported file in it)."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"input not found: {p}")
    files = files_in(p)
    for f in files:  # fail before reading anything
        if not f.name.lower().endswith(SUFFIXES):
            read_file(f)
    return (item for f in files for item in read_file(f, text_unit))
