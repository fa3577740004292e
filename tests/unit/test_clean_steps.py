"""Cleaning, filtering, dedup and decontamination steps: behaviour on canonical records."""

from __future__ import annotations

import copy
import gzip
import json
import pickle

import pytest

from tunelab.data.steps.base import Drop
from tunelab.data.steps.clean import (ControlChars, ExactDedup, LengthFilter, Normalize, QualityFilter,
                                      StripHTML, select_texts)
from tunelab.data.steps.decontaminate import Decontaminate

PARAGRAPH = (
    "The history of the printing press shows how a single technical change can reshape a whole "
    "society. Before Gutenberg, books were copied by hand, which made them rare and expensive. "
    "With movable type, printers could produce hundreds of copies in the time a scribe needed for "
    "one, and the price of books fell sharply. Literacy spread to merchants and artisans, new ideas "
    "travelled faster than ever, and scholars began to compare texts that had been checked for errors."
)

TEST_ITEM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
             "in May. How many clips did Natalia sell altogether in April and May?")


def chat(*contents: str, meta: dict | None = None) -> dict:
    roles = ["user", "assistant"]
    rec = {"messages": [{"role": roles[i % 2], "content": c} for i, c in enumerate(contents)]}
    if meta is not None:
        rec["meta"] = meta
    return rec


class WordTokenizer:
    """A tiny stand-in for a Hugging Face tokenizer: one id per whitespace word plus BOS."""

    name_or_path = "fake/word-tokenizer"

    def __call__(self, text: str) -> dict:
        return {"input_ids": [0] + list(range(1, len(text.split()) + 1))}


# ---------------------------------------------------------------- Normalize

def test_normalize_newlines_whitespace_and_unicode():
    step = Normalize()
    assert step({"text": "Hello\r\n\r\n\r\n\r\nworld  !"})["text"] == "Hello\n\nworld !"
    assert step({"text": "  a\rb\t\tc \n\nd  "})["text"] == "a\nb c\n\nd"
    assert step({"text": "cafe\u0301"})["text"] == "caf\u00e9"  # NFC composes
    assert Normalize(form="NFKC")({"text": "\ufb01"})["text"] == "fi"
    assert Normalize(form=None, collapse_whitespace=False)({"text": " a  b "})["text"] == "a  b"
    with pytest.raises(ValueError):
        Normalize(form="NFX")


def test_normalize_keeps_code_indentation_and_prompt_completion_boundary():
    code = "def f():\n    return  1   \n"
    assert Normalize()({"text": code})["text"] == "def f():\n    return 1"
    assert Normalize(keep_indent=False)({"text": code})["text"] == "def f():\n return 1"
    out = Normalize()({"prompt": "  The sky is", "completion": " blue.  "})
    assert out == {"prompt": "The sky is", "completion": " blue."}
    out = Normalize()({"prompt": "Q: 2+2?\nA: ", "chosen": "4 ", "rejected": "5\n"})
    assert out == {"prompt": "Q: 2+2?\nA: ", "chosen": "4", "rejected": "5"}


def test_normalize_messages_and_labels():
    rec = {"messages": [{"role": "user", "content": " hi \r\n"}, {"role": "assistant", "content": "yo  yo"}]}
    out = Normalize()(rec)
    assert [m["content"] for m in out["messages"]] == ["hi", "yo yo"]
    assert rec["messages"][0]["content"] == " hi \r\n"  # input not mutated
    assert Normalize()({"text": " x ", "label": " pos "}) == {"text": "x", "label": " pos "}


# ---------------------------------------------------------------- ControlChars

def test_control_chars_removed():
    step = ControlChars()
    s = "a\u200bb\x07c\u200d\ufeff\x00d\x85e\x9f\ud800f"
    assert step({"text": s})["text"] == "abcdef"
    assert step({"text": "tab\there\nnext\r\nline\rend\x0cpage"})["text"] == "tab\there\nnext\nline\nend\npage"
    assert ControlChars(zero_width=False)({"text": "a\u200db\x07"})["text"] == "a\u200db"
    assert step({"text": "plain text, unchanged"})["text"] == "plain text, unchanged"


# ---------------------------------------------------------------- StripHTML

