"""Teacher/student references for distillation: model folders and run ids (model/ or base + adapter)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tunelab.errors import ConfigError, TunelabError
from tunelab.models.refs import load as load_model, resolve as resolve_model_ref
from tunelab.train.distill import DistillConfig, check_same_vocabulary
from tunelab.workspace import Workspace


def _fake_run(ws: Workspace, run_id: str, base) -> object:
    d = ws.runs_dir / run_id
    d.mkdir(parents=True)
    (d / "config.yaml").write_text("recipe: sft\n")
    (d / "lineage.json").write_text(json.dumps({"base_model": str(base), "base_model_path": str(base)}))
    return d


def test_folder_and_run_refs(tmp_path, tiny_model):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws = Workspace.resolve(tmp_path / "ws")
    plain = resolve_model_ref(str(tiny_model), ws)
    assert plain.path == tiny_model.resolve() and plain.adapter is None and plain.run_id is None

    # an adapter run: base (from its lineage) + adapter, merged for a frozen teacher
    d = _fake_run(ws, "sft-lora-20260101-000000-abcd", tiny_model)
    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                                LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(d / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(d / "adapter")
    ref = resolve_model_ref("sft-lora", ws)  # a unique prefix is enough
    assert ref.adapter == d / "adapter" and ref.path == tiny_model and ref.run_id == d.name
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), d / "adapter")(ids).logits
        merged = load_model(ref, merge=True)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter is not a no-op
    trainable = load_model(ref, trainable=True)  # a student keeps training its adapter
    assert hasattr(trainable, "peft_config") and any(p.requires_grad for p in trainable.parameters())

    # a full fine-tuning run: its model/ folder
    d2 = _fake_run(ws, "sft-full-20260101-000000-ef01", tiny_model)
    shutil.copytree(tiny_model, d2 / "model")
    full = resolve_model_ref(d2.name, ws)
    assert full.path == d2 / "model" and full.adapter is None

    # ambiguous prefix, a run without weights, an unknown name: one-line errors
    with pytest.raises(TunelabError, match="matches 2 runs"):
        resolve_model_ref("sft-", ws)
    _fake_run(ws, "dpo-unfinished-1", tiny_model)
    with pytest.raises(TunelabError, match="no trained weights"):
        resolve_model_ref("dpo-unfinished", ws)
    with pytest.raises(TunelabError, match="unknown model"):
        resolve_model_ref("no-such-model", ws)
    with pytest.raises(TunelabError, match="unknown model|not a Hugging Face"):
        resolve_model_ref(str(tmp_path / "missing" / "folder"), ws)


def test_vocabulary_check(tiny_model):
    from transformers import AutoTokenizer

    a = AutoTokenizer.from_pretrained(tiny_model)
    check_same_vocabulary(a, AutoTokenizer.from_pretrained(tiny_model), "t", "s")
    b = AutoTokenizer.from_pretrained(tiny_model)
    b.add_tokens(["<extra>"])
    with pytest.raises(TunelabError, match="share a tokenizer") as e:
        check_same_vocabulary(a, b, "t", "s")
    assert "\n" not in str(e.value)


def _cfg(**over):
    base = {"recipe": "distill", "teacher": {"name": "t"}, "student": {"name": "s"},
            "data": {"train": "x.jsonl", "test": "y.jsonl"}}
    return DistillConfig.model_validate({**base, **over})


def test_config_rules():
    from tunelab import config as cfglib

    assert _cfg().mode == "logits" and _cfg().method == "full"
    for bad, words in (({"mode": "sequence", "temperature": 2.0}, "mode: logits only"),
                       ({"jsd_beta": 0.3}, "loss: jsd only"),
                       ({"data": {"train": "x.jsonl"}}, "held-out"),
                       ({"loss": "reverse_kl"}, "loss"),
                       ({"method": "prompt_tuning"}, "method")):
        with pytest.raises(ConfigError, match=words):
            cfglib.validate(DistillConfig, {"recipe": "distill", "teacher": {"name": "t"}, "student": {"name": "s"},
                                            "data": {"train": "x.jsonl", "test": "y.jsonl"}, **bad})
    # a dumped config (all defaults written out) loads back equal: what --resume reads
    c = _cfg(mode="sequence")
    assert cfglib.validate(DistillConfig, yaml.safe_load(cfglib.dump(c))) == c


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_bad_model_name_leaves_no_run(tmp_path, tiny_model, which):
    from tests.conftest import write_color_data
    from tunelab.train import distill

    data = write_color_data(tmp_path / "chats.jsonl", 8, seed=1)
    names = {"teacher": str(tiny_model), "student": str(tiny_model), which: "no-such-model"}
    cfg = _cfg(teacher={"name": names["teacher"]}, student={"name": names["student"]},
               data={"train": str(data), "test": str(data)})
    ws = Workspace.resolve(tmp_path / "ws")
    with pytest.raises(TunelabError, match="unknown model") as e:
        distill.run(cfg, ws)
    assert "\n" not in str(e.value)
    assert not ws.runs_dir.exists() or not list(ws.runs_dir.iterdir())  # no run folder
    assert ws.catalog().list_runs() == []  # and no catalog row


def test_unread_train_options():
    from tunelab import config as cfglib

    base = {"recipe": "distill", "teacher": {"name": "t"}, "student": {"name": "s"},
            "data": {"train": "x.jsonl", "test": "y.jsonl"}}
    # padding-free batches are SFT's: distillation pads (teacher and student see the same rows)
    for value in (True, False):
        with pytest.raises(ConfigError, match="train.padding_free: the distill recipe does not read this option"):
            cfglib.validate(DistillConfig, {**base, "train": {"padding_free": value}})
    # length-grouped batches are read (the Trainer's sampler): both values are accepted
    for value in (True, False):
        assert cfglib.validate(DistillConfig, {**base, "train": {"group_by_length": value}}).train.group_by_length \
            is value
