"""Prompt cutting for preference pairs, hh-rlhf splitting, and the held-out preference numbers."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import make_tiny_model


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    corpus = ["Human: what color is the cat?", "Assistant: The cat is red.", "one two three four five six"] * 20
    make_tiny_model(d / "m", corpus)
    return AutoTokenizer.from_pretrained(d / "m")


def test_fit_prompt_keeps_the_tail_within_budget(tok):
    from tunelab.train.numerics import fit_prompt

    prompt = "Human: one two three four five six\n\nAssistant: ok\n\nHuman: what color is the cat?\n\nAssistant:"
    n = len(tok(prompt, add_special_tokens=False)["input_ids"])
    same, cut = fit_prompt(tok, prompt, n)
    assert same == prompt and not cut
    tail, cut = fit_prompt(tok, prompt, 12)
    assert cut and prompt.endswith(tail) and len(tail) < len(prompt)
    assert len(tok(tail, add_special_tokens=False)["input_ids"]) <= 12
    assert tail.endswith("\n\nAssistant:")
    last_turn = "\n\nHuman: what color is the cat?\n\nAssistant:"
    tail, cut = fit_prompt(tok, prompt, len(tok(last_turn, add_special_tokens=False)["input_ids"]))
    assert cut and tail.endswith(last_turn[2:])  # the whole last turn fits in its own token count
    assert fit_prompt(tok, prompt, 0) == ("", True)


def test_encode_prompt_response_cuts_prompt_first(tok):
    from tunelab.train.numerics import encode_prompt_response

    prompt = "one two three four five six " * 10 + "what color is the cat?"
    ids, cut = encode_prompt_response(tok, prompt, " The cat is red.", 24)
    resp = tok(" The cat is red.", add_special_tokens=False)["input_ids"]
    assert cut and len(ids) <= 24 and ids[-len(resp):] == resp  # the response survives whole
    ids2, cut2 = encode_prompt_response(tok, "what color?", " The cat is red.", 64)
    assert not cut2 and ids2 == tok("what color?")["input_ids"] + resp
    # a response longer than the budget is cut at its end, and the prompt keeps at least half
    long_resp = " one two three" * 30
    ids3, cut3 = encode_prompt_response(tok, prompt, long_resp, 32)
    assert cut3 and len(ids3) == 32


WORDS = ["one", "two", "three", "four", "five", "six", "what", "color", "is", "the", "cat?", "red."]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.lists(st.sampled_from(WORDS), max_size=60), a=st.lists(st.sampled_from(WORDS), max_size=40),
       b=st.lists(st.sampled_from(WORDS), max_size=40), max_length=st.integers(8, 64))
def test_a_pair_is_encoded_with_one_prompt_cut(tok, prompt, a, b, max_length):
    from tunelab.train.numerics import encode_prompt_responses, n_special_tokens

    prompt, a, b = " ".join(prompt), " " + " ".join(a), " " + " ".join(b)
    (ca, cb), cut = encode_prompt_responses(tok, prompt, [a, b], max_length)
    ra, rb = (tok(x, add_special_tokens=False)["input_ids"] for x in (a, b))
    whole = tok(prompt, add_special_tokens=True)["input_ids"]
    assert cut == (len(whole) + max(len(ra), len(rb)) > max_length)
    if not cut:
        assert ca == whole + ra and cb == whole + rb
    # both sides are ONE prompt (cut once) followed by their own response, then cut at max_length
    for ids, own, other, other_r in ((ca, ra, cb, rb), (cb, rb, ca, ra)):
        assert len(ids) <= max_length
        if len(ids) < max_length:  # not cut at the end: the prompt part is everything before the response
            shared = ids[:len(ids) - len(own)]
            assert ids[len(shared):] == own and len(shared) >= n_special_tokens(tok)
            assert other == (shared + other_r)[:max_length]
    # the prompt left room for the longer response: it survives whole when it fits in half the length
    longer, ids = (ra, ca) if len(ra) >= len(rb) else (rb, cb)
    if longer and len(longer) + n_special_tokens(tok) <= max_length // 2:
        assert ids[-len(longer):] == longer


def test_reward_features_share_the_prompt_of_a_long_conversation(tok):
    from tunelab.train.reward import _features

    prompt = "Human: " + "one two three four five six " * 20 + "what color is the cat?\n\nAssistant:"
    pair = {"prompt": prompt, "chosen": " The cat is red.", "rejected": " one two three four five six seven " * 2}
    (f,), truncated = _features(tok, [pair], 48)
    c, r = f["chosen_ids"], f["rejected_ids"]
    assert truncated == 1 and len(c) <= 48 and len(r) <= 48
    n_c = len(tok(pair["chosen"], add_special_tokens=False)["input_ids"])
    # one cut for both: the rejected row is the shared prompt plus its own answer
    assert r[:len(c) - n_c] == c[:len(c) - n_c] and tok.decode(c[len(c) - n_c:]).strip() == "The cat is red."


def test_hh_rlhf_transcripts_become_pairs(tmp_path, tok):
    from tunelab.train.preference import load_pairs

    p = tmp_path / "hh.jsonl"
    rows = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: Red.",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant: No."},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: b"},  # no shared prompt
        {"prompt": "Q:", "chosen": " same", "rejected": " same"},
        {"text": "not a pair"},
    ]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rejects: list[dict] = []
    pairs = load_pairs(str(p), tok, rejects)
    assert pairs == [{"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant:",
                      "chosen": " Red.", "rejected": " No."}]
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert "share the prompt" in rejects[0]["reason"] and "identical" in rejects[1]["reason"]  # data/records.py


def test_heldout_preference_numbers():
    from tunelab.train.dpo import heldout_preferences

    out = heldout_preferences([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0], [-1.5, -2.0, -3.0], [-1.5, -2.5, -1.0], 0.5)
    assert out["logp_accuracy"] == pytest.approx((1 + 0.5 + 0) / 3, abs=1e-4)
    # log-ratios: chosen (0.5, 0, 0), rejected (-0.5, 0.5, 0) -> margins (1, -0.5, 0)
    assert out["implicit_reward_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3, abs=1e-4)
    assert out["implicit_reward_margin"] == pytest.approx(0.5 * 0.5 / 3, abs=1e-4)
    lo, hi = out["implicit_reward_accuracy_ci95"]
    assert 0.0 <= lo <= out["implicit_reward_accuracy"] <= hi <= 1.0
    # the start is the reference (a tie on every pair): the gain is accuracy − 0.5, its interval shifted alike
    assert out["implicit_reward_accuracy_gain"] == pytest.approx(out["implicit_reward_accuracy"] - 0.5, abs=1e-4)
    assert out["implicit_reward_accuracy_gain_ci95"] == pytest.approx([lo - 0.5, hi - 0.5], abs=1e-4)
    mlo, mhi = out["implicit_reward_margin_ci95"]
    assert mlo <= out["implicit_reward_margin"] <= mhi


def test_interval_of_a_policy_that_prefers_chosen_excludes_the_start():
    """200 held-out pairs where the policy raised chosen over rejected on 80%: the accuracy interval lies
    above 0.5 (the start) and the margin interval above 0; a policy equal to its reference stays at the start."""
    from tunelab.train.dpo import heldout_preferences

    n = 200
    lc = [-1.0 if i % 5 else -3.0 for i in range(n)]
    zeros = [-2.0] * n
    out = heldout_preferences(lc, zeros, zeros, zeros, beta=0.1)
    assert out["implicit_reward_accuracy"] == pytest.approx(0.8)
    assert out["implicit_reward_accuracy_gain_ci95"][0] > 0 and out["implicit_reward_margin_ci95"][0] > 0
    same = heldout_preferences(zeros, zeros, zeros, zeros, beta=0.1)
    assert same["implicit_reward_accuracy"] == 0.5 and same["implicit_reward_accuracy_gain_ci95"] == [0.0, 0.0]


def test_pairwise_eval_reports_accuracy_interval_and_paired_gain():
    from tunelab.train.preference import mean_ci, paired_gain

    wins = [1.0] * 70 + [0.0] * 30
    lo, hi = mean_ci(wins)
    assert lo < 0.7 < hi and lo > 0.6 and hi < 0.8
    g = paired_gain([0.5] * 100, wins)  # an untrained head that ties every pair, then 70% right
    assert g["difference"] == pytest.approx(0.2) and g["ci_low"] > 0 and g["n"] == 100


def test_rlhf_config_needs_one_reward_and_whole_groups():
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.train.rlhf import RLHFConfig

    base = {"recipe": "rlhf", "model": {"name": "m"}, "data": {"train": "x.jsonl"}}
    ok = cfglib.validate(RLHFConfig, {**base, "reward_function": "m:f", "num_generations": 4,
                                      "train": {"batch_size": 8}})
    assert ok.beta > 0
    with pytest.raises(ConfigError) as e:
        cfglib.validate(RLHFConfig, {**base, "reward_model": "r", "reward_function": "m:f", "num_generations": 3,
                                     "train": {"batch_size": 8}})
    msg = str(e.value)
    assert "exactly one of reward_model" in msg and "multiple of num_generations" in msg
    with pytest.raises(ConfigError, match="beta"):  # RLHF here always keeps a KL penalty to the start
        cfglib.validate(RLHFConfig, {**base, "reward_function": "m:f", "beta": 0})


PREFERENCE_RECIPES = {"reward": {}, "dpo": {}, "rlhf": {"reward_function": "m:f", "num_generations": 2}}


@pytest.mark.parametrize("recipe", sorted(PREFERENCE_RECIPES))
@pytest.mark.parametrize("option, value", [("padding_free", True), ("group_by_length", False)])
def test_preference_recipes_refuse_train_options_they_do_not_read(recipe, option, value):
    """TRL's reward/DPO/GRPO trainers never see train.padding_free or train.group_by_length: a recipe that sets
    them is refused with the option's name, instead of training as if they had been honoured."""
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.recipes import get

    base = {"recipe": recipe, "model": {"name": "m"}, "data": {"train": "x.jsonl"}, **PREFERENCE_RECIPES[recipe]}
    cls, _ = get(recipe)
    cfglib.validate(cls, base)  # the defaults are fine
    with pytest.raises(ConfigError) as e:
        cfglib.validate(cls, {**base, "train": {option: value}})
    assert f"train.{option}: the {recipe} recipe does not read this option; remove it" in str(e.value)


