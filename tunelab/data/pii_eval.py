"""A labelled PII set the project makes itself, and the scorer that measures a detector on it.

``make_set(n, seed)`` writes ``n`` short texts (support tickets, CRM notes, chat messages, forms,
shipping notices) from templates in five locales (US, UK, DE, FR, IN), each with its own
phone numbering plans and ways of writing them, names, cities, street-address order, postcodes,
IBAN countries and identity documents. Every PII value is generated (random digits under the
real format rules, checksums computed: Luhn for cards, mod-97 for IBANs) and its gold span
recorded as it is placed. Texts also carry look-alikes that are not PII (order and invoice
numbers, dates, prices, version strings, times, postcodes, quantities, ISBNs), so precision is
measured too. The same seed gives the same set.

``score(examples, detect)`` compares the findings of ``detect(text)`` with the gold spans: a
gold value is *found* when findings of its type cover every letter and digit of it (a redaction
that leaves part of a number behind is a miss); a finding is *correct* when it overlaps a gold
value of its type. ``bench/pii_recall.py`` prints the table; a unit test holds the bounds.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

STRUCTURED = ("EMAIL", "PHONE", "CREDIT_CARD", "IBAN", "SSN", "IP_ADDRESS", "URL", "DRIVER_LICENSE", "PASSPORT")
NER = ("PERSON", "LOCATION", "ORG", "ADDRESS")
LOCALES = ("US", "UK", "DE", "FR", "IN")
# A gold value of the key's type is found by findings of these types (street addresses by LOCATION).
FOUND_BY = {"ADDRESS": ("LOCATION",)}


@dataclass
class Example:
    text: str
    locale: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # (type, start, end)


# --------------------------------------------------------------------------- values

def luhn_digit(body: str) -> str:
    """The check digit that makes ``body + digit`` pass Luhn."""
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def _d(r: random.Random, n: int, first: str = "0123456789") -> str:
    return r.choice(first) + "".join(r.choice("0123456789") for _ in range(n - 1)) if n else ""


def _group(s: str, sizes: Iterable[int], sep: str) -> str:
    out, i = [], 0
    for n in sizes:
        out.append(s[i:i + n])
        i += n
    if i < len(s):
        out.append(s[i:])
    return sep.join(p for p in out if p)


def _phone(r: random.Random, loc: str) -> str:
    sep = r.choice
    if loc == "US":
        a = r.choice(["201", "202", "206", "212", "213", "305", "312", "404", "415", "512", "602", "617", "646",
                      "702", "713", "718", "773", "801", "917", "919"])
        e = _d(r, 3, "23456789")
        while e[1:] == "11" or e == "555":
            e = _d(r, 3, "23456789")
        n = _d(r, 4)
        return sep([f"({a}) {e}-{n}", f"{a}-{e}-{n}", f"{a}.{e}.{n}", f"{a} {e} {n}", f"+1 {a} {e} {n}",
                    f"+1-{a}-{e}-{n}", f"1-{a}-{e}-{n}", f"+1 ({a}) {e}-{n}", f"{a}{e}{n}"])
    if loc == "UK":
        kind = r.random()
        if kind < 0.35:  # London
            s = r.choice("378") + _d(r, 7)
            return sep([f"020 {s[:4]} {s[4:]}", f"(020) {s[:4]} {s[4:]}", f"+44 20 {s[:4]} {s[4:]}",
                        f"+44 (0)20 {s[:4]} {s[4:]}", f"020{s}"])
        if kind < 0.6:  # other geographic: 01xx1 area codes with 7-digit numbers
            a = r.choice(["0113", "0114", "0115", "0116", "0117", "0118", "0121", "0131", "0141", "0151", "0161"])
            s = _d(r, 7, "2345678")
            return sep([f"{a} {s[:3]} {s[3:]}", f"({a}) {s[:3]} {s[3:]}", f"+44 {a[1:]} {s[:3]} {s[3:]}",
                        f"{a}-{s[:3]}-{s[3:]}"])
        m = "7" + r.choice(["4", "5", "7", "8", "9"]) + _d(r, 8)
        while m.startswith("77009"):
            m = "7" + r.choice(["4", "5", "8", "9"]) + _d(r, 8)
        return sep([f"0{m[:4]} {m[4:]}", f"0{m[:4]} {m[4:7]} {m[7:]}", f"+44 {m[:4]} {m[4:]}",
                    f"+44 (0){m[:4]} {m[4:]}", f"+447{m[1:]}"])
    if loc == "DE":
        if r.random() < 0.5:
            a, n = r.choice([("30", 8), ("40", 8), ("89", 8), ("69", 8), ("221", 7), ("211", 7), ("711", 7),
                             ("351", 7), ("511", 7)])
            s = _d(r, n, "23456789")
            return sep([f"0{a} {s}", f"0{a}/{s}", f"(0{a}) {s}", f"0{a} {s[:3]} {s[3:]}", f"0{a}-{s}",
                        f"+49 {a} {s}", f"+49 (0){a} {s}", f"+49-{a}-{s}"])
        p, n = r.choice([("151", 8), ("152", 8), ("157", 8), ("160", 7), ("170", 7), ("171", 7), ("172", 7),
                         ("175", 7), ("176", 8), ("177", 8), ("179", 7)])
        s = _d(r, n)
        return sep([f"0{p} {s}", f"0{p}/{s}", f"0{p}-{s}", f"0{p} {s[:4]} {s[4:]}", f"+49 {p} {s}",
                    f"+49 (0){p} {s}", f"+49{p}{s}"])
    if loc == "FR":
        first = r.choice(["1", "2", "3", "4", "5", "6", "6", "7"])
        s = first + (_d(r, 8, "3456789") if first == "7" else _d(r, 8, "123456789"))
        pairs = " ".join(s[i:i + 2] for i in range(1, 9, 2))
        return sep([f"0{s[0]} {pairs}", f"0{s[0]}.{pairs.replace(' ', '.')}", f"0{s[0]}-{pairs.replace(' ', '-')}",
                    f"+33 {s[0]} {pairs}", f"+33 (0){s[0]} {pairs}", f"+33{s}", f"0{s}"])
    # IN
    if r.random() < 0.7:
        m = r.choice(["98", "99", "97", "96", "94", "93", "91", "90", "89", "88", "87", "86", "85", "84", "83", "82",
                      "81", "80", "79", "78", "77", "76", "75", "74", "73", "70", "63", "62"]) + _d(r, 8)
        return sep([f"{m[:5]} {m[5:]}", f"+91 {m[:5]} {m[5:]}", f"+91-{m}", f"+91 {m}", f"0{m[:5]} {m[5:]}",
                    f"{m[:5]}-{m[5:]}", f"{m}"])
    a, n = r.choice([("22", 8), ("11", 8), ("80", 8), ("44", 8), ("33", 8), ("40", 8), ("20", 8), ("79", 8)])
    s = "2" + _d(r, n - 1)
    return sep([f"0{a} {s[:4]} {s[4:]}", f"0{a}-{s}", f"0{a}-{s[:4]}-{s[4:]}", f"+91 {a} {s[:4]} {s[4:]}",
                f"+91-{a}-{s}", f"(0{a}) {s}"])


_CARD_BRANDS = [  # (name, prefix choices, lengths, grouping)
    ("Visa", ["4"], [16, 16, 16, 13, 19], None),
    ("Mastercard", ["51", "52", "53", "54", "55"], [16], None),
    ("Mastercard", [str(p) for p in range(2221, 2721, 37)], [16], None),
    ("American Express", ["34", "37"], [15], (4, 6, 5)),
    ("Discover", ["6011", "65"], [16, 19], None),
    ("JCB", ["3528", "3530", "3566", "3589"], [16, 19], None),
    ("JCB", ["1800", "2131"], [15], (4, 4, 4, 3)),
    ("Diners Club", ["36", "38", "300", "305"], [14], (4, 6, 4)),
    ("Maestro", ["6759", "6761", "5018", "5020", "6304"], [12, 13, 16, 18, 19], None),
    ("UnionPay", ["62"], [16, 17, 18, 19], None),
    ("RuPay", ["60", "6521"], [16], None),
]


def _card(r: random.Random) -> tuple[str, str]:
    name, prefixes, lengths, grouping = r.choice(_CARD_BRANDS)
    p, n = r.choice(prefixes), r.choice(lengths)
    body = p + _d(r, n - len(p) - 1)
    num = body + luhn_digit(body)
    sizes = grouping or {12: (4, 4, 4), 13: (4, 3, 3, 3), 17: (4, 4, 4, 5), 18: (4, 4, 4, 4, 2),
                         19: (4, 4, 4, 4, 3)}.get(n, (4, 4, 4, 4))
    fmt = r.random()
    if fmt < 0.45:
        return name, _group(num, sizes, " ")
    if fmt < 0.7:
        return name, _group(num, sizes, "-")
    return name, num


_BBAN = {  # country: (length of the BBAN, how to make it)
    "DE": lambda r: _d(r, 8) + _d(r, 10),
    "GB": lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + _d(r, 6) + _d(r, 8),
    "FR": lambda r: _d(r, 5) + _d(r, 5) + "".join(r.choice("0123456789ABCDEFGHJK") for _ in range(11)) + _d(r, 2),
    "NL": lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + _d(r, 10),
    "ES": lambda r: _d(r, 20),
    "IE": lambda r: "".join(r.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4)) + _d(r, 14),
}


def _iban(r: random.Random, country: str) -> str:
    bban = _BBAN[country](r)
    num = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    iban = f"{country}{98 - num % 97:02d}{bban}"
    fmt = r.random()
    if fmt < 0.45:
        out = _group(iban, (4,) * 9, " ")
    elif fmt < 0.75:
        out = iban
    elif fmt < 0.9:
        out = iban.lower()
    else:
        out = _group(iban.lower(), (4,) * 9, " ")
    return out


def _ssn(r: random.Random) -> str:
    area = r.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{r.randint(1, 99):02d}-{r.randint(1, 9999):04d}"


def _ip(r: random.Random) -> str:
    if r.random() < 0.8:
        return ".".join(str(x) for x in (r.choice([23, 45, 62, 81, 91, 103, 145, 172, 185, 203, 212]),
                                          r.randint(0, 255), r.randint(0, 255), r.randint(1, 254)))
    return "2001:" + ":".join(f"{r.randint(1, 0xffff):x}" for _ in range(3)) + "::" + f"{r.randint(1, 0xffff):x}"


_DL_FORMATS = {
    "US": [lambda r: r.choice("ABCDEFGHJKLMNPRSTVWY") + _d(r, 7),                                  # CA
           lambda r: _d(r, 8, "123456789"),                                                         # TX, PA
           lambda r: (lambda s: f"{s[:3]} {s[3:6]} {s[6:]}")(_d(r, 9, "123456789")),               # NY
           lambda r: _d(r, 9, "123456789"),                                                         # NY
           lambda r: (lambda s: f"{r.choice('ABCDFGHMSW')}{s[:3]}-{s[3:6]}-{s[6:8]}-{s[8:11]}-{s[11]}")(_d(r, 12)),  # FL
           lambda r: (lambda s: f"{r.choice('ABCDFGHMSW')}{s[:3]}-{s[3:7]}-{s[7:]}")(_d(r, 11)),   # IL
           lambda r: r.choice("ABCDFGHMSW") + _d(r, 12),                                           # FL, MI compact
           lambda r: "WDL" + "".join(r.choice("ABCDEFGHJKLMNPRSTVWXYZ0123456789") for _ in range(9))],  # WA
    "UK": [lambda r: ("".join(r.choice("ABCDEFGHIJKLMNOPRSTW") for _ in range(5)) + _d(r, 6)
                      + "".join(r.choice("ABCDEFGHJKLMNPRSTW23456789") for _ in range(5)))],
}
_PASSPORT_FORMATS = {
    "US": [lambda r: _d(r, 9, "12345"), lambda r: r.choice("ACEFGHJKMNPRSTVWXZ") + _d(r, 8)],
    "UK": [lambda r: _d(r, 9, "1235")],
    "DE": [lambda r: r.choice("CFGHJK") + "".join(r.choice("CFGHJKLMNPRTVWXYZ0123456789") for _ in range(3))
           + _d(r, 5)],
    "FR": [lambda r: _d(r, 2) + "".join(r.choice("ABCDEFGHJKLMNPRSTUVWXYZ") for _ in range(2)) + _d(r, 5)],
    "IN": [lambda r: r.choice("ABCDEFGHJKLMNPRSTUVWZ") + _d(r, 7, "123456789")],
}


# --------------------------------------------------------------------------- locales

_L = {
    "US": dict(
        first=["James", "Maria", "Robert", "Jennifer", "Michael", "Linda", "David", "Patricia", "Daniel", "Ashley",
               "Kevin", "Brittany", "Tyrone", "Latoya", "Carlos", "Megan", "Brandon", "Heather", "Andrew", "Nicole"],
        last=["Johnson", "Williams", "Garcia", "Miller", "Davis", "Rodriguez", "Martinez", "Anderson", "Thompson",
              "Jackson", "White", "Harris", "Clark", "Lewis", "Walker", "Hernandez", "Young", "Allen", "Wright", "Scott"],
        cities=[("Chicago", "IL", "606"), ("Houston", "TX", "770"), ("Phoenix", "AZ", "850"), ("Seattle", "WA", "981"),
                ("Denver", "CO", "802"), ("Boston", "MA", "021"), ("Atlanta", "GA", "303"), ("Portland", "OR", "972"),
                ("Austin", "TX", "787"), ("Miami", "FL", "331")],
        streets=["Maple Avenue", "Oak Street", "Washington Boulevard", "Lincoln Road", "Cedar Lane", "Elm Drive",
                 "Park Avenue", "Sunset Boulevard", "Pine Street", "Madison Avenue"],
        orgs=["Brightline Logistics Inc.", "Summit Health Partners", "Redwood Financial Group", "Apex Roofing LLC",
              "Northwind Insurance", "Blue Harbor Dental", "Granite State Bank", "Evergreen Realty"],
        tlds=["com", "com", "net", "org", "us"], iban=["DE", "GB", "FR"], country="United States"),
    "UK": dict(
        first=["Oliver", "Amelia", "Harry", "Isla", "George", "Olivia", "Jack", "Emily", "Charlotte", "Thomas",
               "Sophie", "William", "Grace", "Callum", "Niamh", "Rhys", "Eleanor", "Alfie", "Freya", "Mohammed"],
        last=["Smith", "Jones", "Taylor", "Brown", "Wilson", "Evans", "Thomas", "Roberts", "Walker", "Wright",
              "Hughes", "Edwards", "Green", "Hall", "Wood", "Harrison", "Patel", "Khan", "Murphy", "Campbell"],
        cities=[("Manchester", "M4", ""), ("Leeds", "LS1", ""), ("Bristol", "BS1", ""), ("Glasgow", "G2", ""),
                ("Birmingham", "B3", ""), ("Edinburgh", "EH1", ""), ("Cardiff", "CF10", ""), ("Liverpool", "L1", ""),
                ("Nottingham", "NG1", ""), ("Sheffield", "S1", "")],
        streets=["High Street", "Station Road", "Church Lane", "Victoria Road", "Mill Lane", "Queens Road",
                 "Kings Avenue", "Park Road", "London Road", "Albert Street"],
        orgs=["Hargreaves Plumbing Ltd", "Thames Valley Builders", "Crown Lettings Ltd", "Pennine Accountancy",
              "Brightwater Energy plc", "Oakham Dental Practice", "Northgate Solicitors", "Severn Logistics Ltd"],
        tlds=["co.uk", "co.uk", "org.uk", "com", "uk"], iban=["GB", "IE"], country="United Kingdom"),
    "DE": dict(
        first=["Lukas", "Anna", "Jonas", "Lea", "Felix", "Sophie", "Maximilian", "Marie", "Paul", "Hannah",
               "Jürgen", "Ursula", "Tobias", "Katharina", "Stefan", "Sabine", "Florian", "Julia", "Matthias", "Petra"],
        last=["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker", "Schulz",
              "Hoffmann", "Koch", "Richter", "Klein", "Wolf", "Schröder", "Neumann", "Schwarz", "Zimmermann",
              "Braun", "Krüger"],
        cities=[("Berlin", "10115", ""), ("Hamburg", "20095", ""), ("München", "80331", ""), ("Köln", "50667", ""),
                ("Frankfurt am Main", "60311", ""), ("Stuttgart", "70173", ""), ("Düsseldorf", "40213", ""),
                ("Leipzig", "04109", ""), ("Dresden", "01067", ""), ("Hannover", "30159", "")],
        streets=["Hauptstraße", "Bahnhofstraße", "Gartenstraße", "Schillerstraße", "Goethestraße", "Lindenweg",
                 "Bergstraße", "Kirchplatz", "Friedrichstraße", "Am Markt"],
        orgs=["Müller Logistik GmbH", "Schneider Bau AG", "Rheinland Versicherung", "Becker & Söhne KG",
              "Nordlicht Software GmbH", "Stadtwerke Leipzig", "Alpen Reisen GmbH", "Hansa Immobilien"],
        tlds=["de", "de", "de", "com", "eu"], iban=["DE", "DE", "NL"], country="Germany"),
    "FR": dict(
        first=["Camille", "Louis", "Léa", "Hugo", "Chloé", "Jules", "Manon", "Lucas", "Inès", "Théo",
               "Élodie", "Mathieu", "Céline", "Nicolas", "Aurélie", "Julien", "Margaux", "Antoine", "Sophie", "Rémi"],
        last=["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau",
              "Simon", "Laurent", "Lefèvre", "Michel", "Garnier", "Faure", "Rousseau", "Blanc", "Guérin", "Fournier"],
        cities=[("Paris", "75011", ""), ("Lyon", "69002", ""), ("Marseille", "13001", ""), ("Toulouse", "31000", ""),
                ("Nantes", "44000", ""), ("Bordeaux", "33000", ""), ("Lille", "59000", ""), ("Strasbourg", "67000", ""),
                ("Montpellier", "34000", ""), ("Rennes", "35000", "")],
        streets=["rue de la République", "avenue Victor Hugo", "boulevard Voltaire", "rue du Moulin",
                 "place de la Mairie", "rue Pasteur", "avenue Jean Jaurès", "rue des Lilas", "chemin des Vignes",
                 "rue Nationale"],
        orgs=["Boulangerie Dupont SARL", "Transports Moreau", "Cabinet Lefèvre Avocats", "Garnier Immobilier",
              "Société Générale des Eaux", "Atelier Rousseau", "Mutuelle du Rhône", "Fournier Électricité SAS"],
        tlds=["fr", "fr", "fr", "com", "eu"], iban=["FR", "FR", "ES"], country="France"),
    "IN": dict(
        first=["Priya", "Rahul", "Ananya", "Arjun", "Sneha", "Vikram", "Kavya", "Rohan", "Aishwarya", "Karthik",
               "Deepika", "Sanjay", "Meera", "Aditya", "Lakshmi", "Suresh", "Pooja", "Nikhil", "Divya", "Harpreet"],
        last=["Sharma", "Patel", "Iyer", "Reddy", "Nair", "Gupta", "Singh", "Mehta", "Rao", "Banerjee",
              "Chatterjee", "Kulkarni", "Menon", "Joshi", "Pillai", "Verma", "Desai", "Agarwal", "Bhat", "Kapoor"],
        cities=[("Mumbai", "400001", ""), ("Bengaluru", "560001", ""), ("Chennai", "600002", ""),
                ("Hyderabad", "500001", ""), ("Pune", "411001", ""), ("Kolkata", "700001", ""),
                ("New Delhi", "110001", ""), ("Ahmedabad", "380001", ""), ("Jaipur", "302001", ""),
                ("Kochi", "682001", "")],
        streets=["MG Road", "Brigade Road", "Linking Road", "Anna Salai", "Park Street", "FC Road", "Residency Road",
                 "Nehru Nagar", "Gandhi Marg", "Church Street"],
        orgs=["Sharma Textiles Pvt Ltd", "Sunrise Diagnostics", "Kaveri Software Solutions", "Reddy Constructions",
              "Ganga Motors Pvt Ltd", "Lotus Pharma", "Deccan Travels", "Malabar Spices Ltd"],
        tlds=["co.in", "in", "com", "com", "org.in"], iban=["GB", "DE"], country="India"),
}
_L["IN"]["tlds"] = ["co.in", "co.in", "com", "com", "org.in"]


def _address(r: random.Random, loc: str, city: tuple) -> tuple[str, str, str, str]:
    """(street part, postcode, city, the whole line) in the locale's order."""
    street = r.choice(_L[loc]["streets"])
    name, code, zip3 = city
    if loc == "US":
        st = f"{r.randint(10, 9899)} {street}"
        return st, f"{city[1]} {zip3}{r.randint(0, 99):02d}", name, ""
    if loc == "UK":
        st = f"{r.randint(1, 240)} {street}"
        pc = f"{code} {r.randint(1, 9)}{r.choice('ABDEFGHJLNPQRSTUWXYZ')}{r.choice('ABDEFGHJLNPQRSTUWXYZ')}"
        return st, pc, name, ""
    if loc == "DE":
        return f"{street} {r.randint(1, 180)}", code, name, ""
    if loc == "FR":
        return f"{r.randint(1, 120)} {street}", code, name, ""
    return f"{r.randint(1, 400)}, {street}", code, name, ""


