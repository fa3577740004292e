"""The shared prompt forward (tunelab/train/shared_prompt.py): one backbone row per preference pair gives the
padded [chosen; rejected] batch's log-probs, reward scores and gradients, and touches nothing else."""

from __future__ import annotations

import pytest
import torch

from tunelab.train.shared_prompt import (SharedPromptForward, backbone_of, pair_layout, paired_batches,
                                         shared_prompts)


def _batch(pairs: list[tuple[list[int], list[int], list[int]]], pad: int):
    """TRL's preference layout: rows [prompt + chosen ...; prompt + rejected ...], right-padded, and the
    completion mask."""
    rows = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
    comp = [[0] * len(p) + [1] * len(c) for p, c, _ in pairs] + [[0] * len(p) + [1] * len(r) for p, _, r in pairs]
    L = max(map(len, rows))
    ids = torch.tensor([x + [pad] * (L - len(x)) for x in rows])
    mask = torch.tensor([[1] * len(x) + [0] * (L - len(x)) for x in rows])
    cmask = torch.tensor([x + [0] * (L - len(x)) for x in comp])
    return ids, mask, cmask


def _random_pairs(g: torch.Generator, n: int, vocab: int = 250) -> list:
    out = []
    for _ in range(n):
        lens = torch.randint(1, 14, (3,), generator=g).tolist()
        p, c, r = (torch.randint(5, vocab, (k,), generator=g).tolist() for k in lens)
        if torch.rand(1, generator=g) < 0.3:  # responses that start alike: the shared prefix reaches into them
            r = c[:2] + r
        out.append((p, c, r))
    return out


def test_layout_shares_the_longest_common_prefix():
    pad = 0
    ids, mask, _ = _batch([([7, 8, 9], [4, 5], [6]), ([7, 8], [9, 3, 3], [9, 3, 4, 4])], pad)
    lay = pair_layout(ids, mask)
    assert lay.shared == [3, 4]  # the second pair's responses both start with 3: shared with the prompt 7 8 9
    # row 0: prompt 7 8 9 | chosen 4 5 | rejected 6, whose position restarts after the prompt
    assert lay.ids[0, :6].tolist() == [7, 8, 9, 4, 5, 6]
    assert lay.positions[0, :6].tolist() == [0, 1, 2, 3, 4, 3]
    # row 1: 7 8 9 3 shared | chosen 3 | rejected 4 4
    assert lay.ids[1].tolist() == [7, 8, 9, 3, 3, 4, 4]
    assert lay.positions[1].tolist() == [0, 1, 2, 3, 4, 4, 5]
    a = lay.allowed[0]
    assert a[5, :6].tolist() == [True, True, True, False, False, True]  # rejected sees the prompt, not chosen
    assert a[4, :6].tolist() == [True, True, True, True, True, False]
    assert lay.tokens_out < lay.tokens_in


@pytest.mark.parametrize("case", ["odd", "left-padded", "no common prefix", "not 2D"])
def test_layout_refuses_what_is_not_a_right_padded_pair_batch(case):
    ids, mask, _ = _batch([([7, 8, 9], [4, 5], [6]), ([7, 8], [9], [3])], 0)
    if case == "odd":
        ids, mask = ids[:3], mask[:3]
    elif case == "left-padded":
        mask = mask.flip(1)
    elif case == "no common prefix":
        ids, mask, _ = _batch([([], [4, 5], [6, 7])], 0)
    else:
        ids = ids[None]
    assert pair_layout(ids, mask) is None