def test_rlhf_refuses_early_stopping_it_never_does():
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.train.rlhf import RLHFConfig

    with pytest.raises(ConfigError, match="train.early_stopping_patience: the rlhf recipe does not read"):
        cfglib.validate(RLHFConfig, {"recipe": "rlhf", "model": {"name": "m"}, "data": {"train": "x.jsonl"},
                                     "reward_function": "m:f", "num_generations": 2,
                                     "train": {"early_stopping_patience": 2}})


@pytest.mark.parametrize("recipe", sorted(PREFERENCE_RECIPES))
def test_a_stored_config_loads_again_for_resume(recipe, tmp_path):
    """config.yaml lists every field, the refused train options at their defaults included: --resume reloads it."""
    from tunelab import config as cfglib
    from tunelab.recipes import get

    cls, _ = get(recipe)
    cfg = cfglib.validate(cls, {"recipe": recipe, "model": {"name": "m"}, "data": {"train": "x.jsonl"},
                                **PREFERENCE_RECIPES[recipe]})
    (tmp_path / "config.yaml").write_text(cfglib.dump(cfg))
    assert cfglib.load(cls, tmp_path / "config.yaml") == cfg


def test_test_split_is_held_out_before_limit_and_never_trained_on():
    """data.test_split: a content-hash share of the pairs is the held-out report set; no held-out pair is in
    train or validation, the held-out set does not depend on the seed or data.limit, and test + test_split
    together are refused."""
    from tunelab.errors import TunelabError
    from tunelab.sections import PreferenceDataSection
    from tunelab.train.preference import split_sets

    pairs = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(400)]
    key = (lambda x: json.dumps(x, sort_keys=True))
    d = PreferenceDataSection(train="x.jsonl", validation_split=0.1, test_split=0.2)
    train, val, held, name = split_sets(pairs, d, seed=0, load=None)
    assert name == "test_split" and 50 < len(held) < 110 and val
    assert not ({key(x) for x in held} & {key(x) for x in train + val})
    assert len(train) + len(val) + len(held) == len(pairs)
    for seed, limit in ((1, None), (7, 50)):
        d2 = PreferenceDataSection(train="x.jsonl", validation_split=0.1, test_split=0.2, limit=limit)
        tr2, va2, held2, _ = split_sets(pairs, d2, seed=seed, load=None)
        assert [key(x) for x in held2] == [key(x) for x in held]  # same held-out pairs
        assert not ({key(x) for x in held2} & {key(x) for x in tr2 + va2})
    assert len(tr2) + len(va2) == 50  # limit counts training pairs only
    with pytest.raises(TunelabError, match="test_split"):
        split_sets(pairs, PreferenceDataSection(train="x.jsonl", test="t.jsonl", test_split=0.2), seed=0,
                   load=lambda p: [])
