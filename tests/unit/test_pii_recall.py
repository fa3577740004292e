"""PII recall and precision on the generated, labelled set (tunelab.data.pii_eval), and its NER pass.

The bounds are the acceptance bounds: structured recall >= 0.95 at precision >= 0.95, PERSON
recall >= 0.75 with the spaCy pipeline of the `pii` extra. `bench/pii_recall.py` prints the
whole table.
"""

from __future__ import annotations

import importlib.util
import socket

import pytest

from tunelab.data import pii_eval
from tunelab.data.steps import pii
from tunelab.data.steps.pii import detect, iban_ok, luhn_ok


@pytest.fixture(scope="module")
def labelled():
    return pii_eval.make_set(1500, seed=0)


def test_the_set_is_deterministic_and_well_formed(labelled):
    assert [(e.text, e.spans) for e in pii_eval.make_set(60, seed=0)] == [(e.text, e.spans) for e in labelled[:60]]
    assert [e.text for e in pii_eval.make_set(60, seed=1)] != [e.text for e in labelled[:60]]
    assert {e.locale for e in labelled} == set(pii_eval.LOCALES)
    types = {t for e in labelled for t, _, _ in e.spans}
    assert set(pii_eval.STRUCTURED) <= types and {"PERSON", "LOCATION", "ORG"} <= types
    for e in labelled:
        for typ, s, end in e.spans:
            value = e.text[s:end]
            assert 0 <= s < end <= len(e.text) and value == value.strip(), (typ, value)
            if typ == "IBAN":
                assert iban_ok(value.replace(" ", "").upper()), value
            if typ == "CREDIT_CARD":
                digits = value.replace(" ", "").replace("-", "")
                assert luhn_ok(digits) and 12 <= len(digits) <= 19, value


def test_structured_recall_and_precision(labelled):
    sc = pii_eval.score(labelled, detect, types=pii_eval.STRUCTURED)
    for typ in pii_eval.STRUCTURED:  # every type is present and none collapses
        assert sc.gold[typ] >= 10 and sc.recall([typ]) >= 0.9, (typ, sc.recall([typ]))
    assert sc.recall(pii_eval.STRUCTURED) >= 0.95, sc.recall(pii_eval.STRUCTURED)
    assert sc.precision(pii_eval.STRUCTURED) >= 0.95, sc.precision(pii_eval.STRUCTURED)
    for loc, (found, gold) in sc.by_locale.items():
        assert found / gold >= 0.9, loc


def test_the_bound_can_fail(labelled, monkeypatch):
    """Without phone detection (phonenumbers), the same set misses the bound: the test above has teeth."""
    monkeypatch.setattr(pii, "_find_phones", lambda text, regions=(): iter(()))
    sc = pii_eval.score(labelled, detect, types=pii_eval.STRUCTURED)
    assert sc.recall(["PHONE"]) == 0 and sc.recall(pii_eval.STRUCTURED) < 0.95


def test_scoring_rules():
    ex = pii_eval.Example("card 4111 1111 1111 1111 and 42", "US", [("CREDIT_CARD", 5, 24)])
    F = pii.Finding
    sc = pii_eval.score([ex], lambda t: [F("CREDIT_CARD", 5, 19)], types=["CREDIT_CARD"])
    assert sc.found.get("CREDIT_CARD", 0) == 0 and sc.correct["CREDIT_CARD"] == 1  # partly masked: a miss
    sc = pii_eval.score([ex], lambda t: [F("CREDIT_CARD", 5, 24), F("CREDIT_CARD", 29, 31)], types=["CREDIT_CARD"])
    assert sc.recall(["CREDIT_CARD"]) == 1 and sc.precision(["CREDIT_CARD"]) == 0.5
    sc = pii_eval.score([ex], lambda t: [F("PHONE", 5, 24)], types=["CREDIT_CARD", "PHONE"])
    assert sc.recall(["CREDIT_CARD"]) == 0 and sc.precision(["PHONE"]) == 0  # wrong type counts against both


needs_pipeline = pytest.mark.skipif(
    importlib.util.find_spec("spacy") is None or importlib.util.find_spec(pii.NER_MODEL) is None,
    reason=f"the NER extra is not installed (pip install 'tunelab[pii]' brings spaCy and {pii.NER_MODEL})")


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise OSError("network access in a test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@needs_pipeline
def test_ner_person_recall_offline(labelled, no_network):
    backend = pii.SpacyBackend()  # loads from the installed wheel; the socket guard proves nothing is fetched
    sample = labelled[:400]
    sc = pii_eval.score(sample, lambda t: detect(t, backend=backend))
    assert sc.gold["PERSON"] >= 150
    assert sc.recall(["PERSON"]) >= 0.75, sc.recall(["PERSON"])
    assert sc.recall(["LOCATION"]) >= 0.5 and sc.recall(["ORG"]) >= 0.5
    # the rules still win where they match: NER never lowers structured recall
    assert sc.recall(pii_eval.STRUCTURED) >= 0.95 and sc.precision(pii_eval.STRUCTURED) >= 0.95


@needs_pipeline
def test_ner_step_masks_names_and_pickles_as_settings():
    import pickle

    step = pii.PIIStep(ner=True)
    out = step({"text": "Priya Sharma of Infosys moved to Berlin last year.", "meta": {}})
    assert out["text"] == "[PERSON] of [ORG] moved to [LOCATION] last year."
    assert step.config()["ner"] == pii.NER_MODEL
    clone = pickle.loads(pickle.dumps(step))
    assert clone.backend._nlp is None and clone({"text": "Call Rahul Mehta."})["text"] == "Call [PERSON]."