def test_strip_html():
    step = StripHTML()
    assert step({"text": "<p>a &amp; b</p><script>x</script>"})["text"] == "a & b"
    assert step({"text": "<ul><li>one</li><li>two</li></ul>"})["text"] == "one\ntwo"
    assert step({"text": "line<br>next<br/>last"})["text"] == "line\nnext\nlast"
    assert step({"text": "x<!-- hidden -->y <style>p {color: red}</style><b>z</b>"})["text"] == "xy z"
    assert step({"text": '<a href="https://e.org">link</a> &lt;ok&gt;'})["text"] == "link <ok>"


def test_strip_html_leaves_non_html_alone():
    step = StripHTML()
    for s in ["Tom &amp; Jerry", "if a<b and c>d then", "Vec<u8> and List<String>", "3 < 4 > 2"]:
        assert step({"text": s})["text"] == s
    answer = "Use a link:\n```html\n<a href=\"x\">go</a>\n```\n<b>Done</b>"
    assert step({"text": answer})["text"] == "Use a link:\n```html\n<a href=\"x\">go</a>\n```\nDone"
    assert StripHTML(only_if_html=False)({"text": "Tom &amp; Jerry"})["text"] == "Tom & Jerry"
    out = step({"prompt": "<i>Say</i>", "completion": " <b>hi</b>"})
    assert out == {"prompt": "Say", "completion": " hi"}  # outer whitespace of each text kept


# ---------------------------------------------------------------- LengthFilter

def test_length_filter_chars_and_words():
    step = LengthFilter(min_chars=5, max_chars=20)
    assert step({"text": "abcd"}) == Drop("too_short", "chars=4 < 5")
    assert step({"text": "abcdef"}) == {"text": "abcdef"}
    assert step({"text": "x" * 21}).reason == "too_long"
    # "all" counts every text of the record together
    assert step({"prompt": "abc", "completion": "de"}) == {"prompt": "abc", "completion": "de"}
    words = LengthFilter(min_words=2, max_words=3)
    assert words({"text": "one"}).reason == "too_short"
    assert words({"text": "one two three four"}).reason == "too_long"
    assert words(chat("one two", "three")) == chat("one two", "three")
    with pytest.raises(ValueError):
        LengthFilter(min_chars=10, max_chars=5)


def test_length_filter_tokens_and_fields():
    tok = WordTokenizer()
    step = LengthFilter(min_tokens=3, max_tokens=5, tokenizer=tok)
    assert step({"text": "a"}) == Drop("too_short", "tokens=2 < 3")
    assert step({"text": "a b c"})["text"] == "a b c"
    assert step({"prompt": "a b c", "completion": "d e"}) == Drop("too_long", "tokens=6 > 5")
    assert step.config()["tokenizer"] == "fake/word-tokenizer"
    with pytest.raises(ValueError):
        LengthFilter(max_tokens=5)
    resp = LengthFilter(min_words=3, field="response")
    long_q = "a question with very many words in it"
    assert resp(chat(long_q, "short")).reason == "too_short"
    assert resp(chat("q", "a full answer")) == chat("q", "a full answer")
    assert resp({"prompt": long_q, "chosen": "yes", "rejected": "no no no"}).reason == "too_short"
    assert resp({"prompt": "q", "completion": "one two three"})["completion"] == "one two three"
    # a named field the record does not have: the filter does not apply
    assert LengthFilter(min_chars=100, field="completion")(chat("q", "a")) == chat("q", "a")
    with pytest.raises(ValueError):
        LengthFilter(field="answer")


def test_select_texts():
    rec = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a1"},
                        {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]}
    assert select_texts(rec) == ["u", "a1", "u2", "a2"]
    assert select_texts(rec, "response") == ["a2"]
    assert select_texts({"text": "t", "label": "l"}, "text") == ["t"]
    assert select_texts({"text": "t"}, "prompt") == []


# ---------------------------------------------------------------- QualityFilter

def test_quality_filter_passes_normal_prose_and_short_texts():
    step = QualityFilter()
    assert len(PARAGRAPH.split()) >= 50
    assert step.check(PARAGRAPH) is None
    assert step({"text": PARAGRAPH})["text"] == PARAGRAPH
    assert step(chat("Question about printing?", PARAGRAPH))["messages"][1]["content"] == PARAGRAPH
    # short chat turns are not checked, however repetitive
    assert step(chat("ok ok ok", "yes yes yes")) == chat("ok ok ok", "yes yes yes")


