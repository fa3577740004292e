"""Loss masking, EOS, truncation, padding and the response-only loss — the shared numerics."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.numerics import (IGNORE_INDEX, PadCollator, TokenStats, ensure_chat_template, prompt_ids,
                                     response_only_loss, tokenize_all_chats, tokenize_chat)

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What color is the small cat?"},
        {"role": "assistant", "content": "The small cat is red."}]


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(tiny_model)
    assert ensure_chat_template(t)  # the tiny model has none: tunelab's fallback is used
    return t


def test_labels_only_on_response_and_eos(tok):
    t = tokenize_chat(tok, CHAT, max_length=None)
    labeled = [i for i, x in zip(t.input_ids, t.labels) if x != IGNORE_INDEX]
    assert tok.decode(labeled).replace(" ", "") == "The small cat is red.</s>".replace(" ", "")
    assert labeled[-1] == tok.eos_token_id  # the model learns to stop
    # labels equal inputs where set; everything before the response is masked
    first = next(i for i, x in enumerate(t.labels) if x != IGNORE_INDEX)
    assert all(x == IGNORE_INDEX for x in t.labels[:first])
    assert all(x == i for i, x in zip(t.input_ids, t.labels) if x != IGNORE_INDEX)
    # the prompt used for generation is exactly the unlabeled prefix
    assert prompt_ids(tok, CHAT) == t.input_ids[:first]


def test_multi_turn_masks_every_user_turn(tok):
    chat = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Color of the cat?"}, {"role": "assistant", "content": "Red."}]
    t = tokenize_chat(tok, chat, None)
    text = tok.decode([i for i, x in zip(t.input_ids, t.labels) if x != IGNORE_INDEX])
    assert "Hello." in text.replace(" .", ".") and "Red" in text
    assert "Color" not in text and "Hi?" not in text


def test_chatml_template_eos_is_the_end_of_turn():
    # a ChatML-style template (SmolLM2's) closes turns with <|im_end|>, the EOS: no extra token is added
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<unk>", "<|im_start|>", "<|im_end|>"] + list("abcdefghijklmnopqrstuvwxyz \n.?"))}
    raw = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=1000))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    t = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n'}}"
                       "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    out = tokenize_chat(t, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok."}], None)
    labeled = [i for i, x in zip(out.input_ids, out.labels) if x != IGNORE_INDEX]
    assert t.decode(labeled).replace(" ", "") == "ok.<|im_end|>"
    assert out.input_ids.count(t.eos_token_id) == 2  # user turn end + assistant turn end, nothing appended


def test_truncation_is_counted_and_empty_examples_dropped(tok):
    chats = [CHAT, [CHAT[0], {"role": "user", "content": "word " * 200}, CHAT[2]]]
    short_len = len(tokenize_chat(tok, CHAT, None).input_ids)
    long_prompt_len = len(tokenize_chat(tok, chats[1], None).input_ids)
    feats, stats = tokenize_all_chats(tok, chats, max_length=short_len)
    assert isinstance(stats, TokenStats)
    assert stats.examples == 2 and stats.truncated == 1
    assert stats.dropped_no_labels == 1 and stats.kept == 1 and len(feats) == 1  # its response was cut off
    assert long_prompt_len > short_len
    d = stats.as_dict()
    assert d["truncated"] == 1 and d["length_max"] == short_len


def test_pad_collator():
    c = PadCollator(pad_token_id=0)
    b = c([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize("lora", [False, True])
def test_response_only_loss_equals_model_loss(tiny_model, tok, lora):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    feats, _ = tokenize_all_chats(tok, [CHAT, CHAT[:1] + [{"role": "user", "content": "Which color is the dog?"},
                                                          {"role": "assistant", "content": "The dog is blue, sir."}]], None)
    batch = PadCollator(tok.pad_token_id)(feats)
    ref = model(**batch).loss
    ours = response_only_loss(model, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    # gradient-accumulation form: sum / items across micro-batches
    n = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    torch.testing.assert_close(response_only_loss(model, batch, num_items_in_batch=n), ref, rtol=1e-5, atol=1e-6)
    # and the gradients agree
    g1 = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad][0])[0]
    g2 = torch.autograd.grad(model(**batch).loss, [p for p in model.parameters() if p.requires_grad][0])[0]
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
