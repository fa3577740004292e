"""Packing raw text into fixed blocks, block perplexity, held-out splits and replay mixing (pretrain / CPT)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tunelab.train.numerics import blocks_nll, blocks_perplexity, pack_blocks

EOS = 0


def test_pack_joins_documents_with_eos_and_cuts_fixed_blocks():
    docs = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9]]
    p = pack_blocks(docs, block_size=4, eos_id=EOS)
    # stream: 1 2 3 E 4 5 E 6 7 8 9 E — 12 tokens, exactly 3 blocks; the empty document adds nothing
    assert p.blocks == [[1, 2, 3, EOS], [4, 5, EOS, 6], [7, 8, 9, EOS]]
    assert (p.documents, p.tokens, p.dropped) == (3, 12, 0)
    assert p.as_dict() == {"documents": 3, "tokens": 12, "blocks": 3, "block_size": 4, "dropped_tokens": 0}


def test_pack_drops_and_counts_the_final_partial_block():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    p = pack_blocks(iter(docs), block_size=5, eos_id=EOS)  # any iterable, e.g. a generator of tokenized batches
    assert p.blocks == [[1, 2, 3, EOS, 4], [5, EOS, 6, 7, 8]]
    assert p.dropped == 2  # "9 EOS" did not fill a block
    assert all(len(b) == 5 for b in p.blocks)
    # every token is either in a block or counted as dropped; one EOS per non-empty document
    assert sum(map(len, p.blocks)) + p.dropped == p.tokens == sum(len(d) + 1 for d in docs)


def test_pack_eos_after_every_document_including_the_last():
    docs = [[5] * 3, [6] * 4, [7] * 2]
    p = pack_blocks(docs, block_size=len(sum(docs, [])) + len(docs), eos_id=EOS)  # one block holds everything
    (block,) = p.blocks
    assert [i for i, t in enumerate(block) if t == EOS] == [3, 8, 11]
    assert p.dropped == 0


def test_pack_edge_cases():
    assert pack_blocks([], 8, EOS).blocks == []
    short = pack_blocks([[1, 2]], 8, EOS)
    assert short.blocks == [] and short.dropped == 3 and short.tokens == 3
    with pytest.raises(ValueError):
        pack_blocks([[1, 2, 3]], 1, EOS)


@pytest.fixture(scope="module")
def tiny_lm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_block_perplexity_equals_exp_mean_nll_from_the_models_own_loss(tiny_lm):
    import random

    import torch

    rng = random.Random(1)
    docs = [[rng.randrange(1, 40) for _ in range(rng.randint(3, 30))] for _ in range(12)]
    blocks = pack_blocks(docs, 16, EOS).blocks
    assert len(blocks) >= 5
    # by hand: the model's own (mean) loss per block × the tokens it predicts, summed, over all predicted tokens
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in blocks:
            ids = torch.tensor([b])
            nll += float(tiny_lm(input_ids=ids, labels=ids).loss) * (len(b) - 1)
            n += len(b) - 1
    # batch size 3 does not divide the block count: a last short batch must not change the weighting
    total, count = blocks_nll(tiny_lm, blocks, batch_size=3)
    assert count == n == len(blocks) * 15
    assert total == pytest.approx(nll, rel=1e-5)
    ppl = blocks_perplexity(tiny_lm, blocks, batch_size=3)
    assert ppl["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert ppl["tokens"] == n and ppl["blocks"] == len(blocks)
    assert blocks_perplexity(tiny_lm, blocks, batch_size=64)["perplexity"] == pytest.approx(ppl["perplexity"], rel=1e-5)
    assert not tiny_lm.training  # left as it was


def test_load_texts_units_records_and_rejects(tmp_path):
    from tunelab.data.lineage import expand_files
    from tunelab.data.loaders import load_texts

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("First para.\nstill first.\n \nSecond para.\n\n\nThird.\n")
    (tmp_path / "docs" / "b.md").write_text("Only one.")
    (tmp_path / "docs" / "skip.bin").write_text("not text")
    recs = tmp_path / "r.jsonl"
    recs.write_text("\n".join([json.dumps({"text": "a record"}), "{broken",
                               json.dumps({"instruction": "Q?", "output": "A."}),
                               json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"})]) + "\n")
    rejects: list[dict] = []
    docs = load_texts([str(tmp_path / "docs")], "document", None, rejects)
    assert len(docs) == 2 and docs[1] == "Only one."
    paras = load_texts([str(tmp_path / "docs")], "paragraph", None, rejects)
    # a whitespace-only line separates paragraphs too (wikitext writes " \n")
    assert paras == ["First para.\nstill first.", "Second para.", "Third.", "Only one."]
    assert load_texts([str(tmp_path / "docs")], "paragraph", 2, rejects) == paras[:2]
    assert not rejects
    texts = load_texts([str(recs)], "document", None, rejects)
    assert texts == ["a record", "Q?\n\nA."]  # a chat record becomes its text
    assert [r["line"] for r in rejects] == [2, 4] and "invalid JSON" in rejects[0]["reason"]
    assert [p.name for p in expand_files([str(tmp_path / "docs")], "data.files")] == ["a.txt", "b.md"]


def test_missing_files_are_one_error(tmp_path):
    from tunelab.data.lineage import expand_files
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="data.files: not found: .*nope.txt"):
        expand_files([str(tmp_path / "nope.txt")], "data.files")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TunelabError, match="no .txt/.md files"):
        expand_files([str(tmp_path / "empty")], "data.files")


def test_heldout_split_is_by_content():
    from tunelab.data.loaders import split_heldout
    from tunelab.train.blocks import spread

    texts = [f"document number {i}" for i in range(400)]
    train, held = split_heldout(texts, 0.1)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    # the same on a shuffled order; a duplicate lands on the same side as its twin
    train2, held2 = split_heldout(list(reversed(texts)) + [held[0]], 0.1)
    assert sorted(held2) == sorted(held + [held[0]]) and set(train2) == set(train)
    assert spread(list(range(10)), 4) == [0, 2, 5, 7] and spread([1, 2], 5) == [1, 2] and spread([1, 2], None) == [1, 2]


def test_replay_share_and_repetition():
    from tunelab.train.cpt import replay_blocks

    general = [[i] * 4 for i in range(100)]
    picked, rep = replay_blocks(general, n_domain=80, ratio=0.2, seed=3)
    assert len(picked) == 20 and rep["actual_share"] == 0.2 and not rep["repeated"]
    assert len({b[0] for b in picked}) == 20  # without replacement
    assert picked == replay_blocks(general, 80, 0.2, seed=3)[0]  # fixed by the seed
    picked, rep = replay_blocks(general[:10], n_domain=80, ratio=0.5, seed=3)
    assert len(picked) == 80 and rep["repeated"]
    counts = [sum(b[0] == i for b in picked) for i in range(10)]
    assert counts == [8] * 10  # repeated evenly
    assert replay_blocks(general, 80, 0.0, seed=3)[0] == []


def test_configs_check_shapes_and_sources():
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.train.cpt import CPTConfig
    from tunelab.train.pretrain import PretrainConfig

    with pytest.raises(ConfigError) as e:
        cfglib.validate(PretrainConfig, {"model": {"hidden_size": 30, "heads": 4}, "data": {"files": ["x.txt"]},
                                         "tokenizer": {"path": "tok", "vocab_size": 500}})
    msg = str(e.value)
    assert "divisible by heads" in msg and "not both" in msg
    with pytest.raises(ConfigError, match="kv_heads"):
        cfglib.validate(PretrainConfig, {"model": {"heads": 4, "kv_heads": 3}, "data": {"files": ["x.txt"]}})
    with pytest.raises(ConfigError, match="exceeds model.context_length"):
        cfglib.validate(PretrainConfig, {"model": {"context_length": 64}, "data": {"files": ["x"], "block_size": 128}})
    with pytest.raises(ConfigError, match="replay.ratio"):
        cfglib.validate(CPTConfig, {"model": {"name": "m"}, "data": {"files": ["x"]},
                                    "replay": {"files": ["g"], "ratio": 1.0}})


@pytest.mark.parametrize("recipe", ["pretrain", "cpt"])
def test_block_recipes_refuse_padding_free(recipe):
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.train.cpt import CPTConfig
    from tunelab.train.pretrain import PretrainConfig

    cls = {"pretrain": PretrainConfig, "cpt": CPTConfig}[recipe]
    base = {"data": {"files": ["x.txt"]}, **({"model": {"name": "m"}} if recipe == "cpt" else {})}
    for value in (True, False):
        with pytest.raises(ConfigError, match=f"train.padding_free: the {recipe} recipe does not read this option"):
            cfglib.validate(cls, {**base, "train": {"padding_free": value}})
    # a stored config.yaml lists every field at its value, defaults included: --resume reads it back
    cfg = cfglib.validate(cls, base)
    assert cfglib.validate(cls, yaml.safe_load(cfglib.dump(cfg))) == cfg
    # length grouping is accepted and changes nothing: every packed block has one length
    assert cfglib.validate(cls, {**base, "train": {"group_by_length": False}}).train.group_by_length is False


def test_cpt_bad_model_name_leaves_no_run_folder(tmp_path):
    from tunelab.errors import TunelabError
    from tunelab.train.cpt import CPTConfig, run
    from tunelab.workspace import Workspace

    text = tmp_path / "t.txt"
    text.write_text("\n\n".join(f"Paragraph number {i} about contracts." for i in range(60)))
    cfg = CPTConfig(model={"name": "no-such-model"}, data={"files": [str(text)], "text_unit": "paragraph",
                                                           "heldout_share": 0.2})
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(TunelabError, match="unknown model 'no-such-model'"):
        run(cfg, ws)
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())
    assert ws.catalog().list_runs() == []
