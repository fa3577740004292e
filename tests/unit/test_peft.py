"""PEFT methods (tunelab/train/peft.py) on a tiny random-init Llama: each trains, reports its size, reloads exactly."""

from __future__ import annotations

import json

import pytest

from tests.conftest import write_color_data
from tunelab.errors import TunelabError
from tunelab.sections import LoraSection
from tunelab.train.export import merge_adapter
from tunelab.train.peft import (MERGEABLE, IA3Section, PeftSection, PromptSection, adapter_report, apply_peft,
                                check_requirements, peft_config)

METHODS = ["lora", "dora", "rslora", "prompt_tuning", "prefix_tuning", "p_tuning", "ia3"]
# learning rates at which 10 steps on one batch clearly lower the loss (prompt methods need large ones)
LR = {"prompt_tuning": 3e-1, "prefix_tuning": 3e-1, "p_tuning": 1e-2, "ia3": 1e-1}
NV = 4  # virtual tokens


@pytest.fixture(scope="module")
def batch(tiny_model, tmp_path_factory):
    from transformers import AutoTokenizer

    from tunelab.train.numerics import PadCollator, ensure_chat_template, tokenize_all_chats

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_chat_template(tok)
    path = write_color_data(tmp_path_factory.mktemp("peft") / "d.jsonl", 8, seed=5)
    chats = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
             for r in map(json.loads, path.read_text().splitlines())]
    feats, _ = tokenize_all_chats(tok, chats, 64)
    return PadCollator(tok.pad_token_id)(feats)


def _expected_trainable(method: str, base) -> int:
    """Trainable parameters each method should add, from the architecture (independent of peft's counting)."""
    import torch

    cfg = base.config
    kv_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    linears = {n.rsplit(".", 1)[-1]: m for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = [m for n, m in base.model.named_modules() if isinstance(m, torch.nn.Linear)]
    r = 8
    if method in ("lora", "rslora"):
        return sum(r * (m.in_features + m.out_features) for m in layers)
    if method == "dora":  # + a magnitude per output feature
        return sum(r * (m.in_features + m.out_features) + m.out_features for m in layers)
    if method == "prompt_tuning":
        return NV * cfg.hidden_size
    if method == "prefix_tuning":  # a key and a value prefix per layer
        return NV * cfg.num_hidden_layers * 2 * kv_dim
    if method == "ia3":  # peft's Llama default: scale k and v outputs and the down projection's input
        per_layer = linears["k_proj"].out_features + linears["v_proj"].out_features + linears["down_proj"].in_features
        return cfg.num_hidden_layers * per_layer
    if method == "p_tuning":  # virtual-token embeddings + a 3-layer MLP of the model's width
        h = cfg.hidden_size
        return NV * h + 3 * (h * h + h)
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_peft_method_trains_reports_and_reloads(method, tiny_model, batch, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.train.numerics import response_only_loss

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    base_total = sum(p.numel() for p in base.parameters())
    expected = _expected_trainable(method, base)
    section = PeftSection(method=method, lora=LoraSection(dropout=0.0), prompt=PromptSection(num_virtual_tokens=NV))
    model = apply_peft(base, section, tokenizer_path=str(tiny_model))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR.get(method, 1e-2))
    model.train()
    losses = []
    for _ in range(10):
        loss = response_only_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], f"{method} did not learn: {losses}"

    model.eval()
    with torch.no_grad():
        # tunelab's loss equals the model's own (peft pads the labels of virtual tokens itself): no misalignment
        own = model(**batch).loss
        assert response_only_loss(model, batch).item() == pytest.approx(own.item(), rel=1e-5)
        ids = batch["input_ids"][:2]
        trained = model(input_ids=ids, attention_mask=batch["attention_mask"][:2]).logits

    saved = tmp_path / "adapter"
    model.save_pretrained(saved)
    rep = adapter_report(model, saved)
    assert rep["trainable_params"] == expected
    assert rep["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep["total_params"] == base_total + expected  # the adapter's parameters join the frozen base's
    assert rep["trainable_percent"] == pytest.approx(100 * expected / rep["total_params"], abs=1e-4)
    # fp32 safetensors: 4 bytes per saved parameter plus a small header; p_tuning saves the virtual
    # tokens its encoder made, not the encoder (so it trains more than it stores)
    stored = NV * base.config.hidden_size if method == "p_tuning" else expected
    assert 4 * stored < rep["adapter_bytes"] < 4 * stored + 16384

    fresh = AutoModelForCausalLM.from_pretrained(tiny_model)
    back = PeftModel.from_pretrained(fresh, saved).eval()
    with torch.no_grad():
        again = back(input_ids=ids, attention_mask=batch["attention_mask"][:2]).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=1e-5)

    # merging (tunelab export --merge) folds weight-update adapters into the base, exactly; prompt-family
    # adapters are inputs, not weights: a clear error
    if method in MERGEABLE:
        merged = merge_adapter(tiny_model, saved).eval()
        assert not hasattr(merged, "peft_config")
        with torch.no_grad():
            m = merged(input_ids=ids, attention_mask=batch["attention_mask"][:2]).logits
        # (W + BA)x and Wx + B(Ax) round differently: fp32 agreement to 1e-5 of the largest logit (~20 ulp here)
        torch.testing.assert_close(m, trained, atol=1e-5 * float(trained.abs().max()), rtol=1e-5)
    else:
        with pytest.raises(TunelabError, match="cannot be merged"):
            merge_adapter(tiny_model, saved)


