"""hh-rlhf transcripts through a chat model's chat template (``data.chat_template`` of reward, DPO and RLHF).

The parser (``data/records.py`` ``hh_messages``), the auto/true/false choice and what it records, the
cut of a rendered chat prompt by whole turns (``numerics.fit_prompt``), the held-out split that does not
depend on the rendering, and a reward run on a tiny model whose tokenizer has a chat template.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.records import BadRecord, hh_messages, hh_text, split_hh

# a ChatML template like SmolLM2-Instruct's: a default system message when the chat has none
CHATML = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}"
          "{% endif %}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
OPENING = "<|im_start|>system\nYou are helpful.<|im_end|>\n"
GEN = "<|im_start|>assistant\n"

U, A = "user", "assistant"


def _m(*turns):
    return [{"role": r, "content": c} for r, c in turns]


# ----------------------------------------------------------------------------- the parser


@pytest.mark.parametrize("text, want", [
    ("Human: hi\n\nAssistant: hello\n\nHuman: color?\n\nAssistant:", _m((U, "hi"), (A, "hello"), (U, "color?"))),
    # split_hh's prompts start after the leading "\n\n"; a whole transcript keeps it
    ("\n\nHuman: hi\n\nAssistant:", _m((U, "hi"))),
    # extra whitespace: more blank lines, spaces around the markers, CRLF, no space after the colon, a trailing space
    ("  \n\n\nHuman:   hi  \n \n\n  Assistant:hello\r\n\r\nHuman:\tq\n\nAssistant:  ", _m((U, "hi"), (A, "hello"),
                                                                                      (U, "q"))),
    # the words inside a turn without a blank line before them are text (as in hh-rlhf itself)
    ("Human: say Human: and Assistant: please\n\nAssistant: Human: I think not.  Human: ok?\n\nAssistant:",
     _m((U, "say Human: and Assistant: please"), (A, "Human: I think not.  Human: ok?"))),
    ("Human: a\nHuman: b\n\nAssistant:", _m((U, "a\nHuman: b"))),  # one newline is not a turn break
    ("Human: SuperHuman: x\n\nAssistant:", _m((U, "SuperHuman: x"))),
    # a transcript that opens with the assistant, and repeated roles, are kept as written
    ("Assistant: How can I help?\n\nHuman: q\n\nAssistant:", _m((A, "How can I help?"), (U, "q"))),
    ("Human: Trump.\n\nAssistant: One moment.\n\nAssistant:", _m((U, "Trump."), (A, "One moment."))),
    ("Human: a\n\nHuman: b\n\nAssistant:", _m((U, "a"), (U, "b"))),
])
def test_hh_prompt_becomes_chat_turns(text, want):
    assert hh_messages(text) == want


@pytest.mark.parametrize("text", [
    "What color is the cat?\nAnswer:",  # a plain prompt
    "Human: hi",  # no "Assistant:" cue to answer
    "Human: hi\n\nAssistant: hello",  # ends with an answer, not the cue
    "Human: say Assistant:",  # the final "Assistant:" is text, not a turn
    "Some preamble\n\nHuman: hi\n\nAssistant:",  # text before the first turn
    "",
])
def test_text_that_is_not_an_hh_prompt_is_left_alone(text):
    assert hh_messages(text) is None


@pytest.mark.parametrize("text, reason", [
    ("Human: hi\n\nAssistant: \n\nHuman: q\n\nAssistant:", "turn 2 (Assistant) is empty"),
    ("Human:   \n\nAssistant:", "turn 1 (Human) is empty"),
    ("\n\nAssistant:", "no turn before"),
])
def test_an_empty_turn_is_a_bad_record_with_the_reason(text, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)):
        hh_messages(text)


def test_long_transcripts_parse_in_linear_time():
    turns = _m(*[((U, A)[i % 2], f"turn {i} Human: is text here") for i in range(4000)])
    text = hh_text(turns)
    t = time.perf_counter()
    assert hh_messages(text) == turns
    # a very long run of whitespace (a backtracking regex with the blank line in it takes minutes here)
    assert hh_messages("Human: a" + " \n" * 200_000 + "b\n\nAssistant:") == _m((U, "a" + " \n" * 200_000 + "b"))
    assert time.perf_counter() - t < 5


_piece = st.sampled_from(["Human:", "Assistant:", "human:", " ", "\n", "\n\n", "\t", "x", "hi there", "é", "?"])
_content = st.lists(_piece | st.text(max_size=8), min_size=1, max_size=10).map("".join).map(str.strip).filter(
    lambda c: c and not re.search(r"\n\s*\n\s*(Human|Assistant):", c))  # a blank line + marker starts a turn


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([U, A]), _content), min_size=1, max_size=8))
def test_fuzz_messages_to_hh_text_and_back(turns):
    """messages → hh-rlhf text → parse gives the same messages (roles in any order, markers inside the text)."""
    msgs = _m(*turns)
    assert hh_messages(hh_text(msgs)) == msgs
    # and as split_hh cuts a whole transcript pair into prompt and answers
    pair = split_hh(hh_text(msgs) + " Yes.", hh_text(msgs) + " No.")
    assert hh_messages(pair["prompt"]) == msgs and pair["chosen"] == " Yes."


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("HumanAsit: \n\r\tx")), max_size=60) | st.text(max_size=40))
def test_fuzz_any_text_parses_or_is_refused_with_a_reason(text):
    try:
        msgs = hh_messages(text)
    except BadRecord as e:
        assert str(e).startswith("hh-rlhf")
        return
    if msgs is not None:
        assert msgs and all(m["role"] in (U, A) and m["content"] == m["content"].strip() and m["content"]
                            for m in msgs)


# ----------------------------------------------------------------------------- a tokenizer with a chat template


@pytest.fixture(scope="module")
def chat_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama with a ChatML template and <|im_start|>/<|im_end|> as single tokens (as SmolLM2 has them)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    d = tmp_path_factory.mktemp("chat") / "model"
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tok(chat_model):
    from tunelab.models import refs

    t, added = refs.load_tokenizer(refs.ModelRef(str(chat_model), chat_model))
    assert not added
    return t


@pytest.fixture(scope="module")
def base_tok(tiny_model):
    from tunelab.models import refs

    t, added = refs.load_tokenizer(refs.ModelRef(str(tiny_model), tiny_model))
    assert added  # no template of its own: tunelab's plain one was put in
    return t


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


HH = {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what color is the cat?\n\nAssistant: The cat is red.",
      "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what color is the cat?\n\nAssistant: No."}
HH_TURNS = _m((U, "hi"), (A, "hello"), (U, "what color is the cat?"))


@pytest.mark.parametrize("setting, added, use, words", [
    ("auto", False, True, "model's own"), ("auto", True, False, "the model has no chat template"),
    (True, False, True, "model's own"), (True, True, True, "tunelab's plain one"),
    (False, False, False, "data.chat_template: false"), (False, True, False, "data.chat_template: false")])
def test_auto_true_false(setting, added, use, words):
    from tunelab.train.preference import chat_choice

    c = chat_choice(setting, added)
    assert c.use is use and words in c.label and c.label.startswith("chat template" if use else "raw text")


def test_hh_pairs_through_the_chat_template(tmp_path, tok):
    from tunelab.train.preference import load_pairs

    f = _write(tmp_path / "hh.jsonl", [HH, {"prompt": "Human: hi\n\nAssistant:", "chosen": " yes", "rejected": " no"},
                                       {"prompt": "Q:", "chosen": " a", "rejected": " b"},
                                       {"chosen": "\n\nHuman: \n\nAssistant: hi\n\nHuman: x\n\nAssistant: a",
                                        "rejected": "\n\nHuman: \n\nAssistant: hi\n\nHuman: x\n\nAssistant: b"}])
    rejects: list[dict] = []
    chat = load_pairs(str(f), tok, rejects, chat=True)
    assert chat[0] == {"prompt": tok.apply_chat_template(HH_TURNS, tokenize=False, add_generation_prompt=True),
                       "chosen": "The cat is red.", "rejected": "No."}
    assert chat[0]["prompt"] == OPENING + ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
                                           "<|im_start|>user\nwhat color is the cat?<|im_end|>\n") + GEN
    assert chat[1] == {"prompt": OPENING + "<|im_start|>user\nhi<|im_end|>\n" + GEN, "chosen": "yes", "rejected": "no"}
    assert chat[2] == {"prompt": "Q:", "chosen": " a", "rejected": " b"}  # not a transcript: as it was
    assert [r["line"] for r in rejects] == [4] and "turn 1 (Human) is empty" in rejects[0]["reason"]
    # chat=False: today's raw text
    raw = load_pairs(str(f), tok, [], chat=False)
    assert raw[0] == {"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: what color is the cat?\n\nAssistant:",
                      "chosen": " The cat is red.", "rejected": " No."}


def test_a_template_that_refuses_the_conversation_rejects_that_record_alone(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    from tunelab.train.preference import load_pairs

    t = AutoTokenizer.from_pretrained(tiny_model)
    t.chat_template = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                       "{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
                       "{{ m['content'] }}{% endfor %}")
    f = _write(tmp_path / "hh.jsonl", [{"chosen": "\n\nAssistant: Hi!\n\nHuman: q\n\nAssistant: a",
                                        "rejected": "\n\nAssistant: Hi!\n\nHuman: q\n\nAssistant: b"}, HH])
    rejects: list[dict] = []
    pairs = load_pairs(str(f), t, rejects, chat=True)
    assert len(pairs) == 1 and [r["line"] for r in rejects] == [1]
    assert "chat template refuses this conversation: Conversation roles must alternate" in rejects[0]["reason"]


def test_rlhf_prompts_from_hh_transcripts(tmp_path, tok):
    from tunelab.train.preference import load_prompts

    f = _write(tmp_path / "p.jsonl", [HH, {"prompt": "Human: hi\n\nAssistant:"}, {"prompt": "plain"}])
    want = tok.apply_chat_template(HH_TURNS, tokenize=False, add_generation_prompt=True)
    assert load_prompts(str(f), tok, [], chat=True) == [want, OPENING + "<|im_start|>user\nhi<|im_end|>\n" + GEN,
                                                         "plain"]
    assert load_prompts(str(f), tok, [], chat=False)[:2] == [
        "Human: hi\n\nAssistant: hello\n\nHuman: what color is the cat?\n\nAssistant:", "Human: hi\n\nAssistant:"]


# ----------------------------------------------------------------------------- fitting to max_length


def _long_pair(n_turns: int, last: str = "what color is the cat?") -> dict:
    turns = _m(*[((U, A)[i % 2], f"one two {i}") for i in range(n_turns)], (U, last))
    return {"chosen": hh_text(turns) + " The cat is red.", "rejected": hh_text(turns) + " The cat is blue."}, turns


def test_a_chat_prompt_is_cut_by_whole_turns_and_stays_a_valid_prompt(tmp_path, tok):
    from tunelab.train.preference import fit_pairs, load_pairs

    rec, turns = _long_pair(30)
    pairs = load_pairs(str(_write(tmp_path / "long.jsonl", [rec])), tok, [], chat=True)
    (fitted,), cut = fit_pairs(tok, pairs, 128)
    p = fitted["prompt"]
    assert cut == 1 and len(tok(p, add_special_tokens=False)["input_ids"]) <= 128 - 1
    # the most recent turns that fit, rendered again: the template's opening, whole turns from a user turn on,
    # the final user turn and the generation prompt (a cut of the rendered text starts mid-turn instead)
    kept = [k for k in range(len(turns)) if p == tok.apply_chat_template(turns[k:], tokenize=False,
                                                                          add_generation_prompt=True)]
    assert kept and turns[kept[0]]["role"] == U and 0 < kept[0] < len(turns) - 1
    assert p.startswith(OPENING) and p.endswith("<|im_start|>user\nwhat color is the cat?<|im_end|>\n" + GEN)
    assert fitted["chosen"] != fitted["rejected"] and fitted["chosen"] == "The cat is red."
    assert all(type(v) is str for v in fitted.values())  # plain strings for the trainer's dataset


def test_a_final_turn_longer_than_the_budget_keeps_its_end(tmp_path, tok):
    from tunelab.train.numerics import encode_prompt_response
    from tunelab.train.preference import fit_pairs, load_pairs

    rec, _ = _long_pair(2, last="one two three four five six " * 30 + "what color is the cat?")
    pairs = load_pairs(str(_write(tmp_path / "long.jsonl", [rec])), tok, [], chat=True)
    (fitted,), cut = fit_pairs(tok, pairs, 64)
    p = fitted["prompt"]
    assert cut == 1 and len(tok(p, add_special_tokens=False)["input_ids"]) <= 63
    assert re.fullmatch(re.escape(OPENING + "<|im_start|>user\n") + r"[^<]*what color is the cat\?"
                        + re.escape("<|im_end|>\n" + GEN), p)
    # the reward's encoding (prompt cut, then response) keeps the same valid prompt, and the answers differ
    c, _ = encode_prompt_response(tok, pairs[0]["prompt"], pairs[0]["chosen"], 64)
    r, _ = encode_prompt_response(tok, pairs[0]["prompt"], pairs[0]["rejected"], 64)
    assert c != r and tok.decode(c).startswith(OPENING) and GEN + "The cat is red." in tok.decode(c)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), budget=st.integers(20, 200))
def test_fuzz_fit_keeps_the_final_turn(tok, n, budget):
    from tunelab.train.numerics import Rendered, fit_prompt, render_prompt

    turns = _m(*[((U, A)[i % 2], f"turn {i} one two") for i in range(n)], (U, "the last question?"))
    prompt = render_prompt(tok, turns, hh_text(turns))
    text, cut = fit_prompt(tok, prompt, budget)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= budget and cut == (text != prompt)
    last = render_prompt(tok, turns[-1:])
    if len(tok(last, add_special_tokens=False)["input_ids"]) <= budget:  # the final turn alone fits: a valid prompt
        assert text.startswith(OPENING) and text.endswith(last[len(OPENING):])
        assert isinstance(text, Rendered) and text.source == prompt.source
    elif text.startswith(OPENING):  # the final turn alone is too long: the end of its text, in a valid prompt
        tail = re.fullmatch(re.escape(OPENING + "<|im_start|>user\n") + "(.+)" + re.escape("<|im_end|>\n" + GEN),
                            text, re.DOTALL)
        assert tail and "the last question?".endswith(tail.group(1))
    else:  # not even the template's opening and a token of the final turn fit: the end of the text, as for any text
        assert prompt.endswith(text) and text.endswith("<|im_end|>\n" + GEN)


def test_a_prompt_with_no_turn_to_drop_is_cut_as_text(tok):
    from tunelab.train.numerics import fit_prompt, render_prompt

    prompt = render_prompt(tok, [{"role": "system", "content": "one two three " * 20}])
    text, cut = fit_prompt(tok, prompt, 12)
    assert cut and prompt.endswith(text) and len(tok(text, add_special_tokens=False)["input_ids"]) <= 12


def test_the_held_out_split_does_not_depend_on_the_rendering(tmp_path, tok):
    from tunelab.sections import PreferenceDataSection
    from tunelab.train.preference import load_pairs, split_sets

    rows = []
    for i in range(60):
        t = _m((U, f"question {i}?"))
        rows.append({"chosen": hh_text(t) + f" yes {i}", "rejected": hh_text(t) + f" no {i}"})
    f = str(_write(tmp_path / "hh.jsonl", rows))
    d = PreferenceDataSection(train=f, validation_split=0.2, test_split=0.3)
    sets = {}
    for chat in (True, False):
        tr, va, held, _ = split_sets(load_pairs(f, tok, [], chat=chat), d, 0, None)
        sets[chat] = [sorted(x["chosen"].strip() for x in s) for s in (tr, va, held)]
    assert sets[True] == sets[False] and all(sets[True])


# ----------------------------------------------------------------------------- the option and the recorded choice


@pytest.mark.parametrize("recipe, extra", [("reward", {}), ("dpo", {}),
                                           ("rlhf", {"reward_function": "m:f", "num_generations": 2})])
def test_every_preference_recipe_takes_the_option(recipe, extra, tmp_path):
    from tunelab import config as cfglib
    from tunelab.errors import ConfigError
    from tunelab.recipes import get

    cls, _ = get(recipe)
    base = {"recipe": recipe, "model": {"name": "m"}, **extra}
    for v in ("auto", True, False):
        cfg = cfglib.validate(cls, {**base, "data": {"train": "x.jsonl", "chat_template": v}})
        assert cfg.data.chat_template == v
        (tmp_path / "config.yaml").write_text(cfglib.dump(cfg))
        assert cfglib.load(cls, tmp_path / "config.yaml") == cfg  # --resume reads it back
    assert cfglib.validate(cls, {**base, "data": {"train": "x.jsonl"}}).data.chat_template == "auto"
    with pytest.raises(ConfigError, match="chat_template"):
        cfglib.validate(cls, {**base, "data": {"train": "x.jsonl", "chat_template": "maybe"}})


def test_reward_run_renders_hh_with_the_template_and_records_it(tmp_path, chat_model, tiny_model, capsys):
    """A reward run on the tiny chat model (auto → its template) trains, prints and records the choice; the
    same data on the base model (auto → raw text) records that instead."""
    from tunelab.train import preference as P
    from tunelab.train import reward
    from tunelab.workspace import Workspace

    rows = []
    for i in range(24):
        t = _m((U, "hi"), (A, "hello"), (U, f"what color is the cat {i}?"))
        rows.append({"chosen": hh_text(t) + " The cat is red.", "rejected": hh_text(t) + " The cat is blue."})
    f = str(_write(tmp_path / "hh.jsonl", rows))
    ws = Workspace.resolve(tmp_path / "ws")
    labels, ids = {}, {}
    for name, model in (("chat", chat_model), ("base", tiny_model)):
        cfg = reward.RewardConfig.model_validate({
            "recipe": "reward", "name": name, "model": {"name": str(model)},
            "data": {"train": f, "validation_split": 0.0, "test_split": 0.25, "max_length": 64},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "train": {"max_steps": 2, "batch_size": 4, "eval_every": 1, "learning_rate": 1e-3}})
        s = reward.run(cfg, ws)
        assert s["status"] == "completed" and s["steps"] == 2
        assert s["data"]["hh_transcripts"] == 24 and s["heldout"]["before"]["pairs"] > 0
        labels[name], ids[name] = s["data"]["chat_template"], s["run_id"]
        assert json.loads((ws.run_dir(s["run_id"]) / "summary.json").read_text())["data"] == s["data"]
    assert labels == {"chat": "chat template (model's own)", "base": "raw text (auto: the model has no chat template)"}
    out = capsys.readouterr().out
    assert "hh-rlhf transcripts: 24, as chat template (model's own)" in out
    assert "hh-rlhf transcripts: 24, as raw text (auto: the model has no chat template)" in out
    # a reward run used to score prompts fed the other way (RLHF, a DPO judge) says so
    _, info = P.load_reward_model(ids["chat"], ws)
    assert info["reward_chat_template"] == "chat template (model's own)"
    P.warn_if_reward_reads_otherwise(info, P.chat_choice("auto", True))
    P.warn_if_reward_reads_otherwise(info, P.chat_choice("auto", False))  # the same way: nothing to say
    warned = capsys.readouterr().out.splitlines()
    assert warned == [f"warning: reward model {ids['chat']} was trained on hh-rlhf transcripts as chat template "
                      "(model's own); this run feeds them as raw text (auto: the model has no chat template) "
                      "(set data.chat_template to match)"]
