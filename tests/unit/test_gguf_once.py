"""A packaged-model pull parses its GGUF once (tunelab.models.resolve.one_gguf_parse)."""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def _tiny_gguf(path):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("general.name", "tiny")
    w.add_tensor("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_readers_are_shared_inside_and_fresh_outside(tmp_path, monkeypatch):
    from tunelab.models.resolve import one_gguf_parse

    path = _tiny_gguf(tmp_path / "m.gguf")
    parses = []
    real = gguf.GGUFReader

    class Counting(real):
        def __init__(self, *a, **k):
            parses.append(a[0])
            super().__init__(*a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    with one_gguf_parse():
        a = gguf.GGUFReader(path)
        b = gguf.GGUFReader(str(path))  # the same file named another way
        from gguf import GGUFReader  # how transformers imports it, inside its loader

        c = GGUFReader(path)
    assert a is b is c and len(parses) == 1
    assert np.array_equal(np.asarray(a.tensors[0].data).reshape(3, 4), np.arange(12, dtype=np.float32).reshape(3, 4))
    assert gguf.GGUFReader is Counting, "the reader class is put back"
    assert gguf.GGUFReader(path) is not a and len(parses) == 2
