"""Near-duplicate removal: MinHash + LSH over word shingles (Broder 1997; as in datatrove/Gopher).

A record's model-visible texts are normalized for matching (casefolded, Unicode punctuation →
space, see ``normalize_for_match``) and joined with a space; its shingles are the word
``ngram``-grams (5 by default) or, for a text of fewer than ``ngram`` words, its character
``ngram``-grams (the whole text when it is shorter still). Each shingle is hashed once to 32 bits
(from the CRC-32 of its words' UTF-8 bytes, see ``shingle_hashes``) and the MinHash (datasketch,
``num_perm`` permutations, ``seed``) is built from those integers with ``update_batch``.

Streaming, first occurrence wins: each record looks up the LSH band index of the records kept so
far (bands/rows chosen by datasketch's ``_optimal_param``, tilted towards recall, see
``LSH_WEIGHTS``). With ``verify`` (the default) a candidate is a duplicate when the exact Jaccard
similarity of the two shingle-hash sets is ≥ ``threshold``; without it, when the MinHash estimate
(the fraction of equal MinHash values, exactly ``MinHash.jaccard``) is. A duplicate is dropped with
reason "near_duplicate" and ``detail`` the 0-based index (among records this step has seen) of the
kept record it duplicates (the most similar candidate; the earliest on ties). Otherwise it is
indexed and kept. Records with no words are kept and not indexed (exact dedup covers empty texts).

Memory stays flat for inputs far larger than RAM: the band index is a numpy open-addressing table
(one 32-bit key per band and kept record, ~16 bytes each: ~230 bytes per kept record at 14 bands,
where datasketch's ``MinHashLSH`` needs ~5 KB), and each kept record's signature and shingle hashes
go to an anonymous temporary file, read back (``os.pread``) only for LSH candidates. A band key
collision only makes a false candidate, which the check above rejects.

Parallel use: ``precompute`` (shingles, MinHash, band keys) needs no state and runs in worker
processes; ``apply`` does the index work in the main process. State lives in the step: use one
instance per pass over the data. The step pickles (the stored records travel with it).
"""

from __future__ import annotations

import functools
import os
import tempfile
import zlib
from array import array
from typing import Any

import numpy as np

from tunelab._optional import require
from tunelab.data._table import IntMultiMap, nonzero

from .base import Drop, Step, texts
from .clean import normalize_for_match

_P = np.uint32(0x01000193)  # FNV-1 32-bit prime, the base of the shingle hash polynomial
# LSH band/row choice: datasketch picks (bands, rows) minimising weighted false-positive and
# false-negative areas. Every candidate is verified, so an LSH false positive costs one small read
# and compare while a false negative is a missed duplicate: weigh misses 9:1.
# At threshold 0.8 / 128 permutations this gives 14 bands × 9 rows (a pair at Jaccard 0.8 becomes a
# candidate with probability 0.87, at 0.85 0.97) instead of 9 × 13 (0.40, 0.69).
LSH_WEIGHTS = (0.1, 0.9)


def _identity(h: int) -> int:
    """MinHash ``hashfunc`` for values that are already 32-bit shingle hashes."""
    return h


