"""PII redaction benchmark: span precision and recall on planted PII and near misses; throughput.

    .venv/bin/python bench/pii_bench.py

Writes bench/pii_results.json and the `pii` section of bench/RESULTS.md (a few seconds).

Data (seed 0, no network): prose sentences from the pydoc topics and the standard library's
docstrings (`workloads.data.sample.base_documents`, sentences with no digits or code characters),
each carrying at most one planted item: a valid instance of a kind (Luhn-valid cards, IBANs with
computed check digits, phone numbers valid for their country, ...), or a near miss (bad Luhn, bad
IBAN checksum, version strings, out-of-range octets, dates, ISBNs, hashes, ...). A redaction is a
true positive when it covers a planted valid instance of its own kind; every other redaction is a
false positive. The unplanted stdlib text is also redacted whole, and what is found there listed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import platform
import random
import re
import string
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import phonenumbers
import psutil
from results_md import write_section  # bench/, beside this script

from workloads.data.filters.pii import PII_KINDS, PiiConfig, find_pii
from workloads.data.sample import base_documents

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
RESULTS_JSON = REPO / "bench" / "pii_results.json"
START, END = "<!-- pii:start -->", "<!-- pii:end -->"

ALNUM = string.ascii_letters + string.digits
FIRST = ["jane", "john", "maria", "wei", "olga", "ahmed", "sofia", "raj", "emma", "lucas", "fatima"]
LAST = ["doe", "smith", "garcia", "chen", "ivanova", "khan", "rossi", "patel", "muller", "okafor"]
TLDS = ["com", "org", "net", "io", "de", "fr", "co.uk", "edu", "com.au", "example"]
WORDS = [
    "river",
    "stone",
    "maple",
    "harbor",
    "copper",
    "lantern",
    "orbit",
    "meadow",
    "cedar",
    "falcon",
    "quartz",
    "willow",
]


@dataclass
class Item:
    """A planted string; `span` is the part a redactor should cover (None for near misses)."""

    text: str
    kind: str  # a PII kind, for valid instances and near misses alike
    category: str
    span: tuple[int, int] | None


def valid(kind: str, category: str, text: str, inner: str | None = None) -> Item:
    start = text.index(inner) if inner else 0
    return Item(text, kind, category, (start, start + len(inner or text)))


def near(kind: str, category: str, text: str) -> Item:
    return Item(text, kind, category, None)


def rand(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choices(alphabet, k=n))


def digits(rng: random.Random, n: int) -> str:
    return rand(rng, string.digits, n)


# --------------------------------------------------------------------------------------------
# Valid instances


def email(rng: random.Random) -> Item:
    first, last = rng.choice(FIRST), rng.choice(LAST)
    local = rng.choice(
        [
            f"{first}.{last}",
            f"{first}_{last}",
            f"{first[0]}{last}{rng.randint(1, 99)}",
            f"{first}+{rng.choice(WORDS)}",
            f"{last.capitalize()}.{first.capitalize()}",
        ]
    )
    domain = ".".join(rng.sample(WORDS, rng.choice([1, 1, 2]))) + "." + rng.choice(TLDS)
    address = f"{local}@{domain}"
    if rng.random() < 0.1:
        return valid("email", "mailto: link", f"mailto:{address}", address)
    return valid("email", "plain address", address)


def _us_number(rng: random.Random) -> tuple[str, str, str]:
    while True:
        area, exchange, line = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
        number = phonenumbers.parse(f"+1{area}{exchange}{line:04d}")
        if phonenumbers.is_valid_number(number):
            return str(area), str(exchange), f"{line:04d}"


US_FORMATS = [
    "({a}) {e}-{n}",
    "{a}-{e}-{n}",
    "{a}.{e}.{n}",
    "+1 {a} {e} {n}",
    "+1-{a}-{e}-{n}",
    "+1 ({a}) {e}-{n}",
    "1-{a}-{e}-{n}",
    "+1{a}{e}{n}",
]
PHONE_REGIONS = ["GB", "DE", "FR", "IN", "AU", "JP", "BR", "ES", "IT", "NL", "MX", "SG", "ZA", "CH"]


def phone(rng: random.Random) -> Item:
    if rng.random() < 0.5:
        a, e, n = _us_number(rng)
        fmt = rng.choice(US_FORMATS)
        number = fmt.format(a=a, e=e, n=n)
        category = "US " + fmt.format(a="AAA", e="EEE", n="NNNN")
        if rng.random() < 0.1:
            return valid(
                "phone", "US with extension", f"{number} ext. {rng.randint(1, 999)}", number
            )
        if rng.random() < 0.1:
            return valid(
                "phone", "US followed by a count", f"{number} {rng.randint(2, 24)} hours", number
            )
        return valid("phone", category, number)
    region = rng.choice(PHONE_REGIONS)
    kind = rng.choice(
        [phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE]
    )
    example = phonenumbers.example_number_for_type(region, kind)
    nsn = phonenumbers.national_significant_number(example)
    while True:  # the example's prefix, random subscriber digits
        number = phonenumbers.parse(f"+{example.country_code}{nsn[:-4]}{digits(rng, 4)}")
        if phonenumbers.is_valid_number(number):
            break
    style = rng.choice(
        [phonenumbers.PhoneNumberFormat.INTERNATIONAL] * 3 + [phonenumbers.PhoneNumberFormat.E164]
    )
    text = phonenumbers.format_number(number, style)
    if rng.random() < 0.1:
        return valid("phone", "tel: link", f"tel:{text.replace(' ', '-')}", text.replace(" ", "-"))
    e164 = style == phonenumbers.PhoneNumberFormat.E164
    return valid("phone", f"{'E.164' if e164 else 'international'}, 14 countries", text)


def ip_address(rng: random.Random) -> Item:
    roll = rng.random()
    if roll < 0.5:
        ip = ".".join(str(rng.randint(0, 255)) for _ in range(4))
        ip = f"{rng.randint(1, 223)}{ip[ip.index('.') :]}"
        suffix = rng.choice(["", "", f":{rng.randint(1, 65535)}", "/24"])
        return valid("ip_address", "IPv4", ip + suffix, ip)
    groups = [rng.choice([0, 0, rng.randint(1, 0xFFFF)]) for _ in range(8)]
    groups[-1] = rng.randint(1, 0xFFFF)
    if roll < 0.7:
        groups[:2] = [0x2001, 0xDB8]  # documentation prefix
    elif roll < 0.8:
        groups[:4] = [0xFE80, 0, 0, 0]  # link-local
    else:
        groups[0] = rng.randint(0x2000, 0x3FFF)  # global unicast
    address = ipaddress.IPv6Address(sum(g << (16 * (7 - i)) for i, g in enumerate(groups)))
    text = address.exploded if rng.random() < 0.2 else address.compressed
    return valid("ip_address", "IPv6", f"[{text}]:443" if rng.random() < 0.1 else text, text)


def luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    """`prefix` plus random digits plus the Luhn check digit, `length` digits in all."""
    body = prefix + digits(rng, length - len(prefix) - 1)
    total = 0
    for i, c in enumerate(reversed(body)):
        d = int(c) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str(-total % 10)


CARD_PREFIXES = {
    "visa": (["4"], [16, 16, 16, 13, 19]),
    "mastercard": ([str(p) for p in range(51, 56)] + ["2221", "2500", "2720"], [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", "644", "649", "65"], [16]),
}


def group_card(number: str, sep: str) -> str:
    if len(number) == 15:  # Amex: 4-6-5
        return sep.join((number[:4], number[4:10], number[10:]))
    return sep.join(number[i : i + 4] for i in range(0, len(number), 4))


def card_number(rng: random.Random) -> tuple[str, str]:
    """(brand, a Luhn-valid number of that brand, unbroken or grouped)."""
    brand = rng.choice(list(CARD_PREFIXES))
    prefixes, lengths = CARD_PREFIXES[brand]
    number = luhn_complete(rng.choice(prefixes), rng.choice(lengths), rng)
    sep = rng.choice(["", " ", "-"])
    return brand, group_card(number, sep) if sep else number


def credit_card(rng: random.Random) -> Item:
    brand, text = card_number(rng)
    if rng.random() < 0.15:
        return valid(
            "credit_card",
            f"{brand} with expiry",
            f"{text} {rng.randint(1, 12):02d}/{rng.randint(25, 32)}",
            text,
        )
    return valid("credit_card", brand, text)


# BBAN shapes: `n` digits, `a` upper-case letters, `c` either.
IBAN_SHAPES = {
    "DE": "n" * 18,
    "GB": "a" * 4 + "n" * 14,
    "FR": "n" * 10 + "c" * 11 + "nn",
    "ES": "n" * 20,
    "IT": "a" + "n" * 10 + "c" * 12,
    "NL": "a" * 4 + "n" * 10,
    "BE": "n" * 12,
    "CH": "n" * 5 + "c" * 12,
    "AT": "n" * 16,
    "PL": "n" * 24,
    "SE": "n" * 20,
    "NO": "n" * 11,
}


def iban_check_digits(country: str, bban: str) -> str:
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{98 - number % 97:02d}"


def random_iban(rng: random.Random) -> str:
    country = rng.choice(list(IBAN_SHAPES))
    alphabets = {
        "n": string.digits,
        "a": string.ascii_uppercase,
        "c": string.digits + string.ascii_uppercase,
    }
    bban = "".join(rng.choice(alphabets[c]) for c in IBAN_SHAPES[country])
    return country + iban_check_digits(country, bban) + bban


def group4(s: str) -> str:
    return " ".join(s[i : i + 4] for i in range(0, len(s), 4))


def iban(rng: random.Random) -> Item:
    code = random_iban(rng)
    return valid("iban", code[:2], group4(code) if rng.random() < 0.6 else code)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_block(rng: random.Random, label: str) -> str:
    body = base64.b64encode(rng.randbytes(rng.randint(300, 1200))).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN {label}-----\n{lines}\n-----END {label}-----"


def secret_value(rng: random.Random, n: int) -> str:
    while True:
        value = rand(rng, ALNUM + "_-", n)
        if any(c.isdigit() for c in value) and any(c.isalpha() for c in value):
            return value


ASSIGNMENT_FORMS = ["{k}={v}", "{k}: {v}", '"{k}": "{v}"', "{k} = '{v}'", "export {k}={v}"]
ASSIGNMENT_KEYS = [
    "api_key",
    "API_KEY",
    "apiKey",
    "client_secret",
    "token",
    "auth_token",
    "password",
    "DB_PASSWORD",
]


def secret(rng: random.Random) -> Item:
    pattern = rng.choice(
        [
            "aws",
            "github",
            "github_pat",
            "slack",
            "openai",
            "google",
            "stripe",
            "pem",
            "jwt",
            "assignment",
        ]
    )
    if pattern == "aws":
        text = rng.choice(["AKIA", "ASIA"]) + rand(rng, string.ascii_uppercase + string.digits, 16)
    elif pattern == "github":
        text = f"gh{rng.choice('pousr')}_" + rand(rng, ALNUM, 36)
    elif pattern == "github_pat":
        text = "github_pat_" + rand(rng, ALNUM, 22) + "_" + rand(rng, ALNUM, 59)
    elif pattern == "slack":
        text = (
            f"xox{rng.choice('abprs')}-{digits(rng, 12)}-{digits(rng, 13)}-{rand(rng, ALNUM, 24)}"
        )
    elif pattern == "openai":
        text = rng.choice(["sk-", "sk-proj-"]) + rand(rng, ALNUM, 48)
    elif pattern == "google":
        text = "AIza" + rand(rng, ALNUM + "_-", 35)
    elif pattern == "stripe":
        text = rng.choice(["sk_live_", "rk_live_"]) + rand(rng, ALNUM, rng.randint(24, 99))
    elif pattern == "pem":
        text = pem_block(
            rng,
            rng.choice(["RSA PRIVATE KEY", "PRIVATE KEY", "EC PRIVATE KEY", "OPENSSH PRIVATE KEY"]),
        )
    elif pattern == "jwt":
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(
            json.dumps(
                {"sub": str(rng.randint(1, 10**9)), "iat": rng.randint(10**9, 2 * 10**9)}
            ).encode()
        )
        text = f"{header}.{payload}.{b64url(rng.randbytes(32))}"
    else:
        value = secret_value(rng, rng.randint(20, 48))
        form = rng.choice(ASSIGNMENT_FORMS).format(k=rng.choice(ASSIGNMENT_KEYS), v=value)
        return valid("secret", pattern, form, value)
    return valid("secret", pattern, text)


# --------------------------------------------------------------------------------------------
# Near misses: one generator per category, each returning the planted text


def _bad_luhn(rng: random.Random) -> str:
    number = card_number(rng)[1]
    return number[:-1] + str((int(number[-1]) + rng.randint(1, 9)) % 10)


def _implausible_issuer(rng: random.Random) -> str:
    return luhn_complete(rng.choice("1789"), 16, rng)


def _isbn13(rng: random.Random) -> str:
    body = "978" + digits(rng, 9)
    check = -sum(int(c) * (3 if i % 2 else 1) for i, c in enumerate(body)) % 10
    isbn = body + str(check)
    return rng.choice([isbn, f"ISBN {isbn[:3]}-{isbn[3]}-{isbn[4:7]}-{isbn[7:12]}-{isbn[12]}"])


def _date(rng: random.Random) -> str:
    y, m, d = rng.randint(1970, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice(
        [
            f"{y}-{m:02d}-{d:02d}",
            f"{d:02d}.{m:02d}.{y}",
            f"{m:02d}/{d:02d}/{y}",
            f"{y}{m:02d}{d:02d}",
        ]
    )


def _bad_iban_checksum(rng: random.Random) -> str:
    code = random_iban(rng)
    check = (int(code[2:4]) - 2 + rng.randint(1, 95)) % 97 + 2  # any other value in 02-98
    code = f"{code[:2]}{check:02d}{code[4:]}"
    return group4(code) if rng.random() < 0.5 else code


def _iban_wrong_length(rng: random.Random) -> str:
    code = random_iban(rng)
    return group4(code[:-1] if rng.random() < 0.5 else code + digits(rng, 1))


def _unknown_country(rng: random.Random) -> str:
    bban = rand(rng, string.digits, 18)
    return group4("XQ" + iban_check_digits("XQ", bban) + bban)


def _octet(rng: random.Random) -> str:
    return str(rng.randint(0, 255))


NEAR_MISSES: dict[str, dict[str, Callable[[random.Random], str]]] = {
    "email": {
        "no domain dot (a@b)": lambda r: f"{r.choice(WORDS)}@{r.choice(WORDS)}",
        "user@localhost": lambda r: f"{r.choice(FIRST)}@localhost",
        "one-letter TLD": lambda r: f"{r.choice(FIRST)}@{r.choice(WORDS)}.c",
        "double @": lambda r: f"{r.choice(FIRST)}@@{r.choice(WORDS)}.com",
        "empty domain label": lambda r: f"{r.choice(FIRST)}@.{r.choice(TLDS)}",
        "decorator / handle": lambda r: (
            r.choice(["@property", "@staticmethod", "@functools.cache"]) + f" {r.choice(WORDS)}"
        ),
        "space after @": lambda r: f"{r.choice(FIRST)}@ {r.choice(WORDS)}.com",
        "trailing dot in local part": lambda r: f"{r.choice(FIRST)}.@{r.choice(WORDS)}.com",
    },
    "phone": {
        "7-digit local number": lambda r: f"555-{digits(r, 4)}",
        "area code 0/1": lambda r: (
            f"({r.choice('01')}{digits(r, 2)}) {r.randint(200, 999)}-{digits(r, 4)}"
        ),
        "exchange 0/1": lambda r: (
            f"{r.randint(201, 989)}-{r.choice('01')}{digits(r, 2)}-{digits(r, 4)}"
        ),
        "date": _date,
        "ISBN-10": lambda r: f"0-{digits(r, 3)}-{digits(r, 5)}-{r.choice(string.digits + 'X')}",
        "ZIP+4": lambda r: f"{digits(r, 5)}-{digits(r, 4)}",
        "unassigned country code": lambda r: (
            f"+{r.choice(['999', '888', '0'])} {digits(r, 4)} {digits(r, 4)}"
        ),
        "too short with +": lambda r: f"+44 20 {digits(r, 4)}",
        "decimal": lambda r: f"{r.randint(10, 99)}.{digits(r, 5)}",
        "thousands-grouped number": lambda r: (
            f"{r.randint(1, 999):,}".replace(",", " ") + f" {digits(r, 3)} {digits(r, 3)}"
        ),
        "year or page range": lambda r: r.choice(
            [
                f"{r.randint(1900, 2000)}-{r.randint(2001, 2030)}",
                f"pages {r.randint(100, 499)}-{r.randint(500, 999)}",
            ]
        ),
        "unformatted order id": lambda r: f"order {r.randint(1, 9)}{digits(r, r.randint(8, 11))}",
    },
    "ip_address": {
        "version 2.4.1.3": lambda r: (
            f"version {r.randint(0, 12)}.{r.randint(0, 20)}.{r.randint(0, 9)}.{r.randint(0, 99)}"
        ),
        "v10.0.0.1": lambda r: (
            f"v{r.randint(0, 20)}.{r.randint(0, 9)}.{r.randint(0, 9)}.{r.randint(0, 99)}"
        ),
        "release/build number": lambda r: (
            f"{r.choice(['release', 'build', 'firmware'])} {r.randint(1, 9)}.{r.randint(0, 9)}."
            f"{r.randint(0, 9)}.{r.randint(0, 999)}"
        ),
        "octet > 255": lambda r: ".".join(
            [str(r.randint(256, 999)), _octet(r), _octet(r), _octet(r)]
        ),
        "five dotted numbers": lambda r: ".".join(_octet(r) for _ in range(5)),
        "SNMP OID": lambda r: (
            "1.3.6.1." + ".".join(str(r.randint(1, 99)) for _ in range(r.randint(2, 6)))
        ),
        "three octets": lambda r: ".".join(_octet(r) for _ in range(3)),
        "leading zeros": lambda r: ".".join(f"0{r.randint(1, 9)}" for _ in range(4)),
        "time of day": lambda r: (
            f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"
        ),
        "MAC address": lambda r: ":".join(f"{r.randint(0, 255):02X}" for _ in range(6)),
        "C++ scope / slice": lambda r: r.choice(
            ["std::vector", "Foo::bar", f"a[{r.randint(1, 9)}::{r.randint(1, 9)}]"]
        ),
        "too many IPv6 groups": lambda r: ":".join(f"{r.randint(0, 0xFFFF):x}" for _ in range(9)),
    },
    "credit_card": {
        "bad Luhn": _bad_luhn,
        "implausible issuer, Luhn ok": _implausible_issuer,
        "ISBN-13": _isbn13,
        "date": _date,
        "12-digit number": lambda r: f"{r.randint(1, 9)}{digits(r, 11)}",
        "22-digit number": lambda r: f"{r.randint(1, 9)}{digits(r, 21)}",
    },
    "iban": {
        "bad checksum": _bad_iban_checksum,
        "wrong length": _iban_wrong_length,
        "unknown country": _unknown_country,
    },
    "secret": {
        "SHA-1 hex": lambda r: f"commit {r.randbytes(20).hex()}",
        "SHA-256 hex": lambda r: f"sha256:{r.randbytes(32).hex()}",
        "UUID": lambda r: str(uuid.UUID(int=r.getrandbits(128))),
        "short AKIA": lambda r: "AKIA" + rand(r, string.ascii_uppercase, 12),
        "short ghp_": lambda r: "ghp_" + rand(r, ALNUM, 20),
        "sk- prose": lambda r: "sk-" + "-".join(r.choice(WORDS) for _ in range(5)),
        "short password": lambda r: f"password: {r.choice(WORDS)}{r.randint(1, 99)}",
        "low-entropy value": lambda r: f"token={r.choice('ax') * 24}",
        "placeholder value": lambda r: r.choice(
            [
                "api_key=YOUR_API_KEY_HERE",
                "password = changeme_password_here",
                "token: <insert-token-here>",
            ]
        ),
        "public key / certificate": lambda r: pem_block(r, r.choice(["PUBLIC KEY", "CERTIFICATE"])),
        "bare base64": lambda r: base64.b64encode(r.randbytes(30)).decode(),
        "single JWT segment": lambda r: b64url(json.dumps({"alg": "none"}).encode()),
        "digits-only value": lambda r: f"token_count = {digits(r, 16)}",
    },
}


# --------------------------------------------------------------------------------------------
# The planted set and its scoring


def prose_sentences(texts: list[str]) -> list[str]:
    """Sentences of 8-40 words with letters and plain punctuation only (no digits, no code)."""
    out = []
    for text in texts:
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            sentence = " ".join(sentence.split())
            if 8 <= len(sentence.split()) <= 40 and re.fullmatch(
                r"[A-Za-z ,.;'()!?\"-]+", sentence
            ):
                out.append(sentence)
    return sorted(set(out))


def plant(item: Item, sentence: str, rng: random.Random) -> tuple[str, int]:
    """The sentence with the item inserted between two words; returns it and the item's offset."""
    if item.text.startswith("-----BEGIN"):
        prefix = sentence + "\n"
        return prefix + item.text + "\n", len(prefix)
    words = sentence.split(" ")
    at = rng.randint(1, len(words) - 1)
    wrapper = rng.choice(["{}", "{}", "{}", "({})", "{},", '"{}"', "{}."])
    before = " ".join(words[:at]) + " " + wrapper[: wrapper.index("{")]
    after = wrapper[wrapper.index("}") + 1 :] + " " + " ".join(words[at:])
    return before + item.text + after, len(before)