def _same_gradients(got: dict, want: dict) -> None:
    """fp32 sums in another order: each gradient within 1e-5 of its own largest entry (gradients here reach ~40)."""
    assert got.keys() == want.keys() and want
    for n, w in want.items():
        assert (got[n] - w).abs().max() <= 1e-5 * w.abs().max() + 1e-7, n


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_dpo_log_probs_and_gradients_match_the_padded_batch(tiny_model, attn):
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    add_fused_lm_head(base)
    model = _lora(base)
    ids, mask, cmask = _batch(_random_pairs(torch.Generator().manual_seed(0), 5), base.config.pad_token_id)
    labels = ids.masked_fill(cmask == 0, -100)

    def logps():
        model.zero_grad()
        lp = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False, fused_lm_head=True).log_probs
        (lp.sum(1) * torch.linspace(1, 2, lp.shape[0])).sum().backward()  # every row its own weight
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, g_plain = logps()
    fwd = SharedPromptForward(backbone_of(model)).install()
    try:
        outside, _ = logps()  # not inside paired_batches(): the backbone's own forward
        assert fwd.calls == 0
        with paired_batches():
            shared, g_shared = logps()
    finally:
        fwd.remove()
    assert fwd.calls == 1 and fwd.tokens_out < fwd.tokens_in
    assert torch.equal(outside, plain)
    assert (shared[cmask[:, 1:] == 0] == 0).all()  # prompt and padding positions carry no log-prob, as before
    assert torch.allclose(shared, plain, atol=1e-5), (shared - plain).abs().max()
    _same_gradients(g_shared, g_plain)
    assert "forward" not in backbone_of(model).__dict__  # removed: the class's forward again


def test_reward_scores_and_gradients_match_the_padded_batch(tiny_model):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model = _lora(base)
    ids, mask, _ = _batch(_random_pairs(torch.Generator().manual_seed(1), 4), base.config.pad_token_id)

    def scores():
        model.zero_grad()
        s = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1)
        c, r = s.chunk(2)
        (-torch.nn.functional.logsigmoid(c - r).mean()).backward()
        return s.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, g_plain = scores()
    with paired_batches(), shared_prompts(_Speed(), model) as fwds:
        shared, g_shared = scores()
    assert fwds[0].calls == 1
    assert torch.allclose(shared, plain, atol=1e-5)
    _same_gradients(g_shared, g_plain)


class _Speed:  # the part of Speedups that shared_prompts reads and writes
    on = True

    def __init__(self):
        self.applied, self.skipped = {}, {}

    def note(self, name, applied, why):
        (self.applied if applied else self.skipped)[name] = why
        return applied


