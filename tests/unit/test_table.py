"""IntMultiMap: the numpy multimap behind exact and near dedup, checked against a dict of lists."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.data._table import IntMultiMap, nonzero


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("key_range", [2**16, 2**63])  # dense small keys and keys with an unused top bit
def test_multimap_equals_a_dict_of_lists(dtype, key_range):
    rng = np.random.default_rng(0)
    table, ref, prev = IntMultiMap(16, dtype), {}, None
    for v in range(3000):
        keys = nonzero(rng.integers(0, key_range, 14, dtype=np.uint64), dtype)
        if prev is not None and v % 7 == 0:
            keys[:3] = prev[:3]  # repeated keys: a multimap keeps every value
        table.add(keys, v)
        for k in keys.tolist():
            ref.setdefault(k, []).append(v)
        prev = keys
    assert len(table) == 3000 * 14
    assert len(table) / len(table._keys) <= 0.6  # grew as it filled
    for k, vs in ref.items():
        assert sorted(table.get(np.array([k], dtype=dtype))) == sorted(vs)
    absent = [k for k in range(1, 200) if k not in ref][:20]
    assert table.get(np.array(absent, dtype=dtype)) == []
    batch = np.array(list(ref)[:5], dtype=dtype)
    assert sorted(table.get(batch)) == sorted(v for k in batch.tolist() for v in ref[k])


def test_setdefault_returns_the_first_value():
    t = IntMultiMap(4)
    for i in range(1, 500):  # forces several growths
        assert t.setdefault(i * 7919, i) == i
    assert all(t.setdefault(i * 7919, 0) == i for i in range(1, 500))
    assert len(t) == 499
    assert nonzero(np.array([0, 5], dtype=np.uint64)).tolist() == [1, 5]