def build(
    sentences: list[str], n_valid: int, seed: int
) -> tuple[list[str], list[list[tuple[int, Item]]]]:
    """Documents of eight sentences, and the items planted in each (with their offsets)."""
    rng = random.Random(seed)
    makers = {
        "email": email,
        "phone": phone,
        "ip_address": ip_address,
        "credit_card": credit_card,
        "iban": iban,
        "secret": secret,
    }
    items: list[Item | None] = [makers[kind](rng) for kind in PII_KINDS for _ in range(n_valid)]
    for kind, categories in NEAR_MISSES.items():
        names = sorted(categories)
        per = -(-n_valid // len(names))  # at least as many near misses as valid instances
        items += [near(kind, name, categories[name](rng)) for name in names for _ in range(per)]
    items += [None] * (len(items) // 3)  # sentences with nothing planted
    rng.shuffle(items)
    docs, planted = [], []
    for start in range(0, len(items), 8):
        parts, doc_items, offset = [], [], 0
        for item in items[start : start + 8]:
            sentence = rng.choice(sentences)
            if item is None:
                text = sentence
            else:
                text, at = plant(item, sentence, rng)
                doc_items.append((offset + at, item))
            parts.append(text)
            offset += len(text) + 1
        docs.append(" ".join(parts))
        planted.append(doc_items)
    return docs, planted


def score(docs: list[str], planted: list[list[tuple[int, Item]]], cfg: PiiConfig) -> dict:
    """Span precision and recall per kind, redaction rate per near-miss category, recall per
    planted category, and every false positive."""
    found, tp = Counter(), Counter()
    planted_n, hit = Counter(), Counter()  # keyed by (kind, category, is_valid)
    misses, false_positives, overlong = defaultdict(list), [], 0
    for doc, items in zip(docs, planted, strict=True):
        spans = find_pii(doc, cfg)
        placed = [
            (at + it.span[0], at + it.span[1], it) if it.span else (at, at + len(it.text), it)
            for at, it in items
        ]
        covered: set[int] = set()
        for span in spans:
            found[span.kind] += 1
            gold = next(
                (
                    (s, e, it)
                    for s, e, it in placed
                    if it.span and it.kind == span.kind and span.start <= s and e <= span.end
                ),
                None,
            )
            if gold:
                tp[span.kind] += 1
                overlong += span.end - span.start > gold[1] - gold[0]
                covered.add(id(gold[2]))
                continue
            over = next((it for s, e, it in placed if span.start < e and s < span.end), None)
            if over and not over.span:
                covered.add(id(over))
            false_positives.append(
                {
                    "kind": span.kind,
                    "text": doc[span.start : span.end],
                    "over": f"{over.kind} {'valid' if over.span else 'near miss'}: {over.category}"
                    if over
                    else "plain text",
                }
            )
        for s, e, it in placed:
            key = (it.kind, it.category, it.span is not None)
            planted_n[key] += 1
            hit[key] += id(it) in covered
            if it.span and id(it) not in covered:
                misses[key].append(doc[max(0, s - 30) : e + 30])

    def totals(kinds: tuple[str, ...]) -> dict:
        n_found = sum(found[k] for k in kinds)
        n_gold = sum(n for (k, _, ok), n in planted_n.items() if ok and k in kinds)
        return {
            "planted": n_gold,
            "near_misses": sum(n for (k, _, ok), n in planted_n.items() if not ok and k in kinds),
            "redactions": n_found,
            "tp": sum(tp[k] for k in kinds),
            "fp": n_found - sum(tp[k] for k in kinds),
            "precision": sum(tp[k] for k in kinds) / n_found if n_found else 1.0,
            "recall": sum(n for (k, _, ok), n in hit.items() if ok and k in kinds) / n_gold,
        }

    rows = [
        {"kind": k, "category": c, "planted": n, "redacted": hit[(k, c, ok)]}
        | ({"missed_examples": misses[(k, c, ok)][:3]} if ok else {})
        for (k, c, ok), n in sorted(planted_n.items())
    ]
    return {
        "per_kind": {k: totals((k,)) for k in PII_KINDS} | {"overall": totals(PII_KINDS)},
        "near_misses": [r for r in rows if "missed_examples" not in r],
        "recall_by_category": [r for r in rows if "missed_examples" in r],
        "overlong_true_positives": overlong,
        "false_positives": false_positives,
    }


def throughput(docs: list[str], cfg: PiiConfig, repeats: int = 3) -> float:
    """MB/s of find_pii over `docs` in this one process (one core), best of `repeats`."""
    size = sum(len(d.encode()) for d in docs)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for doc in docs:
            find_pii(doc, cfg)
        best = min(best, time.perf_counter() - t)
    return size / best / 1e6


# --------------------------------------------------------------------------------------------
# Report


def render(results: dict) -> str:
    q = results["quality"]["per_kind"]
    lines = [
        START,
        "## PII redaction (`bench/pii_bench.py`)",
        "",
        f"Machine: {results['machine']}. Command: `.venv/bin/python bench/pii_bench.py`.",
        "",
        f"Planted set (seed {results['seed']}): {results['documents']:,} documents "
        f"({results['mb']:.2f} MB) of prose sentences from the pydoc topics and stdlib docstrings, "
        f"one planted item per sentence at most: {q['overall']['planted']:,} valid instances and "
        f"{q['overall']['near_misses']:,} near misses. A redaction is a true positive when it "
        "covers a planted valid instance of its own kind; any other redaction (over a near miss, "
        "another kind or plain text) is a false positive.",
        "",
        "| kind | planted | near misses | redactions | TP | FP | precision | recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in q.items():
        name = f"**{kind}**" if kind == "overall" else kind
        lines.append(
            f"| {name} | {r['planted']:,} | {r['near_misses']:,} | {r['redactions']:,} "
            f"| {r['tp']:,} | {r['fp']:,} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    lines += [
        "",
        "Targets: overall precision >= 0.99, recall >= 0.95. True positives longer than the "
        f"planted item: {results['quality']['overlong_true_positives']}.",
        "",
        "Near misses by category (redacted / planted) and recall by planted category "
        "(recalled / planted):",
        "",
        "| kind | near misses | valid instances |",
        "| --- | --- | --- |",
    ]
    for kind in PII_KINDS:
        near_rows = [n for n in results["quality"]["near_misses"] if n["kind"] == kind]
        valid_rows = [n for n in results["quality"]["recall_by_category"] if n["kind"] == kind]
        lines.append(
            f"| {kind} | "
            + ", ".join(f"{n['category']} {n['redacted']}/{n['planted']}" for n in near_rows)
            + " | "
            + ", ".join(f"{n['category']} {n['redacted']}/{n['planted']}" for n in valid_rows)
            + " |"
        )
    bg = results["background"]
    by_kind = ", ".join(f"{k} {n}" for k, n in bg["by_kind"].items()) or "none"
    lines += [
        "",
        "### Throughput and unplanted text",
        "",
        f"`find_pii` on one core: {results['throughput_mb_s']['planted']:.1f} MB/s on the planted "
        f"set, {results['throughput_mb_s']['stdlib']:.1f} MB/s on the unplanted stdlib and pydoc "
        f"text ({bg['mb']:.2f} MB, every base document whole).",
        "",
        f"Redacting the unplanted text whole gives {bg['redactions']} redactions ({by_kind}), "
        "listed with context in `bench/pii_results.json`: mostly real example addresses (the "
        "`ipaddress` docs, authors' emails), and a few dotted version numbers in lists, read as "
        "IPv4.",
        "",
        "The planted items and near misses were written alongside the redactor, so these numbers "
        "bound what it does on text of this kind; they are not a measurement on a labelled web "
        "corpus.",
        END,
    ]
    return "\n".join(lines)


def write_results(section: str) -> None:
    write_section("pii", section, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--per-kind", type=int, default=400, help="valid instances planted per kind"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = PiiConfig()
    background = [d.text for d in base_documents()]
    docs, planted = build(prose_sentences(background), args.per_kind, args.seed)
    quality = score(docs, planted, cfg)
    bg_finds = [
        {
            "kind": s.kind,
            "text": doc[s.start : s.end],
            "context": doc[max(0, s.start - 40) : s.end + 20],
        }
        for doc in background
        for s in find_pii(doc, cfg)
    ]
    results = {
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.processor() or platform.machine()}",
        "command": ".venv/bin/python bench/pii_bench.py",
        "seed": args.seed,
        "documents": len(docs),
        "mb": sum(len(d.encode()) for d in docs) / 1e6,
        "quality": quality,
        "throughput_mb_s": {
            "planted": throughput(docs, cfg),
            "stdlib": throughput(background, cfg, 1),
        },
        "background": {
            "mb": sum(len(d.encode()) for d in background) / 1e6,
            "redactions": len(bg_finds),
            "by_kind": dict(Counter(f["kind"] for f in bg_finds).most_common()),
            "finds": bg_finds,
        },
        "sha256_of_planted_text": hashlib.sha256("\n".join(docs).encode()).hexdigest(),
    }
    q = quality["per_kind"]
    print(
        f"{'kind':12s} {'planted':>8s} {'near':>6s} {'found':>6s} {'TP':>6s} {'FP':>4s}   P      R"
    )
    for kind, r in q.items():
        print(
            f"{kind:12s} {r['planted']:8d} {r['near_misses']:6d} {r['redactions']:6d} {r['tp']:6d} "
            f"{r['fp']:4d} {r['precision']:6.3f} {r['recall']:6.3f}"
        )
    for fp in quality["false_positives"]:
        print("false positive", fp)
    for row in quality["recall_by_category"]:
        if row["missed_examples"]:
            print("missed", row["kind"], row["category"], row["missed_examples"])
    print(f"throughput MB/s: {results['throughput_mb_s']}")
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    write_results(render(results))
    print(
        f"wrote {RESULTS_JSON.relative_to(REPO)} and the pii section of {RESULTS.relative_to(REPO)}"
    )


if __name__ == "__main__":
    main()