def test_noted_with_the_share_saved_or_why_not(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sp = _Speed()
    ids, mask, _ = _batch([([7, 8, 9, 10], [4, 5], [6])], 0)
    with shared_prompts(sp, model), paired_batches(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert "positions not computed (7 of 12 computed)" in sp.applied["shared prompt forward"]
    off = _Speed()
    off.on = False
    with shared_prompts(off, model) as fwds:
        assert fwds == []
    assert off.skipped["shared prompt forward"] == "off (train.speedups: off)"
    model.config._attn_implementation = "flash_attention_2"
    other = _Speed()
    with shared_prompts(other, model) as fwds:
        assert fwds == []
    assert "flash_attention_2" in other.skipped["shared prompt forward"]


def test_heldout_pair_evaluations_equal_scoring_each_side_alone(tiny_model, monkeypatch):
    """The held-out evaluations of DPO and reward runs score a pair's two sequences in one batch: the same
    log-probs and reward scores as scoring all chosen, then all rejected, sequences on their own."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tunelab.train.preference import (completion_logprobs, paired_completion_logprobs, score_ids,
                                          score_pairs)

    import tunelab.train.shared_prompt as sp

    trees = []
    layout = sp.pair_layout
    monkeypatch.setattr(sp, "pair_layout", lambda *a: trees.append(layout(*a)) or trees[-1])
    pairs = _random_pairs(torch.Generator().manual_seed(2), 7)
    prompts, chosen, rejected = ([p[k] for p in pairs] for k in range(3))
    lm = _lora(AutoModelForCausalLM.from_pretrained(tiny_model))
    pad = lm.config.pad_token_id
    pc, pr = paired_completion_logprobs(lm, prompts, chosen, rejected, pad, batch_size=4)
    assert pc == pytest.approx(completion_logprobs(lm, prompts, chosen, pad, batch_size=3), abs=1e-4)
    assert pr == pytest.approx(completion_logprobs(lm, prompts, rejected, pad, batch_size=3), abs=1e-4)
    assert pc != pytest.approx(pr, abs=1e-3)  # the two sides are told apart, not one copied into the other
    assert len(trees) == 4 and all(trees)  # 7 pairs, 2 a batch: every batch ran as shared-prefix rows

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    c_ids, r_ids = [p + c for p, c, _ in pairs], [p + r for p, _, r in pairs]
    sc, sr = score_pairs(rm, c_ids, r_ids, pad, batch_size=4)
    assert sc == pytest.approx(score_ids(rm, c_ids, pad, batch_size=3), abs=1e-5)
    assert sr == pytest.approx(score_ids(rm, r_ids, pad, batch_size=3), abs=1e-5)
    assert len(trees) == 8 and all(trees)
    assert "forward" not in backbone_of(rm).__dict__ and "forward" not in backbone_of(lm).__dict__


def test_not_claimed_when_no_batch_had_a_prefix_to_share(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    sp = _Speed()
    ids, mask, _ = _batch([([], [4, 5], [6, 7])], 0)  # nothing in common
    with shared_prompts(sp, model), paired_batches(), torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert "shared prompt forward" not in sp.applied
    assert "no batch had a prefix" in sp.skipped["shared prompt forward"]


# ----------------------------------------------------------------------------- SFT: one prefix for the batch

def _sft_batch(rows: list[tuple[list[int], list[int]]], pad: int) -> dict:
    """Right-padded SFT rows (prompt ids, response ids): labels on the responses only."""
    L = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), L), pad)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    labels = torch.full((len(rows), L), -100)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        labels[i, len(p):n] = torch.tensor(r)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_common_prefix_stops_before_the_first_predicted_token():
    from tunelab.train.shared_prompt import common_prefix_length

    system = list(range(10, 22))  # 12 tokens every row starts with
    b = _sft_batch([(system + [5, 6], [7, 8]), (system + [5, 9, 9], [3]), (system + [5], [4, 4])], 0)
    # rows agree on 13 tokens (system + 5); the third row's first label sits at 13, predicted from position 12
    assert common_prefix_length(b["input_ids"], b["attention_mask"], b["labels"]) == 12
    assert common_prefix_length(b["input_ids"][:1], b["attention_mask"][:1], b["labels"][:1]) == 0  # one row
    assert common_prefix_length(b["input_ids"], b["attention_mask"].flip(1), b["labels"]) == 0  # left padding
    b["input_ids"][1, 0] = 99
    assert common_prefix_length(b["input_ids"], b["attention_mask"], b["labels"]) == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_sft_loss_and_gradients_match_the_padded_batch(tiny_model, attn):
    from transformers import AutoModelForCausalLM

    from tunelab.train.numerics import response_only_loss

    model = _lora(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn))
    model.train()  # LoRA dropout 0 here: both passes see the same function
    g = torch.Generator().manual_seed(3)
    system = torch.randint(5, 250, (11,), generator=g).tolist()
    rows = []
    for _ in range(5):
        a, b = torch.randint(1, 9, (2,), generator=g).tolist()
        rows.append((system + torch.randint(5, 250, (a,), generator=g).tolist(),
                     torch.randint(5, 250, (b,), generator=g).tolist()))
    batch = _sft_batch(rows, model.config.pad_token_id)

    def loss_and_grads(share):
        model.zero_grad()
        loss = response_only_loss(model, batch, share_prefix=share)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, g_plain = loss_and_grads(None)
    stats: dict = {}
    shared, g_shared = loss_and_grads(stats)
    n, L = batch["input_ids"].shape
    assert stats == {"positions": n * L, "computed": 11 + n * (L - 11)}  # the prefix ran once, not 5 times
    assert torch.allclose(shared, plain, atol=1e-6, rtol=1e-5)
    _same_gradients(g_shared, g_plain)
    nothing: dict = {}
    batch["input_ids"][0, 0] += 1  # no common prefix: the plain forward, nothing counted
    response_only_loss(model, batch, share_prefix=nothing)
    assert nothing == {}