def test_dora_and_rslora_configs():
    assert peft_config(PeftSection(method="dora")).use_dora
    assert peft_config(PeftSection(method="rslora")).use_rslora
    lo = peft_config(PeftSection(method="lora"))
    assert not lo.use_dora and not lo.use_rslora
    ia3 = peft_config(PeftSection(method="ia3", ia3=IA3Section(target_modules=["v_proj"], feedforward_modules=[])))
    assert set(ia3.target_modules) == {"v_proj"}


def test_misaligned_logits_are_an_error_not_a_shift():
    import torch

    from tunelab.train.numerics import causal_logits

    class Odd(torch.nn.Module):  # returns one logit position too many, and is no prompt-learning model
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(input_ids.size(0), input_ids.size(1) + 1, 5)})()

    with pytest.raises(RuntimeError, match="misaligned"):
        causal_logits(Odd(), torch.zeros(2, 3, dtype=torch.long))


def test_qlora_without_bitsandbytes_or_cpu_kernels_is_one_clear_line(monkeypatch):
    import importlib.metadata
    import importlib.util

    import torch

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(TunelabError) as e:
        check_requirements(PeftSection(method="qlora"))
    msg = str(e.value)
    assert "\n" not in msg and "qlora needs the bitsandbytes package" in msg
    check_requirements(PeftSection(method="lora"))  # other methods need nothing extra

    # bitsandbytes present but too old for 4-bit on CPU, on a machine without CUDA
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(TunelabError, match=r"bitsandbytes >= 0\.46 .*installed: 0\.45\.5"):
        check_requirements(PeftSection(method="qlora"))