# --------------------------------------------------------------------------- templates

# {SLOT} is a labelled value; {-slot} is a look-alike that is not PII (unlabelled).
TEMPLATES = [
    "Hi, this is {PERSON}. My order {-order} arrived damaged on {-date}. You can call me on {PHONE} or "
    "write to {EMAIL}.",
    "Customer {PERSON} ({EMAIL}) asked to update the card on file to {CARD} and confirmed the billing "
    "address {ADDRESS}, {CITY}.",
    "Please refund {-price} to IBAN {IBAN} (account holder: {PERSON}). Reference {-invoice}.",
    "Tel: {PHONE}\nName: {PERSON}\nCompany: {ORG}\nAddress: {ADDRESS}, {POSTCITY}",
    "{PERSON} from {ORG} called from {PHONE} about ticket #{-ticket}; follow up before {-time}.",
    "Login alert: new sign-in to the account of {PERSON} from IP {IP} at {-time} on {-date}.",
    "Reminder for {PERSON}: your appointment in {CITY} is on {-date} at {-time}. Questions? Phone {PHONE}.",
    "I paid with my {BRAND} card {CARD} but was charged {-price} twice for order {-order}.",
    "Verification: driver's license number {DL}, date of birth {-date}, name {PERSON}.",
    "For the visa application I attached my passport (passport number {PASSPORT}) and a utility bill from {ORG}.",
    "Ship to {PERSON}, {ADDRESS}, {POSTCITY}, {COUNTRY}. Contents: {-qty}. Tracking {-tracking}.",
    "Our new website is live at {URL} – release {-version} fixes the checkout bug reported by {PERSON}.",
    "Wire the deposit of {-price} to {ORG}, IBAN {IBAN}, no later than {-date}.",
    "Contact: {PERSON} <{EMAIL}>, mobile {PHONE}, office in {CITY}.",
    "SSN on the form reads {SSN}; the W-2 from {ORG} shows {-price} for {-year}.",
    "The server at {IP} returned 502 after the upgrade to v{-version}; see {URL} for the logs.",
    "Hello {PERSON}, thanks for reaching out. Your case {-case} has been escalated; we will ring you on {PHONE}.",
    "DL# {DL} was scanned at the front desk of {ORG} in {CITY} on {-date}.",
    "Passport no. {PASSPORT}, issued in {CITY}; holder {PERSON}.",
    "Send the invoice {-invoice} ({-price}) to accounts@{DOMAINONLY} and copy {EMAIL}.",
    "Account {-acct} was closed on {-date}; the remaining balance of {-price} goes to {IBAN}.",
    "{PERSON} wrote: \"my number changed, it's {PHONE} now, and my email is {EMAIL}\".",
    "Update billing: card ending in {-last4}, new card {CARD}, expiry {-expiry}.",
    "Visit us at {ADDRESS}, {POSTCITY} or online at {URL}. Opening hours {-hours}.",
    "Batch {-batch} of {-qty} shipped on {-date}; ISBN {-isbn}; price {-price}.",
    "Meeting notes ({-date}): {PERSON} and {PERSON} from {ORG} agreed on {-price} per unit, {-qty} per month.",
    "Driver License: {DL}. Vehicle registered at {ADDRESS}, {CITY}.",
    "Please call {PHONE} to confirm. Fax: {PHONE}. Order {-order} total {-price}.",
    "We detected logins for {EMAIL} from {IP} and {IP}; password reset link sent via {URL}.",
    "Gift card balance {-price}; loyalty id {-loyalty}; member since {-year}; branch {CITY}.",
]


