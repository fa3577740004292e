"""Padding-free batching: one row per batch, position ids restarting per example, no attention across examples."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.numerics import (IGNORE_INDEX, PadCollator, PaddingFreeCollator, ensure_chat_template,
                                     response_only_loss, tokenize_all_chats)

CHATS = [
    [{"role": "user", "content": "What color is the small cat?"}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which color is the dog?"},
     {"role": "assistant", "content": "The dog is blue, sir. The big dog is green."}],
    [{"role": "user", "content": "Tell me the color of the old bird."}, {"role": "assistant", "content": "Green."}],
]


@pytest.fixture(scope="module")
def feats(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ensure_chat_template(tok)
    f, _ = tokenize_all_chats(tok, CHATS, None)
    assert len({len(x["input_ids"]) for x in f}) == 3  # different lengths: padded batching would pad
    return f


def _model(tiny_model, attn="sdpa", lora=False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    if lora:
        from peft import LoraConfig, get_peft_model

        m = get_peft_model(m, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return m.eval()


def test_collator_concatenates_with_restarting_positions():
    b = PaddingFreeCollator()([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]},
                               {"input_ids": [4], "labels": [4]}])
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no attention_mask: the packed mask comes from positions
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 4]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    # each example's first position is never a target: no loss across an example boundary
    assert b["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9, IGNORE_INDEX]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_sees_only_itself(tiny_model, feats, attn):
    model = _model(tiny_model, attn)
    packed = PaddingFreeCollator()(feats)
    with torch.no_grad():
        # use_cache=False: with a KV cache transformers does not build the packed mask (response_only_loss passes it)
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        start = 0
        for f in feats:
            k = len(f["input_ids"])
            alone = model(input_ids=torch.tensor([f["input_ids"]])).logits[0]
            torch.testing.assert_close(logits[start:start + k], alone, rtol=1e-4, atol=1e-5)
            start += k
        # the control: the same row without restarting positions lets later examples attend to earlier ones
        plain = model(input_ids=packed["input_ids"], use_cache=False).logits[0]
    k0 = len(feats[0]["input_ids"])
    assert not torch.allclose(plain[k0:], logits[k0:], atol=1e-3)


@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_gradients_equal_padded_batching(tiny_model, feats, lora):
    model = _model(tiny_model, lora=lora).train()
    assert model.config.use_cache  # the model's default: response_only_loss must still get the packed mask
    padded = PadCollator(0)(feats)
    packed = PaddingFreeCollator()(feats)
    # the same label tokens are trained on
    assert int((padded["labels"][:, 1:] != IGNORE_INDEX).sum()) == int((packed["labels"][:, 1:] != IGNORE_INDEX).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    ref = response_only_loss(model, padded)
    g_ref = torch.autograd.grad(ref, params)
    torch.manual_seed(0)
    ours = response_only_loss(model, packed)
    g_ours = torch.autograd.grad(ours, params)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the model's own loss on the packed row (labels shifted inside) agrees too
    torch.testing.assert_close(model(**packed, use_cache=False).loss, ref, rtol=1e-5, atol=1e-6)
    # gradient-accumulation form (sum / items across micro-batches)
    n = (packed["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(response_only_loss(model, packed, num_items_in_batch=n), ref, rtol=1e-5, atol=1e-6)


def test_per_device_choices_and_config_check():
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.train.device import DevicePlan, checkpoint_every, padding_free
    from tunelab.train.sft import SFTConfig

    amx = DevicePlan("cpu", "bf16", False, "")
    fp32 = DevicePlan("cpu", "fp32", False, "")
    gpu = DevicePlan("cuda", "bf16", False, "")
    # auto: padding-free only where a varlen kernel skips the blocks between examples
    assert not padding_free("auto", amx, "sdpa")[0] and not padding_free("auto", gpu, "sdpa")[0]
    assert padding_free("auto", gpu, "flash_attention_2")[0] and not padding_free("auto", amx, "flash_attention_2")[0]
    assert padding_free(True, amx, "sdpa")[0]
    assert padding_free(False, gpu, "flash_attention_2") == (False, "set to false by the recipe")
    # checkpointing: the recipe's explicit choice wins; auto is off (the memory plan may turn it on)
    assert (checkpoint_every(None, amx), checkpoint_every(None, fp32), checkpoint_every(None, gpu)) == (0, 0, 0)
    assert (checkpoint_every(True, fp32), checkpoint_every(False, amx)) == (1, 0)
    base = {"model": {"name": "m"}, "data": {"train": "t.jsonl"}}
    assert cfglib.validate(SFTConfig, base).train.padding_free == "auto"
    with pytest.raises(ConfigError, match="padding_free"):
        cfglib.validate(SFTConfig, {**base, "method": "prompt_tuning", "train": {"padding_free": True}})
    assert cfglib.validate(SFTConfig, {**base, "method": "prompt_tuning"}).method == "prompt_tuning"