def test_prompt_tuning_starts_from_init_text(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "What color is the cat?"
    ids = AutoTokenizer.from_pretrained(tiny_model)(text, add_special_tokens=False)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    words = base.get_input_embeddings().weight.detach().clone()
    model = apply_peft(base, PeftSection(method="prompt_tuning",
                                         prompt=PromptSection(num_virtual_tokens=len(ids), init_text=text)))
    virtual = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(virtual, words[ids])


def test_lora_last_layers_adapts_the_top_layers_and_the_backward_stops_below_them(tiny_model, batch):
    """``lora.last_layers``: adapters only in the last N layers (every linear there, never the LM head), and
    nothing below them joins the autograd graph, so the backward pass does not run through those layers."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    n = base.config.num_hidden_layers
    linears = {k.rsplit(".", 1)[-1] for k, m in base.model.layers.named_modules() if isinstance(m, torch.nn.Linear)}
    model = apply_peft(base, PeftSection(method="lora", lora=LoraSection(last_layers=1, dropout=0.0)))
    trained = [k for k, p in model.named_parameters() if p.requires_grad]
    assert {int(re.search(r"\.layers\.(\d+)\.", k).group(1)) for k in trained} == {n - 1}
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in trained} == linears
    assert not any("lm_head" in k for k in trained)

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                output_hidden_states=True)
    assert not out.hidden_states[n - 1].requires_grad   # the last layer's input: no graph below it
    assert out.hidden_states[n].requires_grad
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert sum(float(p.grad.abs().sum()) for n_, p in model.named_parameters() if "lora_B" in n_) > 0

    every = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model), PeftSection(method="lora"))
    assert every.model(input_ids=batch["input_ids"][:, :4], output_hidden_states=True).hidden_states[1].requires_grad


def test_lora_last_layers_errors_are_one_clear_line(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(TunelabError, match="has 2 layers"):
        peft_config(PeftSection(method="lora", lora=LoraSection(last_layers=3)), model=base)
    with pytest.raises(TunelabError, match="pattern"):
        peft_config(PeftSection(method="lora", lora=LoraSection(last_layers=1, target_modules=".*proj")), model=base)
    with pytest.raises(TunelabError, match="layer count"):
        peft_config(PeftSection(method="lora", lora=LoraSection(last_layers=1)))
    cfg = peft_config(PeftSection(method="dora", lora=LoraSection(last_layers=2, target_modules=["q_proj"])),
                      model=base)
    assert cfg.target_modules == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    assert cfg.use_dora
    with pytest.raises(TunelabError, match="no layer named"):
        peft_config(PeftSection(method="lora", lora=LoraSection(last_layers=1, target_modules=["nope"])), model=base)
    # a recipe's own list of full names (classify passes one) is restricted to the last layers too
    every = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    cfg = peft_config(PeftSection(method="lora", lora=LoraSection(last_layers=1)), model=base, target_modules=every)
    assert cfg.target_modules == {n for n in every if n.startswith("model.layers.1.")} != set(every)


def test_checkpointed_lora_leaves_the_frozen_layers_out_of_the_backward_with_the_same_gradients(tiny_model, batch):
    """Turning gradient checkpointing on makes the embedding output require a gradient (transformers'
    ``enable_input_require_grads``), so the backward runs through the frozen layers below the adapters too.
    ``release_input_grads`` (the run layer's ``InputGradsOff`` callback, under non-reentrant checkpointing)
    removes that: the layers below ``lora.last_layers`` leave the graph and every adapter gradient stays the same."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.train.callbacks import InputGradsOff, release_input_grads

    def run(release: bool):
        torch.manual_seed(0)
        model = apply_peft(AutoModelForCausalLM.from_pretrained(tiny_model),
                           PeftSection(method="lora", lora=LoraSection(last_layers=1, dropout=0.0)))
        with torch.no_grad():  # B starts at zero: give it values so the gradients reach A through it
            for k, p in model.named_parameters():
                if "lora_B" in k:
                    p.normal_(0, 0.05)
        model.train()
        model.get_base_model().activation_checkpointing_enable()  # what the Trainer calls, hook included
        if release:
            InputGradsOff().on_train_begin(SimpleNamespace(activation_checkpointing=True,
                                                           activation_checkpointing_kwargs={"every_n_layers": 1}),
                                           None, None, model=model)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=True)
        n = model.config.num_hidden_layers
        below = out.hidden_states[n - 1].requires_grad  # the last layer's input
        out.loss.backward()
        return below, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}, model

    kept, g_kept, _ = run(release=False)
    cut, g_cut, model = run(release=True)
    assert kept and not cut
    assert g_kept.keys() == g_cut.keys() and g_cut
    for k in g_kept:
        torch.testing.assert_close(g_cut[k], g_kept[k], rtol=1e-5, atol=1e-7)
        assert g_cut[k].abs().sum() > 0
    assert not release_input_grads(model)  # nothing left to remove
    # TRL's trainers turn checkpointing off and on around each reference forward: the hook stays off while training
    base = model.get_base_model()
    base.activation_checkpointing_enable()
    assert getattr(base, "_require_grads_hook", None) is None
    cb = InputGradsOff()
    cb.on_train_begin(SimpleNamespace(activation_checkpointing=True, activation_checkpointing_kwargs=None), None,
                      None, model=model)
    base.activation_checkpointing_enable()
    assert getattr(base, "_require_grads_hook", None) is None
    cb.on_train_end(None, None, None)
    base.activation_checkpointing_enable()  # after training: transformers' behaviour again
    assert base._require_grads_hook is not None
    base.disable_input_require_grads()

    # reentrant checkpointing needs the hook: kept (asked for, or torch's default when other arguments are given)
    for kw in ({"use_reentrant": True}, {"preserve_rng_state": False}):
        model.get_base_model().enable_input_require_grads()
        InputGradsOff().on_train_begin(SimpleNamespace(activation_checkpointing=True,
                                                       activation_checkpointing_kwargs=kw), None, None, model=model)
        assert model.get_base_model()._require_grads_hook is not None
        model.get_base_model().disable_input_require_grads()
