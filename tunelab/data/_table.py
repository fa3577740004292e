"""A compact integer multimap in flat arrays, for indexes over millions of records.

Python dicts and sets cost ~100 bytes an entry; datasketch's ``MinHashLSH`` ~5 KB per record at
14 bands. This open-addressing table (linear probing, load kept between 0.4 and 0.6) stores a
uint32 or uint64 key and a uint32 value in 8 or 12 bytes a slot, ~16-24 bytes an entry. Keys may
repeat (a multimap): ``get`` returns every value stored under any of the keys asked for. Key 0
marks an empty slot, so callers map their hashes with ``nonzero`` first.

The arrays are ``array.array``, probed one key at a time in plain Python: for the ~14 keys of one
record that is several times faster than vectorised numpy, whose per-call overhead dominates on
arrays this small.
"""

from __future__ import annotations

from array import array

import numpy as np

_MAX_LOAD, _GROWTH = 0.6, 1.5
_FIB, _M64 = 0x9E3779B97F4A7C15, (1 << 64) - 1


def nonzero(keys: np.ndarray, dtype=np.uint64) -> np.ndarray:
    """``keys`` as ``dtype`` with 0 replaced by 1 (0 is the empty-slot marker)."""
    keys = keys.astype(dtype, copy=True)
    keys[keys == 0] = 1
    return keys


class IntMultiMap:
    """Key (uint32 or uint64) → uint32 values; ``len`` is the number of (key, value) entries.

    A key's first slot is the top 32 bits of its Fibonacci hash scaled to the table size (Lemire's
    multiply-shift range reduction), so keys that use few bits still spread over the whole table."""

    def __init__(self, capacity: int = 4096, key_dtype=np.uint64):
        self.key_dtype = np.dtype(key_dtype)
        self._code = "I" if self.key_dtype.itemsize == 4 else "Q"
        self._alloc(max(16, int(capacity / _MAX_LOAD) + 1))
        self._n = 0

    def _alloc(self, cap: int) -> None:
        self._cap = cap
        self._keys = array(self._code, [0]) * cap  # repetition: no temporary buffer of the full size
        self._vals = array("I", [0]) * cap

    def __len__(self) -> int:
        return self._n

    @property
    def nbytes(self) -> int:
        return self._cap * (self._keys.itemsize + 4)

    def _slot(self, key: int) -> int:
        return ((((key * _FIB) & _M64) >> 32) * self._cap) >> 32

    def get(self, keys) -> list[int]:
        """Every value stored under any of ``keys`` (non-zero ints or an integer array)."""
        tk, tv, cap = self._keys, self._vals, self._cap
        out: list[int] = []
        for key in keys.tolist() if hasattr(keys, "tolist") else keys:
            s = ((((key * _FIB) & _M64) >> 32) * cap) >> 32
            while True:
                k = tk[s]
                if k == key:
                    out.append(tv[s])
                elif k == 0:
                    break
                s += 1
                if s == cap:
                    s = 0
        return out

    def add(self, keys, value: int) -> None:
        """Store ``value`` under each of ``keys`` (non-zero ints or an integer array)."""
        keys = keys.tolist() if hasattr(keys, "tolist") else list(keys)
        if self._n + len(keys) > _MAX_LOAD * self._cap:
            self._grow(self._n + len(keys))
        tk, tv, cap = self._keys, self._vals, self._cap
        for key in keys:
            s = ((((key * _FIB) & _M64) >> 32) * cap) >> 32
            while tk[s]:
                s += 1
                if s == cap:
                    s = 0
            tk[s] = key
            tv[s] = value
        self._n += len(keys)

    def setdefault(self, key: int, value: int) -> int:
        """The first value stored under ``key`` (a non-zero int); stores ``value`` when there is none."""
        tk, cap = self._keys, self._cap
        s = self._slot(key)
        while True:
            k = tk[s]
            if k == key:
                return self._vals[s]  # setdefault stores a key once, so this is its only value
            if k == 0:
                break
            s += 1
            if s == cap:
                s = 0
        if self._n + 1 > _MAX_LOAD * cap:
            self._grow(self._n + 1)
            return self.setdefault(key, value)
        tk[s] = key
        self._vals[s] = value
        self._n += 1
        return value

    def _grow(self, need: int) -> None:
        old_k, old_v, cap = self._keys, self._vals, self._cap
        while need > _MAX_LOAD * cap:
            cap = int(cap * _GROWTH)
        k = np.frombuffer(old_k, dtype=self.key_dtype)
        v = np.frombuffer(old_v, dtype=np.uint32)
        used = k != 0
        k, v = k[used], v[used]
        self._alloc(cap)
        tk, tv = self._keys, self._vals
        step = 1 << 16  # in slices: a list of millions of Python ints would cost ~40 bytes an entry
        for i in range(0, k.size, step):
            for key, val in zip(k[i:i + step].tolist(), v[i:i + step].tolist()):
                s = ((((key * _FIB) & _M64) >> 32) * cap) >> 32
                while tk[s]:
                    s += 1
                    if s == cap:
                        s = 0
                tk[s] = key
                tv[s] = val
