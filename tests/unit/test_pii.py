"""PII/secret detection and redaction: every type has positives and near-miss negatives."""

from __future__ import annotations

import hashlib
import importlib.util
import re

import pytest

from tunelab.data.steps.base import Drop
from tunelab.data.steps.pii import TYPES, Finding, PIIStep, detect, iban_ok, luhn_ok, redact
from tunelab.errors import ConfigError, MissingExtra

GH_TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
       ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U")
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----"


def found(text: str, typ: str | None = None) -> list[str]:
    """The matched values (tests only) of ``typ`` (or every type)."""
    return [f.value(text) for f in detect(text) if typ is None or f.type == typ]


@pytest.mark.parametrize("typ,text,value", [
    ("EMAIL", "write to jane.doe+tag@example.co.uk today", "jane.doe+tag@example.co.uk"),
    ("PHONE", "call +1 415 555 2671.", "+1 415 555 2671"),
    ("PHONE", "office +44 20 7946 0958", "+44 20 7946 0958"),
    ("PHONE", "Berlin +49 (0)30 1234567", "+49 (0)30 1234567"),
    ("PHONE", "or (415) 555-2671 after 5", "(415) 555-2671"),
    ("PHONE", "cell 415-555-2671", "415-555-2671"),
    ("PHONE", "London 020 7946 0958", "020 7946 0958"),
    ("PHONE", "Paris 06 12 34 56 78", "06 12 34 56 78"),
    ("CREDIT_CARD", "card 4111 1111 1111 1111 exp 12/25", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "card 4111-1111-1111-1111", "4111-1111-1111-1111"),
    ("CREDIT_CARD", "amex 378282246310005", "378282246310005"),
    ("CREDIT_CARD", "amex 3782 822463 10005", "3782 822463 10005"),
    ("IBAN", "pay GB82WEST12345698765432 now", "GB82WEST12345698765432"),
    ("IBAN", "pay DE89370400440532013000", "DE89370400440532013000"),
    ("IBAN", "pay DE89 3704 0044 0532 0130 00 THANKS", "DE89 3704 0044 0532 0130 00"),
    ("SSN", "SSN 123-45-6789.", "123-45-6789"),
    ("IP_ADDRESS", "host 192.168.1.20.", "192.168.1.20"),
    ("IP_ADDRESS", "v6 2001:db8::8a2e:370:7334 up", "2001:db8::8a2e:370:7334"),
    ("IP_ADDRESS", "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"),
    ("IP_ADDRESS", "link fe80::1ff:fe23:4567:890a", "fe80::1ff:fe23:4567:890a"),
    ("URL_CREDENTIALS", "postgres://admin:s3cr3t@db.example.com:5432/app", "admin:s3cr3t@db.example.com:5432"),
    ("URL_CREDENTIALS", "redis://:hunter2@cache.local/0", ":hunter2@cache.local"),
    ("API_KEY", "aws AKIAIOSFODNN7EXAMPLE key", "AKIAIOSFODNN7EXAMPLE"),
    ("API_KEY", f"gh {GH_TOKEN}", GH_TOKEN),
    ("API_KEY", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop"),
    ("API_KEY", "slack xoxb-123456789012-abcdefghijKL", "xoxb-123456789012-abcdefghijKL"),
    ("API_KEY", "OPENAI sk-proj-aB3dE5gH7jK9mN1pQ3sT5vX7z", "sk-proj-aB3dE5gH7jK9mN1pQ3sT5vX7z"),
    ("API_KEY", "maps AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q", "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"),
    ("API_KEY", f"jwt {JWT}", JWT),
    ("API_KEY", f"key:\n{PEM}\nend", PEM),
    ("API_KEY", 'api_key="abcd1234efgh5678"', "abcd1234efgh5678"),
    ("API_KEY", "DB_PASSWORD=Tr0ub4dor&3xyz", "Tr0ub4dor&3xyz"),
    ("API_KEY", '{"client_secret": "q9w8e7r6t5y4"}', "q9w8e7r6t5y4"),
    ("API_KEY", 'password: str = "correct horse battery"', "correct horse battery"),
    ("API_KEY", "Authorization: Bearer abcdef0123456789abcdef", "abcdef0123456789abcdef"),
])
def test_positive(typ, text, value):
    assert found(text, typ) == [value]


@pytest.mark.parametrize("text", [
    # phones: plain numbers, years, order numbers, prices, dates, times
    "Order NW-123456 shipped", "ticket 12345 and 123456", "in 1999 and 2024", "costs $35.23 or €1,234.50",
    "due 2024-03-05", "on 05.03.2024 12:30", "on 03/05/2024", "+35 points", "ratio 1:2:3",
    "version 1.2.3 of v0.12.3", "call 5551234567",
    # cards: one digit changed (Luhn fails), wrong issuer prefix, too short
    "card 4111 1111 1111 1112", "card 4111-1111-1111-1121", "id 1234567812345670", "pin 411111111111",
    # IBAN: broken checksums, wrong length, unknown country
    "GB82WEST12345698765433", "DE89370400440532013001", "GB82WEST1234569876543", "ZZ82WEST12345698765432",
    # SSN: invalid area / group / serial
    "000-12-3456", "666-12-3456", "900-12-3456", "123-00-6789", "123-45-0000",
    # IP: octets > 255, not four parts, times, MACs, C++ scopes
    "999.1.1.1", "256.100.1.1", "1.2.3", "at 10:30:00", "mac 00:1A:2B:3C:4D:5E", "std::vector::size",
    # email / URL: no host TLD (URLs without a password are URL findings: test_url_without_password)
    "@handle says hi", "user@localhost",
    # keys: wrong shape, placeholders, code
    "AKIA1234", "ghp_short", "sk-learn-is-a-python-library", "AIzaShort",
    'api_key="<YOUR_API_KEY>"', "password = hunter2", "token = os.environ['HF_TOKEN']",
    "pad_token = tokenizer.eos_token", 'pad_token="<|endoftext|>"', "password=${DB_PASSWORD}",
    "max_tokens = 123456789", 'secret = "xxxxxxxxxxxx"', "Token: the smallest unit",
])
def test_negative(text):
    assert detect(text) == [], [(f.type, f.value(text)) for f in detect(text)]


def test_validators():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82WEST12345698765432") and not iban_ok("GB82WEST12345698765433")
    assert not iban_ok("GB82WEST1234569876543")  # wrong length for GB


def test_overlaps_longest_then_earliest_and_deterministic():
    text = "dsn https://jane:pw12345@example.com and api_key=AKIAIOSFODNN7EXAMPLE"
    fs = detect(text)
    assert [f.type for f in fs] == ["URL_CREDENTIALS", "API_KEY"]  # no EMAIL inside the URL
    assert fs[1].value(text) == "AKIAIOSFODNN7EXAMPLE"
    assert detect(text) == fs
    assert all(a.end <= b.start for a, b in zip(fs, fs[1:]))


def test_types_filter_and_unknown_type():
    text = "jane@example.com +1 415 555 2671"
    assert [f.type for f in detect(text, {"EMAIL"})] == ["EMAIL"]
    assert [f.type for f in detect(text, {"phone"})] == ["PHONE"]
    with pytest.raises(ValueError, match="unknown PII type"):
        detect(text, {"NAME"})
    with pytest.raises(ValueError, match="NER"):
        detect(text, {"PERSON"})


def test_mask():
    text = "Mail jane@example.com, call +1 415 555 2671, SSN 123-45-6789."
    out, counts = redact(text)
    assert out == "Mail [EMAIL], call [PHONE], SSN [SSN]."
    assert counts == {"EMAIL": 1, "PHONE": 1, "SSN": 1}
    assert redact(out) == (out, {})  # idempotent: the tokens themselves are not PII
    assert redact("postgres://admin:s3cr3t@db:5432/app")[0] == "postgres://[URL_CREDENTIALS]/app"


def test_hash_is_stable_and_salted():
    text = "from jane@example.com to bob@example.org, cc jane@example.com"
    out, counts = redact(text, style="hash")
    tokens = re.findall(r"\[EMAIL:([0-9a-f]{10})\]", out)
    assert len(tokens) == 3 and tokens[0] == tokens[2] != tokens[1] and counts["EMAIL"] == 3
    assert tokens[0] == hashlib.sha256(b"jane@example.com").hexdigest()[:10]
    assert redact(text, style="hash")[0] == out
    salted = redact(text, style="hash", salt="s1")[0]
    assert salted != out and salted == redact(text, style="hash", salt="s1")[0]
    assert redact(text, style="hash", salt="s2")[0] != salted
    assert "jane" not in out and redact(out, style="hash")[0] == out
    with pytest.raises(ValueError):
        redact(text, style="drop")


def test_step_mask_redacts_every_turn_and_keeps_meta():
    step = PIIStep()
    rec = {"messages": [
        {"role": "system", "content": "Support bot. Escalate to ops@example.com."},
        {"role": "user", "content": "My card is 4111 1111 1111 1111, phone 415-555-2671"},
        {"role": "assistant", "content": "Thanks, noted."},
    ], "meta": {"source": "mail/jane@example.com.jsonl", "line": 3}}
    out = step(rec)
    assert [m["content"] for m in out["messages"]] == [
        "Support bot. Escalate to [EMAIL].",
        "My card is [CREDIT_CARD], phone [PHONE]",
        "Thanks, noted.",
    ]
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant"]
    assert out["meta"] == {"source": "mail/jane@example.com.jsonl", "line": 3}
    assert rec["messages"][0]["content"].endswith("ops@example.com.")  # input not mutated
    pc = step({"prompt": "IP 10.0.0.7?", "completion": "It is 10.0.0.7", "meta": {}})
    assert pc["prompt"] == "IP [IP_ADDRESS]?" and pc["completion"] == "It is [IP_ADDRESS]"
    clean = {"text": "nothing to see", "meta": {}}
    assert step(clean) is clean
    assert step.counts == {"EMAIL": 1, "CREDIT_CARD": 1, "PHONE": 1, "IP_ADDRESS": 2}
    assert step.records_with_pii == 2


def test_step_hash_and_types():
    step = PIIStep(style="hash", types=["email"], salt="pepper")
    out = step({"text": "jane@example.com 123-45-6789"})
    digest = hashlib.sha256(b"pepperjane@example.com").hexdigest()[:10]
    assert out["text"] == f"[EMAIL:{digest}] 123-45-6789"
    assert step.config() == {"style": "hash", "types": ["EMAIL"], "salt": True, "ner": False}
    assert PIIStep().config() == {"style": "mask", "types": None, "salt": False, "ner": False}


def test_step_drop_lists_types_only():
    step = PIIStep(style="drop")
    rec = {"prompt": "reach me at jane@example.com", "completion": "or +1 415 555 2671, jane@example.com"}
    d = step(rec)
    assert d == Drop("pii", detail="EMAIL,PHONE")
    assert step({"text": "clean"}) == {"text": "clean"}
    assert step.counts == {"EMAIL": 2, "PHONE": 1} and step.records_with_pii == 1


def test_step_bad_config():
    with pytest.raises(ConfigError, match="style"):
        PIIStep(style="shred")
    with pytest.raises(ConfigError, match="unknown PII type"):
        PIIStep(types=["EMAIL", "NAME"])


def test_values_never_leak_into_logs():
    values = ["jane@example.com", "+1 415 555 2671", "4111 1111 1111 1111", "GB82WEST12345698765432",
              "123-45-6789", "192.168.1.20", "ftp://admin:s3cr3t@db.example.com", "AKIAIOSFODNN7EXAMPLE"]
    text = " ; ".join(values)
    fs = detect(text)
    assert sorted(f.type for f in fs) == sorted(TYPES)
    assert all(isinstance(f, Finding) for f in fs)
    salt = "pepper-secret-salt"
    logged = [repr(fs), str(fs)]
    for style in ("mask", "hash", "drop"):
        step = PIIStep(style=style, salt=salt)
        res = step({"text": text, "meta": {}})
        logged += [repr(step.config()), repr(step.counts), repr(dict(step.counts)), repr(res.detail if
                   isinstance(res, Drop) else res["text"])]
    blob = "\n".join(logged)
    for v in values + [salt, "s3cr3t", "4111"]:
        assert v not in blob


@pytest.mark.skipif(importlib.util.find_spec("presidio_analyzer") is not None,
                    reason="presidio is installed; the missing-extra path cannot be exercised")
def test_ner_without_presidio_says_how_to_install():
    with pytest.raises(MissingExtra, match=r"pip install 'tunelab\[pii\]'"):
        PIIStep(ner=True)
