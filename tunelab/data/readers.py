"""Streaming readers: every input file → (source, line, raw record or BadRecord), never all in memory.

JSONL (also .gz): one record per line; invalid JSON or invalid UTF-8 on a line becomes a
BadRecord for that line only. JSON arrays (or objects keyed by id). CSV/TSV: encoding found
by an incremental UTF-8 scan (falls back to cp1252/latin-1), CRLF handled. Parquet: in
batches. CoNLL token/tag columns (NER). Plain text: a file or a folder of .txt/.md files, one document per file or per
paragraph.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
from pathlib import Path
from typing import Iterator, Literal

from tunelab.data.formats import BadRecord
from tunelab.errors import TunelabError

Item = tuple[str, int, "dict | BadRecord"]
TEXT_SUFFIXES = (".txt", ".md", ".text")


def _open_binary(p: Path):
    return gzip.open(p, "rb") if p.name.lower().endswith(".gz") else open(p, "rb")


def detect_encoding(p: Path, chunk: int = 1 << 20) -> str:
    """'utf-8-sig' if the whole file decodes as UTF-8 (scanned incrementally), else cp1252 or latin-1."""
    dec = codecs.getincrementaldecoder("utf-8")()
    raw_all_cp1252 = True
    with _open_binary(p) as f:
        try:
            while b := f.read(chunk):
                dec.decode(b)
            dec.decode(b"", final=True)
            return "utf-8-sig"
        except UnicodeDecodeError:
            pass
    with _open_binary(p) as f:
        while b := f.read(chunk):
            try:
                b.decode("cp1252")
            except UnicodeDecodeError:
                raw_all_cp1252 = False
                break
    return "cp1252" if raw_all_cp1252 else "latin-1"


def read_jsonl(p: Path) -> Iterator[Item]:
    with _open_binary(p) as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield str(p), i, BadRecord(f"invalid UTF-8 at byte {e.start}")
                continue
            try:
                yield str(p), i, json.loads(line)
            except json.JSONDecodeError as e:
                yield str(p), i, BadRecord(f"invalid JSON: {e.msg}")


def read_json(p: Path) -> Iterator[Item]:
    try:
        with _open_binary(p) as f:
            data = json.loads(f.read().decode("utf-8-sig"))
    except UnicodeDecodeError:
        yield str(p), 0, BadRecord("invalid UTF-8: the whole JSON file is unreadable")
        return
    except json.JSONDecodeError as e:
        yield str(p), e.lineno, BadRecord(f"invalid JSON: {e.msg} (the whole file is unreadable)")
        return
    if isinstance(data, dict):
        data = list(data.values())
    if not isinstance(data, list):
        yield str(p), 1, BadRecord("expected a JSON array of records or an object keyed by id")
        return
    for i, rec in enumerate(data, 1):
        yield str(p), i, rec


def read_csv(p: Path, delimiter: str | None = None) -> Iterator[Item]:
    enc = detect_encoding(p)
    if delimiter is None:
        delimiter = "\t" if p.name.lower().rstrip(".gz").endswith(".tsv") else ","
    with _open_binary(p) as fb, io.TextIOWrapper(fb, encoding=enc, newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for row in reader:
            line = reader.line_num
            if None in row:  # more cells than headers
                yield str(p), line, BadRecord(f"row has {len(reader.fieldnames or []) + len(row[None])} cells, "
                                              f"header has {len(reader.fieldnames or [])}")
                continue
            yield str(p), line, {k: v for k, v in row.items()}


def read_parquet(p: Path, batch_size: int = 4096) -> Iterator[Item]:
    from tunelab._optional import require

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


def read(path: str | Path, text_unit: Literal["document", "paragraph"] = "document") -> Iterator[Item]:
    """Dispatch on the file name; a folder is read as plain-text documents."""
    p = Path(path)
    if not p.exists():
        raise TunelabError(f"input not found: {p}")
    name = p.name.lower()
    if p.is_dir() or name.endswith(TEXT_SUFFIXES):
        return read_text(p, text_unit)
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson", ".ndjson.gz")):
        return read_jsonl(p)
    if name.endswith((".json", ".json.gz")):
        return read_json(p)
    if name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        return read_csv(p)
    if name.endswith(".parquet"):
        return read_parquet(p)
    if name.endswith((".conll", ".conllu", ".annotated")):
        return read_conll(p)
    raise TunelabError(f"{p}: unsupported file type; use .jsonl(.gz), .json, .csv, .tsv, .parquet, .conll, .txt/.md or a folder")
