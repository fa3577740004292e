"""Evaluation decodes through the serving engine's continuous batching (tunelab/models/generation.py): its greedy
answers are the previous padded ``model.generate`` loop's, token for token, on prompts of many lengths, for a plain
model, a LoRA adapter and the base under ``disable_adapter()``; and the progress bar advances once per answer."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def model_and_tok(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model), AutoTokenizer.from_pretrained(tiny_model)


def _prompts(tok):
    words = "What color is the small cat ? Tell me the color of the big dog and the old bird".split()
    lengths = [1, 2, 3, 5, 8, 13, 21, 34, 50]
    out = []
    for n in lengths:
        ids = tok(" ".join(words * 4), add_special_tokens=False)["input_ids"][:n]
        out.append([tok.bos_token_id] + ids)
    return out


def _eos_often(model, tok, prompts):
    """A tokenizer copy whose EOS is a token the model emits in some answers, at different steps, so rows leave
    the batch at different times (the random model rarely emits the real EOS)."""
    import collections
    import copy

    import torch

    seen = collections.Counter()
    with torch.no_grad():
        for p in prompts:
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            seen.update(set(out[0, len(p):].tolist()))
    t = next(t for t, c in seen.most_common() if c < len(prompts))
    tok = copy.deepcopy(tok)
    tok.eos_token = tok.convert_ids_to_tokens(t)
    return tok


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_engine_greedy_equals_padded_generate(model_and_tok, batch_size):
    from tunelab.models.generation import generate, generate_padded

    model, tok = model_and_tok
    prompts = _prompts(tok)
    new, new_stats = generate(model, tok, prompts, 24, batch_size)
    old, old_stats = generate_padded(model, tok, prompts, 24, batch_size)
    assert new == old
    assert [s["new_tokens"] for s in new_stats] == [s["new_tokens"] for s in old_stats]


def test_engine_greedy_equals_padded_with_eos_and_adapters(tiny_model, model_and_tok):
    import copy

    from peft import LoraConfig, get_peft_model

    from tunelab.models.generation import generate, generate_padded

    base, tok = model_and_tok
    model = copy.deepcopy(base)
    prompts = _prompts(tok)
    tok = _eos_often(model, tok, prompts)
    texts, stats = generate(model, tok, prompts, 24, 4)
    assert texts == generate_padded(model, tok, prompts, 24, 4)[0]
    lengths = {s["new_tokens"] for s in stats}
    assert len(lengths) > 1 and min(lengths) < 24, lengths  # some answers stopped early: rows left the batch

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    tuned = generate(peft_model, tok, prompts, 24, 4)[0]
    assert tuned == generate_padded(peft_model, tok, prompts, 24, 4)[0]
    with peft_model.disable_adapter():
        assert generate(peft_model, tok, prompts, 24, 4)[0] == texts
    assert tuned != texts  # the adapter was applied


def test_generate_goes_through_the_engine_and_the_bar_counts_answers(model_and_tok, monkeypatch):
    """The shared engine decodes (not transformers' generate), and the bar moves once per answer, not per batch."""
    import tqdm.auto

    from tunelab.models import engine as engine_mod
    from tunelab.models.generation import generate

    model, tok = model_and_tok
    runs, updates = [], []
    real_run = engine_mod.Engine.run
    monkeypatch.setattr(engine_mod.Engine, "run", lambda self, reqs: (runs.append(len(reqs)), real_run(self, reqs)))
    real_update = tqdm.auto.tqdm.update
    monkeypatch.setattr(tqdm.auto.tqdm, "update", lambda self, n=1: (updates.append(n), real_update(self, n)))
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("the padded generate loop was used"))
    prompts = _prompts(tok)
    generate(model, tok, prompts, 8, 5)
    assert runs == [len(prompts)]
    assert updates == [1] * len(prompts)


def test_latency_is_timed_through_the_engine_with_generates_answers(model_and_tok, monkeypatch):
    """`tunelab eval`'s single-request latency decodes through the serving engine: the same tokens per answer as
    transformers' ``generate`` (answers ending at EOS at different steps), a first token that comes after the
    request started and before it ended, and ``generate`` is not what ran."""
    import time

    from tunelab.eval import business
    from tunelab.models import engine as engine_mod
    from tunelab.models.generation import generate_padded

    model, tok = model_and_tok
    prompts = _prompts(tok)
    tok = _eos_often(model, tok, prompts)
    old = business._measure_latency_generate(model, tok, prompts, 24, "old")
    _, padded = generate_padded(model, tok, prompts, 24, 1)
    assert old["mean_generated_tokens"] == sum(s["new_tokens"] for s in padded) / len(prompts)  # EOS not counted
    seen = []
    real_accept = engine_mod.Engine._accept

    def accept(self, row, token):
        seen.append((row.req, time.perf_counter()))
        return real_accept(self, row, token)

    monkeypatch.setattr(engine_mod.Engine, "_accept", accept)
    monkeypatch.setattr(type(model), "generate", lambda *a, **k: pytest.fail("latency used generate"))
    new = business.measure_latency(model, tok, prompts, 24, "new")
    assert new["requests"] == len(prompts) and new["mean_generated_tokens"] == old["mean_generated_tokens"]
    assert 0 < new["mean_generated_tokens"] < 24  # some answers ended at EOS, some at the limit
    reqs = list({id(r): r for r, _ in seen}.values())
    assert len(reqs) == len(prompts)
    for r in reqs:
        first_accept = min(t for q, t in seen if q is r)
        assert r.started <= first_accept <= r.first_token <= r.finished
    for ttft, total in zip(new["samples_first_token_s"], new["samples_total_s"]):
        assert 0 < ttft <= total