@pytest.mark.parametrize("text,reason", [
    ("BUY NOW AND SAVE WITH THE BEST DEALS\n" * 20, "quality:dup_lines"),
    ("Buy cheap pills now! " * 60, "quality:stop_words"),
    ("a b c d e f g h i j " * 10, "quality:mean_word_length"),
    ("Supercalifragilisticexpialidocious antidisestablishmentarianism " * 30, "quality:mean_word_length"),
    (PARAGRAPH + " #news #deal #sale #wow #cool #top #new #hot #win #fun", "quality:symbol_word_ratio"),
    ("\n".join(f"- item {i}: the thing to have with" for i in range(20)), "quality:bullet_lines"),
    ("\n".join(f"and then the long story number {i} simply went on and on..." for i in range(20)),
     "quality:ellipsis_lines"),
    (PARAGRAPH + " " + " ".join(str(i) for i in range(100, 130)), "quality:alpha_words"),
    # one paragraph of five unique lines, then the same one-line paragraph three times:
    # 2/8 duplicate lines passes, 2/4 duplicate paragraphs does not
    (PARAGRAPH.replace(". ", ".\n") + "\n\n"
     + "\n\n".join(["Subscribe to the newsletter and follow us with a like."] * 3), "quality:dup_paras"),
    (PARAGRAPH + " " + "free money " * 20, "quality:top_2gram"),
    (PARAGRAPH + " " + "the best deals of the day " * 12, "quality:top_3gram"),
    (PARAGRAPH + " " + PARAGRAPH, "quality:dup_5gram"),
])
def test_quality_filter_rules(text, reason):
    out = QualityFilter()({"text": text, "meta": {"line": 1}})
    assert isinstance(out, Drop) and out.reason == reason, out


def test_quality_filter_thresholds_are_configurable():
    spam = "BUY NOW AND SAVE WITH THE BEST DEALS\n" * 20
    assert QualityFilter(min_words_to_check=1000)({"text": spam}) == {"text": spam}
    relaxed = QualityFilter(max_dup_lines=None, max_dup_paras=None, max_dup_line_chars=None,
                            max_dup_para_chars=None, top_ngram_max={}, dup_ngram_max={})
    assert relaxed({"text": spam}) == {"text": spam}
    assert QualityFilter(min_stop_words=None, top_ngram_max={}, dup_ngram_max={})(
        {"text": "Buy cheap pills now! " * 60})["text"].startswith("Buy")
    cfg = QualityFilter().config()
    assert cfg["max_dup_lines"] == 0.30 and cfg["top_ngram_max"] == {2: 0.20, 3: 0.18, 4: 0.16}
    assert cfg["dup_ngram_max"][5] == 0.15 and cfg["dup_ngram_max"][10] == 0.10
    assert cfg["stop_words"] == ["the", "be", "to", "of", "and", "that", "have", "with"]
    json.dumps(cfg)


# ---------------------------------------------------------------- ExactDedup

def test_exact_dedup_keeps_first_and_catches_variants():
    step = ExactDedup()
    recs = [{"text": "Hello, World!"}, {"text": "Different text"}, {"text": "hello   world"},
            {"text": "HELLO WORLD?!"}, {"text": "Different  TEXT."}]
    out = [step(r) for r in recs]
    assert out[0] == recs[0] and out[1] == recs[1]
    assert out[2] == Drop("duplicate", "0") and out[3] == Drop("duplicate", "0")
    assert out[4] == Drop("duplicate", "1")
    strict = ExactDedup(normalize=False)
    assert strict({"text": "Hello"}) == {"text": "Hello"}
    assert strict({"text": "hello"}) == {"text": "hello"}
    assert isinstance(strict({"text": "Hello"}), Drop)


def test_exact_dedup_messages_and_text_boundaries():
    step = ExactDedup()
    assert step(chat("Hi there", "Hello!")) == chat("Hi there", "Hello!")
    assert step(chat("hi  there", "hello")).reason == "duplicate"
    assert step(chat("Hi", "there Hello")) == chat("Hi", "there Hello")  # turns are not merged
    assert step(chat("Hi there", "Hello!", meta={"source": "other.jsonl"})).reason == "duplicate"


# ---------------------------------------------------------------- Decontaminate

