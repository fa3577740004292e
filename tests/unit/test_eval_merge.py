"""Which tuned models `tunelab eval` scores with the adapter merged into the base (refs.lora_merge_blocker,
eval.run.merge_decision): a single LoRA / DoRA / rsLoRA adapter on an unquantized base with untied targets; not
prompt-family or IA3 adapters, a quantized base, a tied weight, or merging turned off."""

from __future__ import annotations

import importlib.util

import pytest

from tunelab.eval.run import merge_decision
from tunelab.models.refs import adapter_kind, lora_merge_blocker


def _peft(tiny_model, config, **load):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model, **load), config)


def _lora(**kw):
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=kw.pop("target_modules", "all-linear"), **kw)


@pytest.mark.parametrize("kw, kind", [({}, "lora"), ({"use_dora": True}, "dora"), ({"use_rslora": True}, "rslora")])
def test_lora_family_on_a_plain_base_is_merged(tiny_model, kw, kind):
    model = _peft(tiny_model, _lora(**kw))
    assert adapter_kind(model) == kind
    assert lora_merge_blocker(model) is None
    d = merge_decision(model)
    assert d["merged"] is True and d["adapter"] == kind and "merge_and_unload" in d["why"]
    off = merge_decision(model, merge=False)  # asked not to: the record says so
    assert off["merged"] is False and "--no-merge" in off["why"]


def test_prompt_tuning_and_ia3_are_not_merged(tiny_model):
    from peft import IA3Config, PromptTuningConfig

    pt = merge_decision(_peft(tiny_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)))
    assert pt == {"adapter": "prompt_tuning", "merged": False, "why": pt["why"]} and "extra inputs" in pt["why"]
    ia3 = merge_decision(_peft(tiny_model, IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj",
                                                                                           "down_proj"],
                                                     feedforward_modules=["down_proj"])))
    assert ia3["adapter"] == "ia3" and not ia3["merged"] and "only LoRA" in ia3["why"]


def test_full_model_has_nothing_to_merge(tiny_model):
    from transformers import AutoModelForCausalLM

    d = merge_decision(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert d["adapter"] is None and d["merged"] is False and "no adapter" in d["why"]


def test_adapter_on_a_tied_weight_is_not_merged(tiny_model):
    """The tiny Llama ties lm_head to embed_tokens: W + BA on lm_head would change the embeddings too."""
    model = _peft(tiny_model, _lora(target_modules=["lm_head"]))
    assert model.get_base_model().config.tie_word_embeddings
    why = lora_merge_blocker(model)
    assert why is not None and "tied" in why and "lm_head" in why and "embed_tokens" in why
    # an untied target on the same model is merged
    assert lora_merge_blocker(_peft(tiny_model, _lora(target_modules=["q_proj"]))) is None


def test_two_adapters_are_not_merged(tiny_model):
    model = _peft(tiny_model, _lora())
    model.add_adapter("second", _lora())
    assert "2 adapters" in lora_merge_blocker(model)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
def test_adapter_on_a_quantized_base_is_not_merged(tiny_model):
    """A 4-bit base (QLoRA as trained) cannot hold W + BA exactly: scored as loaded."""
    import torch
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        model = _peft(tiny_model, _lora(), quantization_config=q, device_map="cpu")
    except Exception as e:  # noqa: BLE001 (no 4-bit kernels for this machine)
        pytest.skip(f"bitsandbytes cannot load a 4-bit model here: {e}")
    why = lora_merge_blocker(model)
    assert why is not None and "quantized" in why
