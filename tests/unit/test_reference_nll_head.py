"""Reference perplexity computes the LM head only at scored positions: same per-example NLL as full logits."""

import pytest

torch = pytest.importorskip("torch")


def _feats(tok, n: int = 7):
    import random

    rng = random.Random(0)
    words = ["red", "blue", "green", "cat", "dog", "the", "is", "a"]
    out = []
    for i in range(n):
        prompt = tok(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))["input_ids"]
        resp = [] if i == 3 else tok(" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))),
                                     add_special_tokens=False)["input_ids"]
        out.append({"input_ids": prompt + resp, "labels": [-100] * len(prompt) + resp})
    return out


@pytest.mark.parametrize("lora", [False, True])
def test_head_only_at_scored_positions_matches_full_logits(tiny_model, monkeypatch, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.train import numerics

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    model.eval()
    feats = _feats(tok)
    _, head = numerics._causal_parts(model)
    rows = []
    hook = head.register_forward_hook(lambda m, args, out: rows.append(out.reshape(-1, out.size(-1)).size(0)))
    fast, n_fast = numerics.response_nll_per_example(model, feats, 3, tok.pad_token_id or 0)
    hook.remove()
    assert sum(rows) == sum(n_fast)  # logits only where a reference token is scored
    monkeypatch.setattr(numerics, "_causal_parts", lambda m: None)  # the model's own forward, every position
    full, n_full = numerics.response_nll_per_example(model, feats, 3, tok.pad_token_id or 0)
    assert n_fast == n_full and 0 in n_fast  # a row with nothing to score counts 0 tokens
    assert fast == pytest.approx(full, rel=1e-5, abs=1e-5)
    assert all(x > 0 for x, c in zip(fast, n_fast) if c)


def test_length_sorted_batches_return_values_in_the_callers_order(tiny_model):
    """Batches group examples by length; the values come back in the order of the examples given, equal to
    scoring each example alone (batch of 1), and the batches pad less than file order would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.train import numerics

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    feats = _feats(tok, 11)
    alone, n_alone = numerics.response_nll_per_example(model, feats, 1, tok.pad_token_id or 0)
    widths = []
    real = numerics.PadCollator.__call__
    numerics.PadCollator.__call__ = lambda self, rows: widths.append(max(len(r["input_ids"]) for r in rows)
                                                                     * len(rows)) or real(self, rows)
    try:
        batched, n_batched = numerics.response_nll_per_example(model, feats, 4, tok.pad_token_id or 0)
    finally:
        numerics.PadCollator.__call__ = real
    assert n_batched == n_alone
    assert batched == pytest.approx(alone, rel=1e-5, abs=1e-5)
    in_file_order = sum(max(len(f["input_ids"]) for f in feats[b:b + 4]) * len(feats[b:b + 4])
                        for b in range(0, len(feats), 4))
    assert sum(widths) < in_file_order  # padded tokens scored: fewer than batching in file order