def shingles(words: list[str], ngram: int = 5) -> list[str]:
    """The record's shingles from its normalized words: word ``ngram``-grams joined by a space, or
    character ``ngram``-grams of the space-joined words when there are fewer than ``ngram`` words
    (the whole string when shorter than ``ngram`` characters; ``[]`` without words)."""
    if len(words) >= ngram:
        return [" ".join(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
    s = " ".join(words)
    if not s:
        return []
    if len(s) <= ngram:
        return [s]
    return [s[i:i + ngram] for i in range(len(s) - ngram + 1)]


def _word_crcs(words: list[str]) -> np.ndarray:
    crc = zlib.crc32
    try:
        it = map(crc, map(str.encode, words))
        return np.fromiter(it, dtype=np.uint32, count=len(words))
    except UnicodeEncodeError:  # lone surrogates (no control_chars step before this one)
        return np.fromiter((crc(w.encode("utf-8", "surrogatepass")) for w in words), dtype=np.uint32,
                           count=len(words))


def _update(m, hashes: np.ndarray) -> None:
    """``m.update_batch(hashes)`` without datasketch's per-element Python hashfunc calls (identity
    here): the same CPU arithmetic on the whole array (a test checks equal hash values)."""
    try:
        from datasketch.minhash import _SCHEME_DTYPES, _SCHEME_LEGACY, _SCHEME_WIDTHS, _fmix
    except ImportError:  # another datasketch version: the public, slower path
        m.update_batch(hashes.tolist())
        return
    if m.scheme == _SCHEME_LEGACY or len(hashes) == 0:
        m.update_batch(hashes.tolist())
        return
    a, b = m.permutations
    hv = _fmix(hashes.astype(_SCHEME_DTYPES[m.scheme]).reshape(-1, 1), _SCHEME_WIDTHS[m.scheme])
    m.hashvalues = np.minimum(m.hashvalues, (hv * a + b).min(axis=0))


def shingle_hashes(words: list[str], ngram: int = 5) -> list[int]:
    """32-bit hashes of ``shingles(words, ngram)``, what the MinHash is built from.

    Word shingles: each word is hashed once (CRC-32 of its UTF-8 bytes) and a shingle's hash is the
    polynomial ``((c0·P + c1)·P + c2)·P ... mod 2^32`` of its words' CRCs (P = the FNV prime), computed
    for all shingles at once with numpy; distinct shingles collide with probability ~2^-32, like any
    32-bit hash (datasketch mixes the value with MurmurHash3's finalizer before permuting it).
    Character shingles: CRC-32 of each shingle's UTF-8 bytes.
    """
    return _shingle_array(words, ngram).tolist()


def _shingle_array(words: list[str], ngram: int) -> np.ndarray:
    """``shingle_hashes`` as a uint32 array (what NearDedup uses, without a list round trip)."""
    if len(words) >= ngram:
        wh = _word_crcs(words)
        m = len(words) - ngram + 1
        h = wh[:m].copy()
        for k in range(1, ngram):
            h *= _P
            h += wh[k:k + m]
        return h
    crc = zlib.crc32
    return np.fromiter((crc(s.encode("utf-8", "surrogatepass")) for s in shingles(words, ngram)), dtype=np.uint32)


def record_words(rec: dict) -> list[str]:
    """The normalized words of a record's model-visible texts, in order (texts joined by a space)."""
    words: list[str] = []
    for t in texts(rec):
        words += normalize_for_match(t)
    return words


class _Store:
    """Append-only uint32 rows in an anonymous temporary file (deleted on close), read with pread."""

    def __init__(self, data: bytes = b""):
        self._f = tempfile.TemporaryFile(prefix="tunelab-near-dedup-", buffering=0)
        self._offsets, self._lengths = array("q"), array("I")
        self._end = 0
        if data:
            self._f.write(data)
            self._end = len(data)

    def __len__(self) -> int:
        return len(self._offsets)

    def append(self, row: np.ndarray) -> None:
        b = row.astype(np.uint32, copy=False).tobytes()
        os.pwrite(self._f.fileno(), b, self._end)
        self._offsets.append(self._end)
        self._lengths.append(len(b))
        self._end += len(b)

    def get(self, i: int) -> np.ndarray:
        return np.frombuffer(os.pread(self._f.fileno(), self._lengths[i], self._offsets[i]), dtype=np.uint32)

    def __getstate__(self) -> dict:
        return {"data": os.pread(self._f.fileno(), self._end, 0) if self._end else b"",
                "offsets": self._offsets, "lengths": self._lengths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data"])
        self._offsets, self._lengths = state["offsets"], state["lengths"]


@functools.lru_cache(maxsize=32)
def _lsh_shape(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) from datasketch's ``_optimal_param`` (~0.1 s of numerical integration: cached, since a
    recipe's steps are built once to validate it and once to run it)."""
    from datasketch.lsh import _optimal_param

    return _optimal_param(threshold, num_perm, *LSH_WEIGHTS)


class NearDedup(Step):
    """Drops records whose word-shingle Jaccard similarity with an earlier kept record is
    ≥ ``threshold``: reason "near_duplicate", ``detail`` the index of that earlier record."""

    name = "near_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                 verify: bool = True):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        if num_perm < 2:
            raise ValueError(f"num_perm must be at least 2, got {num_perm!r}")
        if ngram < 1:
            raise ValueError(f"ngram must be at least 1, got {ngram!r}")
        ds = require("datasketch", "data")

        self.threshold, self.num_perm, self.ngram, self.seed = float(threshold), int(num_perm), int(ngram), int(seed)
        # verify: LSH finds candidates, the exact Jaccard of the shingle sets decides. The MinHash
        # estimate alone is ±0.035 (1 sd at 128 permutations) around the threshold, which cost ~15%
        # precision and recall on pairs near it; verification stores each kept record's shingle hashes.
        self.verify = bool(verify)
        self.bands, self.rows = _lsh_shape(self.threshold, self.num_perm)
        rng = np.random.default_rng(self.seed)
        # odd 64-bit multipliers: a band's key is a random linear hash of its MinHash values, mixed
        self._mult = (rng.integers(0, 2**63, size=(self.bands, self.rows), dtype=np.uint64) << np.uint64(1)) | \
            np.uint64(1)
        self._band_salt = rng.integers(0, 2**63, size=self.bands, dtype=np.uint64)
        self._minhash = ds.MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity)
        self._table = IntMultiMap(4096, np.uint32)
        self._store = _Store()
        self._index = array("q")  # row → index of the kept record among records seen
        self.count = 0  # records seen

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "num_perm": self.num_perm, "ngram": self.ngram, "seed": self.seed,
                "verify": self.verify, "lsh_bands": self.bands, "lsh_rows": self.rows}

    def minhash(self, rec: dict):
        """The record's MinHash (a fresh ``datasketch.MinHash``), e.g. to compare two records."""
        m = self._minhash.copy()
        m.clear()
        m.update_batch(shingle_hashes(record_words(rec), self.ngram))
        return m

    def signature(self, row: int) -> np.ndarray:
        """The stored MinHash values of the ``row``-th kept record."""
        return self._store.get(row)[:self.num_perm]

    def band_keys(self, hv: np.ndarray) -> np.ndarray:
        """One non-zero uint32 key per LSH band of the MinHash values ``hv``."""
        x = (hv[:self.bands * self.rows].astype(np.uint64).reshape(self.bands, self.rows) * self._mult).sum(
            axis=1, dtype=np.uint64) + self._band_salt
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)  # MurmurHash3's 64-bit finalizer
        x ^= x >> np.uint64(33)
        return nonzero(x >> np.uint64(32), np.uint32)

    def precompute(self, rec: dict):
        """The record's state-free work: (unique shingle hashes, MinHash values, band keys), or None
        for a record without words. Pure: runs in worker processes."""
        hashes = _shingle_array(record_words(rec), self.ngram)
        if not len(hashes):
            return None
        m = self._minhash  # one buffer per process: each worker has its own copy of the step
        m.clear()
        _update(m, hashes)
        hv = m.hashvalues.astype(np.uint32)  # values < 2^32 (datasketch masks them)
        return (np.unique(hashes) if self.verify else None), hv, self.band_keys(hv)

    def apply(self, rec: dict, pre) -> dict | Drop:
        i = self.count
        self.count += 1
        if pre is None:
            return rec
        mine, hv, keys = pre
        cands = self._table.get(keys)
        if cands:
            rows = sorted(set(cands))  # ascending: the earliest record wins ties
            n = self.num_perm
            best_j, best_row = -1.0, None
            # only candidates whose estimate is within ~4 sd below the threshold can be true matches
            floor = (self.threshold - 4 * (self.threshold * (1 - self.threshold) / n) ** 0.5) * n
            for r in rows:
                stored = self._store.get(r)
                sim = int(np.count_nonzero(stored[:n] == hv))
                if self.verify:
                    if sim < floor:
                        continue
                    other = stored[n:]
                    inter = np.intersect1d(mine, other, assume_unique=True).size
                    j = inter / (mine.size + other.size - inter)
                else:
                    j = sim / n
                if j > best_j:
                    best_j, best_row = j, r
            if best_row is not None and best_j >= self.threshold:
                return Drop("near_duplicate", str(self._index[best_row]))
        row = len(self._index)
        self._store.append(np.concatenate([hv, mine]) if self.verify else hv)
        self._table.add(keys, row)
        self._index.append(i)
        return rec

    def __call__(self, rec: dict) -> dict | Drop:
        return self.apply(rec, self.precompute(rec))

