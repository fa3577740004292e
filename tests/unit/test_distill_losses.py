"""Distillation losses (tunelab.train.numerics) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.train.numerics import IGNORE_INDEX, distill_divergence, distill_loss, masked_nll


def _softmax(xs, T=1.0):
    e = [math.exp(x / T) for x in xs]
    return [v / sum(e) for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


S = [1.0, 0.0, -1.0]
T_ = [0.5, 2.0, -0.5]


def test_forward_kl_by_hand():
    got = distill_divergence(torch.tensor([S]), torch.tensor([T_]), "forward_kl")
    assert got.shape == (1,)
    assert float(got[0]) == pytest.approx(_kl(_softmax(T_), _softmax(S)), rel=1e-5)  # KL(teacher ‖ student), float32


def test_jsd_by_hand():
    for beta in (0.5, 0.1, 0.9):
        p_s, p_t = _softmax(S), _softmax(T_)
        m = [beta * t + (1 - beta) * s for s, t in zip(p_s, p_t)]
        want = beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)
        got = distill_divergence(torch.tensor([S]), torch.tensor([T_]), "jsd", beta=beta)
        assert float(got[0]) == pytest.approx(want, rel=1e-5)  # float32


def test_zero_for_identical_logits():
    x = torch.randn(4, 7, 11)
    for loss in ("forward_kl", "jsd"):
        for temp in (1.0, 2.0):
            d = distill_divergence(x, x.clone(), loss, temperature=temp)
            assert d.shape == (4, 7)
            assert torch.allclose(d, torch.zeros_like(d), atol=1e-6)
    # and strictly positive for different ones
    assert (distill_divergence(x, torch.randn(4, 7, 11)) > 0).all()


def test_jsd_symmetric_at_half_not_otherwise():
    a, b = torch.randn(5, 13), torch.randn(5, 13)
    torch.testing.assert_close(distill_divergence(a, b, "jsd", beta=0.5), distill_divergence(b, a, "jsd", beta=0.5))
    assert not torch.allclose(distill_divergence(a, b, "jsd", beta=0.2), distill_divergence(b, a, "jsd", beta=0.2))
    # forward KL is not symmetric
    assert not torch.allclose(distill_divergence(a, b), distill_divergence(b, a))


def test_temperature_softens_and_scales_by_t_squared():
    T = 3.0
    got = float(distill_divergence(torch.tensor([S]), torch.tensor([T_]), "forward_kl", temperature=T)[0])
    want = T ** 2 * _kl(_softmax(T_, T), _softmax(S, T))
    assert got == pytest.approx(want, rel=1e-5)  # float32
    # the same as dividing the logits by T at temperature 1, times T²
    a, b = torch.randn(3, 9), torch.randn(3, 9)
    for loss in ("forward_kl", "jsd"):
        torch.testing.assert_close(distill_divergence(a, b, loss, temperature=T),
                                   T ** 2 * distill_divergence(a / T, b / T, loss))


def test_matches_trl_gkd_generalized_jsd(monkeypatch):
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    # an independent implementation: TRL's GKD loss (sum reduction, T=1: TRL does not scale by T²)
    from trl.experimental.gkd import GKDTrainer

    a, b = torch.randn(2, 5, 17), torch.randn(2, 5, 17)
    ours = distill_divergence(a, b, "jsd", beta=0.3).sum()
    theirs = GKDTrainer.generalized_jsd_loss(a, b, beta=0.3, reduction="sum")
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(distill_divergence(a, b).sum(),
                               GKDTrainer.generalized_jsd_loss(a, b, beta=0.0, reduction="sum"))


def test_bad_arguments():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError):
        distill_divergence(x, x, "jsd", beta=0.0)
    with pytest.raises(ValueError):
        distill_divergence(x, x, "reverse")


class _LM(torch.nn.Module):
    """A causal LM stand-in whose logits are a lookup on the input id (no decoder/head split)."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g))

    def forward(self, input_ids, attention_mask=None):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_distill_loss_masks_prompt_and_mixes_ce():
    student, teacher = _LM(6, 0), _LM(6, 1)
    ids = torch.tensor([[1, 2, 3, 4, 5], [2, 3, 1, 0, 0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX]])
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    # by hand: the positions whose next token is labeled
    pos = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    s = torch.stack([student.table[ids[i, j]] for i, j in pos]).detach()
    t = torch.stack([teacher.table[ids[i, j]] for i, j in pos]).detach()
    kd = distill_divergence(s, t, "forward_kl", temperature=2.0).sum()
    nll, n = masked_nll(student(ids).logits.detach(), labels)
    assert n == 5
    total, kd_sum, ce_sum, count = distill_loss(student, teacher, inputs, "forward_kl", temperature=2.0, alpha=0.25)
    assert count == 5 and kd_sum == pytest.approx(float(kd), rel=1e-5) and ce_sum == pytest.approx(float(nll), rel=1e-5)
    assert total.item() == pytest.approx((0.25 * float(nll) + 0.75 * float(kd)) / 5, rel=1e-5)
    # gradient-accumulation form: sum / num_items_in_batch
    tot2, *_ = distill_loss(student, teacher, inputs, "forward_kl", temperature=2.0, alpha=0.25,
                            num_items_in_batch=torch.tensor(10))
    assert tot2.item() == pytest.approx(total.item() / 2, rel=1e-5)
    # only the student gets gradients
    total.backward()
    assert student.table.grad is not None and teacher.table.grad is None
    # identical models: zero divergence
    tot0, kd0, _, _ = distill_loss(student, student, inputs)
    assert kd0 == pytest.approx(0.0, abs=1e-5)


def test_distill_loss_decoder_head_path_equals_full_logits(tiny_model):
    # the LM-head-on-response-positions path gives the same loss as the model's full logits
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(4, student.config.vocab_size, (2, 9))
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    inputs = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    total, kd, ce, n = distill_loss(student, teacher, inputs, "jsd", temperature=1.5, beta=0.5, alpha=0.5)
    with torch.no_grad():
        sl, tl = student(ids).logits[:, :-1], teacher(ids).logits[:, :-1]
    sel = labels[:, 1:] != IGNORE_INDEX
    want = distill_divergence(sl[sel], tl[sel], "jsd", temperature=1.5, beta=0.5).sum()
    assert n == 10 and kd == pytest.approx(float(want), rel=1e-4) and kd > 0
    assert ce == pytest.approx(float(masked_nll(student(ids).logits.detach(), labels)[0]), rel=1e-4)
