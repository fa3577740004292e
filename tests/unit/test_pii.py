"""PII/secret detection and redaction: every type has positives and near-miss negatives."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys

import pytest

from tunelab.data.steps.base import Drop
from tunelab.data.steps.pii import (RULES_VERSION, TYPES, Finding, PIIStep, card_issuer_ok, detect,
                                    iban_ok, luhn_ok, redact, salt_fingerprint)
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
    # national phone formats (phonenumbers' matcher, several default regions)
    ("PHONE", "ring 312.847.2290 today", "312.847.2290"),
    ("PHONE", "ring 312 847 2290 today", "312 847 2290"),
    ("PHONE", "US 1-312-847-2290", "1-312-847-2290"),
    ("PHONE", "Leeds (0113) 496 7723", "(0113) 496 7723"),
    ("PHONE", "mobile 07912 345678", "07912 345678"),
    ("PHONE", "Praxis 030/28394756", "030/28394756"),
    ("PHONE", "Handy 0176 23456789", "0176 23456789"),
    ("PHONE", "bureau 01.42.68.53.07", "01.42.68.53.07"),
    ("PHONE", "portable 07-62-18-44-90", "07-62-18-44-90"),
    ("PHONE", "Bengaluru 98452 17730", "98452 17730"),
    ("PHONE", "Mumbai office 022-2674 3310", "022-2674 3310"),
    ("PHONE", "call me on 3128472290", "3128472290"),
    ("PHONE", "Telefax:    (619) 438-9107", "(619) 438-9107"),
    # every card length an issuer gives out, Luhn-checked
    ("CREDIT_CARD", "JCB 180012345678905 ok", "180012345678905"),
    ("CREDIT_CARD", "JCB 2131 0000 0000 001", "2131 0000 0000 001"),
    ("CREDIT_CARD", "Visa 4222 222 222 222", "4222 222 222 222"),
    ("CREDIT_CARD", "Diners 3056 930902 5904", "3056 930902 5904"),
    ("CREDIT_CARD", "Maestro card 6759 000 000 005", "6759 000 000 005"),
    ("CREDIT_CARD", "Maestro card 675912345674", "675912345674"),
    ("CREDIT_CARD", "Maestro 6759 4111 0000 0008", "6759 4111 0000 0008"),
    ("CREDIT_CARD", "UnionPay 6212 3456 7890 12347", "6212 3456 7890 12347"),
    ("CREDIT_CARD", "Visa 4111 1111 1111 1111 003", "4111 1111 1111 1111 003"),
    # IBANs in any case
    ("IBAN", "pay gb82west12345698765432 now", "gb82west12345698765432"),
    ("IBAN", "pay de89 3704 0044 0532 0130 00 thanks", "de89 3704 0044 0532 0130 00"),
    # URLs and domain names
    ("URL", "see https://docs.example.com/x?a=1.", "https://docs.example.com/x?a=1"),
    ("URL", "open www.baeckerei-huber.de, then", "www.baeckerei-huber.de"),
    ("URL", "mail us via acme-dental.co.uk/contact today", "acme-dental.co.uk/contact"),
    ("URL", "portal kaveri-soft.co.in", "kaveri-soft.co.in"),
    ("URL", "sites like “www.freecycle.org” help", "www.freecycle.org"),
    # driver-licence and passport numbers after their context words
    ("DRIVER_LICENSE", "driver's license number D4827719", "D4827719"),
    ("DRIVER_LICENSE", "DL# 38204417 on file", "38204417"),
    ("DRIVER_LICENSE", "Driver License: S530-4128-0935.", "S530-4128-0935"),
    ("DRIVER_LICENSE", "drivers license no. B482-771-93-442-1", "B482-771-93-442-1"),
    ("DRIVER_LICENSE", "driving licence number HARRI704153J99KT", "HARRI704153J99KT"),
    ("PASSPORT", "passport number: 533380006.", "533380006"),
    ("PASSPORT", "Passport no. C4J7K0R29 issued", "C4J7K0R29"),
    ("PASSPORT", "my passport is 18FK44302", "18FK44302"),
    ("PASSPORT", "Passport #J8369854", "J8369854"),
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
    # ordinary numbers that phonenumbers accepts as valid somewhere: order/invoice numbers, dates, ids
    "order 2021-690290 shipped", "invoice 4159647593 paid", "ref 2123456789", "on 05.03.2024", "(05.05.2023)",
    "Order #2125550123", "tracking 1Z999AA10123456784", "ISBN 978-3-16-148410-0", "zip 94103", "PLZ 10115 Berlin",
    "3 x 250 g for 12,50 €", "batch B123456-12", "loyalty id 48213390211", "hours 9:00–17:30",
    # cards: a Luhn-valid 12-digit Maestro-shaped number without a card word; a 1800 number failing Luhn
    "reference 675912345674", "JCB 180012345678906",
    # versions are not IPs, file names and code are not domains
    "release 6.0.55.4 is out", "upgrade to 10.2.3.4", "setup.py and README.md", "x = tensor.to(device)",
    "the end.It was", "http://localhost:8000/x", "e.g. this", "Node.js and Vue.js",
    # licence and passport look-alikes: no context word, or no number after it
    "D4827719", "533380006", "passport photos cost 15", "the passport is valid until 2030", "DL 2024 report",
    "license plate 7ABC123",
    # patent and trademark tables, outline numbers (seen in contracts)
    "EP Granted 8007063.4 22-Nov-04 1944158 5-Jan-11 GB", "Registered 86919986 25-Feb-16 5123456",
    "WO Published PCT/US2017/055068 5-Oct-17 US", "US Pending 62/611953 29-Mar-18",
    "as set forth in Sections 5.4.1.1 (Letter of Credit)", "following:\n   3.11.2.2. Foreign Boycotts",
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
    regions = ["US", "GB", "DE", "FR", "IN"]
    assert step.config() == {"style": "hash", "types": ["EMAIL"], "salt": salt_fingerprint("pepper"), "ner": False,
                             "phone_regions": regions, "rules": RULES_VERSION}
    assert salt_fingerprint("pepper").startswith("sha256:") and "pepper" not in salt_fingerprint("pepper")
    assert salt_fingerprint("pepper2") != salt_fingerprint("pepper")  # another salt, another dataset id
    assert PIIStep().config() == {"style": "mask", "types": None, "salt": False, "ner": False,
                                  "phone_regions": regions, "rules": RULES_VERSION}


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
    with pytest.raises(ConfigError, match="phone_regions.*XX"):
        PIIStep(phone_regions=["US", "XX"])
    with pytest.raises(ConfigError, match="types: must be a list"):
        PIIStep(types=[1, 2])
    assert PIIStep(types="email").types == ["EMAIL"]


def test_url_without_password_is_url_not_credentials():
    for text in ("https://example.com/a:b", "see https://docs.example.com/x?a=1"):
        assert [f.type for f in detect(text)] == ["URL"]
    text = "ftp://admin:s3cr3t@db.example.com/path"
    assert [f.type for f in detect(text)] == ["URL_CREDENTIALS"]


def test_phone_regions_decide_national_formats():
    text = "Praxis 030 28394756"  # a Berlin number written the German way
    assert found(text, "PHONE") == ["030 28394756"]
    assert detect(text, phone_regions=["US"]) == []
    assert found("call +49 30 28394756", "PHONE") == ["+49 30 28394756"]  # +CC: whatever the regions
    assert [f.type for f in detect("call +49 30 28394756", phone_regions=["US"])] == ["PHONE"]
    assert PIIStep(phone_regions=["de"]).phone_regions == ("DE",)


def test_card_issuers():
    assert card_issuer_ok("180012345678905") and card_issuer_ok("213100000000001")
    assert luhn_ok("180012345678905") and not card_issuer_ok("1800123456789057")  # 1800 issues 15 digits only
    assert card_issuer_ok("675900000005") and not card_issuer_ok("411111111111")  # 12: Maestro only
    for n in range(12, 20):
        assert any(card_issuer_ok(p + "0" * (n - len(p))) for p in ("4", "6759", "62", "36", "34", "51", "3528"))


def test_values_never_leak_into_logs():
    values = ["jane@example.com", "+1 415 555 2671", "4111 1111 1111 1111", "GB82WEST12345698765432",
              "123-45-6789", "192.168.1.20", "ftp://admin:s3cr3t@db.example.com", "AKIAIOSFODNN7EXAMPLE",
              "https://jane-doe-portfolio.com/cv", "D4827719", "533380006"]
    text = " ; ".join(values[:-2] + ["driver's license D4827719", "passport no 533380006"])
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


def test_ner_without_spacy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "spacy", None)  # as if the extra were not installed
    with pytest.raises(MissingExtra, match=r"pip install 'tunelab\[pii\]'"):
        PIIStep(ner=True)


@pytest.mark.skipif(importlib.util.find_spec("spacy") is None, reason="spaCy (extra pii) is not installed")
def test_ner_with_a_pipeline_that_is_not_installed_says_how_to_install():
    with pytest.raises(MissingExtra, match=r"en_core_web_nonexistent.*pip install 'tunelab\[pii\]'"):
        PIIStep(ner=True, ner_model="en_core_web_nonexistent")