def _lookalike(r: random.Random, kind: str, loc: str) -> str:
    euro = loc in ("DE", "FR")
    if kind == "order":
        return r.choice([f"{_d(r, 7, '123456789')}", f"#{_d(r, 6, '123456789')}", f"ORD-{_d(r, 8)}",
                         f"{r.randint(2019, 2026)}-{_d(r, 6)}", f"{_d(r, 3)}-{_d(r, 7)}-{_d(r, 7)}"])
    if kind == "date":
        y, m, d = r.randint(2019, 2026), r.randint(1, 12), r.randint(1, 28)
        return r.choice([f"{y}-{m:02d}-{d:02d}", f"{d:02d}.{m:02d}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}",
                         f"{d} March {y}", f"{d:02d}/{m:02d}/{y % 100:02d}"])
    if kind == "price":
        v = r.randint(5, 99999) / 100 * r.choice([1, 10, 100])
        return (f"{v:,.2f} €".replace(",", " ").replace(".", ",") if euro else
                r.choice(["$", "£", "₹", "USD "]) + f"{v:,.2f}")
    if kind == "invoice":
        return r.choice([f"INV-{r.randint(2019, 2026)}-{_d(r, 5)}", f"{_d(r, 10, '123456789')}", f"RE{_d(r, 8)}"])
    if kind == "ticket" or kind == "case":
        return _d(r, r.choice([5, 6, 8, 10]), "123456789")
    if kind == "time":
        return r.choice([f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}", f"{r.randint(1, 12)}:{r.randint(0, 59):02d} pm",
                         f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"])
    if kind == "version":
        return f"{r.randint(1, 12)}.{r.randint(0, 30)}.{r.randint(0, 99)}" + r.choice(["", ".4", "-rc1", "+build.7"])
    if kind == "qty":
        return r.choice([f"{r.randint(2, 500)} x {r.randint(50, 999)} g", f"{r.randint(1, 40)} boxes",
                         f"{r.randint(1000, 99999)} units"])
    if kind == "tracking":
        return r.choice([f"1Z{_d(r, 3)}AA{_d(r, 10)}", f"{_d(r, 12, '123456789')}", f"JJD{_d(r, 18)}",
                         f"RR{_d(r, 9)}GB"])
    if kind == "acct":
        return _d(r, 8)
    if kind == "last4":
        return _d(r, 4)
    if kind == "expiry":
        return f"{r.randint(1, 12):02d}/{r.randint(25, 32)}"
    if kind == "hours":
        return f"{r.randint(7, 10)}:00–{r.randint(17, 21)}:30"
    if kind == "batch":
        return f"B{_d(r, 6)}-{r.randint(1, 99)}"
    if kind == "isbn":
        return r.choice(["978-3-16-148410-0", "978-0-306-40615-7", "978-1-4028-9462-6", "979-10-90636-07-1"])
    if kind == "year":
        return str(r.randint(1998, 2026))
    if kind == "loyalty":
        return _d(r, 11, "123456789")
    raise KeyError(kind)


def _fill(r: random.Random, template: str, loc: str) -> Example:
    L = _L[loc]
    ex = Example("", loc)
    parts: list[str] = []
    pos = 0
    city = r.choice(L["cities"])
    company = r.choice(L["orgs"])
    slug = re.sub(r"[^a-z0-9]+", "-", company.lower().replace("ü", "ue").replace("ö", "oe").replace("ä", "ae")
                  .replace("é", "e").replace("è", "e").replace("ô", "o").replace("&", "und"))
    slug = re.sub(r"-(gmbh|ag|kg|ltd|inc|llc|plc|sarl|sas|pvt)\b", "", slug).strip("-")
    domain = f"{slug}.{r.choice(L['tlds'])}"

    def put(value: str, typ: str | None) -> None:
        nonlocal pos
        if typ:
            ex.spans.append((typ, pos, pos + len(value)))
        parts.append(value)
        pos += len(value)

    for lit, slot in re.findall(r"([^{]*)(?:\{([^}]*)\})?", template):
        if lit:
            put(lit, None)
        if not slot:
            continue
        if slot.startswith("-"):
            put(_lookalike(r, slot[1:], loc), None)
        elif slot == "PERSON":
            first, last = r.choice(L["first"]), r.choice(L["last"])
            put(r.choice([f"{first} {last}", f"{first} {last}", f"{first} {last}", f"{last}, {first}"]
                         if "Name:" in template else [f"{first} {last}"]), "PERSON")
        elif slot == "EMAIL":
            first, last = r.choice(L["first"]), r.choice(L["last"])
            local = r.choice([f"{first}.{last}", f"{first[0]}{last}", f"{first}{r.randint(1, 99)}", f"{last}.{first[0]}"])
            local = local.lower().translate(str.maketrans("äöüéèçôë", "aoueecoe")).replace("ß", "ss")
            put(f"{local}@{r.choice(['gmail.com', 'outlook.com', 'yahoo.com', domain])}", "EMAIL")
        elif slot == "PHONE":
            put(_phone(r, loc), "PHONE")
        elif slot == "BRAND":
            brand, number = _card(r)
            ex._card = number  # type: ignore[attr-defined]
            put(brand, None)
        elif slot == "CARD":
            number = getattr(ex, "_card", None) or _card(r)[1]
            put(number, "CREDIT_CARD")
        elif slot == "IBAN":
            put(_iban(r, r.choice(L["iban"])), "IBAN")
        elif slot == "SSN":
            put(_ssn(r), "SSN")
        elif slot == "IP":
            put(_ip(r), "IP_ADDRESS")
        elif slot == "URL":
            path = r.choice(["", "/", "/contact", f"/orders/{_d(r, 5)}", "/de/impressum", "/help?id=" + _d(r, 4),
                             "/careers/apply.html"])
            put(r.choice([f"https://www.{domain}{path}", f"https://{domain}{path}", f"www.{domain}{path}",
                          f"http://shop.{domain}{path}", f"{domain}"]), "URL")
        elif slot == "DOMAINONLY":
            put(domain, None)  # inside an e-mail address: relabelled below
        elif slot == "DL":
            put(r.choice(_DL_FORMATS["UK" if loc == "UK" else "US"])(r), "DRIVER_LICENSE")
        elif slot == "PASSPORT":
            put(r.choice(_PASSPORT_FORMATS[loc if loc in _PASSPORT_FORMATS else "US"])(r), "PASSPORT")
        elif slot == "ORG":
            put(company, "ORG")
        elif slot == "CITY":
            put(city[0], "LOCATION")
        elif slot == "COUNTRY":
            put(L["country"], "LOCATION")
        elif slot == "ADDRESS":
            st, *_ = _address(r, loc, city)
            put(st, "ADDRESS")
        elif slot == "POSTCITY":
            _, pc, name, _ = _address(r, loc, city)
            if loc == "US":
                put(name, "LOCATION")
                put(", ", None)
                put(pc, None)
            elif loc == "UK":
                put(name, "LOCATION")
                put(" ", None)
                put(pc, None)
            else:
                put(pc + " ", None)
                put(name, "LOCATION")
        else:
            raise KeyError(slot)
    ex.text = "".join(parts)
    # "accounts@domain" is an e-mail address as a whole
    for m in re.finditer(r"accounts@\S+?(?=\)|\s|$| and)", ex.text):
        ex.spans.append(("EMAIL", m.start(), m.end()))
    return ex


def make_set(n: int = 1500, seed: int = 0) -> list[Example]:
    """``n`` labelled texts, spread evenly over the locales and templates; the same seed, the same set."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        loc = LOCALES[i % len(LOCALES)]
        template = r.choice(TEMPLATES)
        if loc != "US" and "SSN" in template:
            template = r.choice([t for t in TEMPLATES if "SSN" not in t])
        out.append(_fill(r, template, loc))
    return out


# --------------------------------------------------------------------------- scoring

@dataclass
class Scores:
    gold: dict[str, int]
    found: dict[str, int]
    predicted: dict[str, int]
    correct: dict[str, int]
    by_locale: dict[str, tuple[int, int]]  # structured (found, gold) per locale
    missed: dict[str, list[str]]           # a few missed values per type (only for the developer's eyes)

    def recall(self, types: Iterable[str]) -> float:
        g = sum(self.gold.get(t, 0) for t in types)
        return sum(self.found.get(t, 0) for t in types) / g if g else float("nan")

    def precision(self, types: Iterable[str]) -> float:
        p = sum(self.predicted.get(t, 0) for t in types)
        return sum(self.correct.get(t, 0) for t in types) / p if p else 1.0


def score(examples: list[Example], detect: Callable[[str], list], types: Iterable[str] = STRUCTURED + NER,
          keep_missed: int = 0) -> Scores:
    """Recall by gold type and precision by predicted type; ``detect(text)`` returns objects with
    ``type``, ``start``, ``end`` (``tunelab.data.steps.pii.Finding``)."""
    types = tuple(types)
    gold: dict[str, int] = defaultdict(int)
    found: dict[str, int] = defaultdict(int)
    predicted: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    locale: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    missed: dict[str, list[str]] = defaultdict(list)
    for ex in examples:
        findings = [f for f in detect(ex.text)]
        for typ, s, e in ex.spans:
            if typ not in types:
                continue
            ok_types = FOUND_BY.get(typ, (typ,))
            covered = [False] * (e - s)
            for f in findings:
                if f.type in ok_types:
                    for k in range(max(s, f.start), min(e, f.end)):
                        covered[k - s] = True
            hit = all(c for c, ch in zip(covered, ex.text[s:e]) if ch.isalnum())
            gold[typ] += 1
            found[typ] += hit
            if typ in STRUCTURED:
                locale[ex.locale][0] += hit
                locale[ex.locale][1] += 1
            if not hit and len(missed[typ]) < keep_missed:
                missed[typ].append(ex.text[s:e])
        for f in findings:
            if f.type not in types:
                continue
            predicted[f.type] += 1
            ok = [t for t, fb in FOUND_BY.items() if f.type in fb] + [f.type]
            if any(t in ok and s < f.end and f.start < e for t, s, e in ex.spans):
                correct[f.type] += 1
            elif len(missed["FP:" + f.type]) < keep_missed:
                missed["FP:" + f.type].append(ex.text[f.start:f.end])
    return Scores(dict(gold), dict(found), dict(predicted), dict(correct),
                  {k: (v[0], v[1]) for k, v in locale.items()}, dict(missed))