def test_decontaminate_drops_leaked_span_and_keeps_unrelated():
    step = Decontaminate([TEST_ITEM])
    span = " ".join(TEST_ITEM.split()[3:16])  # 13 words from the middle of the test item
    leaked = {"text": f"Practice problem. {span.upper()}!!! Solve it step by step."}
    clean = {"text": PARAGRAPH}
    assert step(clean) == clean
    out = step(leaked)
    assert isinstance(out, Drop) and out.reason == "contaminated"
    assert step.leaked == [{"index": 1, "overlap": 1}]
    # twelve words are not enough
    twelve = " ".join(TEST_ITEM.split()[3:15])
    assert step({"text": twelve}) == {"text": twelve}
    assert json.dumps(step.leaked).count("clips") == 0  # no text kept


def test_decontaminate_messages_fields_and_overlap():
    step = Decontaminate([TEST_ITEM], min_overlap=2)
    whole = chat("Solve this:", TEST_ITEM)  # many shared grams
    few = chat("Here: " + " ".join(TEST_ITEM.split()[:13]), "ok")
    assert step(few) == few  # one gram < min_overlap
    assert step(whole).reason == "contaminated"
    assert step.leaked[0]["index"] == 1 and step.leaked[0]["overlap"] > 10
    prompt_only = Decontaminate([TEST_ITEM], field="response")
    rec = {"prompt": TEST_ITEM, "completion": "72"}
    assert prompt_only(rec) == rec


def test_decontaminate_short_items_and_pickling():
    short = "What is the boiling point of water at sea level?"  # 10 words < 13: one whole gram
    step = Decontaminate([short, "Paris", "B"])
    assert step({"text": "Quiz: what is the boiling point of water at sea level? 100 C"}).reason == "contaminated"
    assert step({"text": "What is the boiling point of water?"})["text"].startswith("What")
    assert step({"text": "Paris is the capital of France. B"})["text"].startswith("Paris")  # tiny items ignored
    clone = pickle.loads(pickle.dumps(step))
    assert clone({"text": short}).reason == "contaminated"
    cfg = step.config()
    assert cfg["n"] == 13 and cfg["eval_texts"] == 3 and cfg["eval_grams"] == 1
    json.dumps(cfg)


def test_decontaminate_from_files(tmp_path):
    jl = tmp_path / "test.jsonl"
    jl.write_text(json.dumps({"question": TEST_ITEM, "answer": "72", "meta": {"id": 3}}) + "\n\n")
    js = tmp_path / "dev.json.gz"
    other = "The quick brown fox jumps over the lazy dog while the farmer watches from the porch."
    with gzip.open(js, "wt", encoding="utf-8") as f:
        json.dump([{"messages": [{"role": "user", "content": other}]}], f)
    step = Decontaminate.from_files([jl, js])
    assert step.config()["sources"] == [str(jl), str(js)]
    assert step({"text": TEST_ITEM.lower()}).reason == "contaminated"
    assert step({"prompt": "Story:", "completion": other}).reason == "contaminated"
    assert step({"text": PARAGRAPH}) == {"text": PARAGRAPH}
    assert [d["index"] for d in step.leaked] == [0, 1]


# ---------------------------------------------------------------- all steps

def all_steps() -> list:
    return [Normalize(), ControlChars(), StripHTML(), LengthFilter(min_chars=1, max_words=1000),
            QualityFilter(), ExactDedup(), Decontaminate([TEST_ITEM])]


@pytest.mark.parametrize("step", all_steps(), ids=lambda s: s.name)
def test_meta_and_input_never_altered(step):
    meta = {"source": "<b>x</b>.jsonl", "line": 7, "note": "  Hello\r\n\u200b  "}
    for rec in [{"text": "<p>Hi&amp;  there\r\n</p>\x07", "meta": meta},
                chat(" <i>hello</i> ", "Hi\u200b  there", meta=meta),
                {"prompt": "Say", "completion": " <b>hi</b>", "meta": meta},
                {"text": PARAGRAPH + " " + PARAGRAPH, "label": "  pos ", "meta": meta},
                {"text": TEST_ITEM, "meta": meta}]:
        before = copy.deepcopy(rec)
        out = step(rec)
        assert rec == before
        if not isinstance(out, Drop):
            assert out["meta"] == before["meta"]
            assert out.get("label") == before.get("label")
    assert isinstance(step.name, str) and step.name != "step"
    json.dumps(step.config())
