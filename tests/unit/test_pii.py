"""PII redaction: what each kind catches, the near misses it leaves, overlaps, counts, the batch
function, and bounded cost on pathological documents. No Ray."""

from __future__ import annotations

import itertools
import random
import string

import pyarrow as pa
import pytest

from workloads.common.config import ConfigError, load_config
from workloads.data.filters.pii import PII_KINDS, PiiConfig, find_pii, redact, redact_batch

CFG = PiiConfig()


def found(text: str, cfg: PiiConfig = CFG) -> list[tuple[str, str]]:
    """(kind, redacted text) for every span."""
    return [(s.kind, text[s.start : s.end]) for s in find_pii(text, cfg)]


# --------------------------------------------------------------------------------------------
# Config


def test_config_defaults_and_validation():
    assert CFG.type == "pii" and tuple(CFG.kinds) == PII_KINDS and CFG.placeholder == "<{KIND}>"
    assert load_config(PiiConfig, overrides=["kinds=[email, iban]"]).kinds == ["email", "iban"]
    for bad in ("kinds=[ssn]", "placeholder={kind}", "default_region=XX", "placholder=x"):
        with pytest.raises(ConfigError):
            load_config(PiiConfig, overrides=[bad])


# --------------------------------------------------------------------------------------------
# What each kind catches: (text, kind, the part that must be redacted)

POSITIVES = [
    ("Write to jane.doe@example.co.uk today.", "email", "jane.doe@example.co.uk"),
    ("<Maria_Garcia+news@mail.river.io>", "email", "Maria_Garcia+news@mail.river.io"),
    ("mailto:ops@corp.example", "email", "ops@corp.example"),
    ("...bob@x.org", "email", "bob@x.org"),
    ("Call (415) 555-0132 now", "phone", "(415) 555-0132"),
    ("Call 415-555-0132.", "phone", "415-555-0132"),
    ("or 415.555.0132", "phone", "415.555.0132"),
    ("London: +44 20 7946 0958", "phone", "+44 20 7946 0958"),
    ("tel +1 (650) 253-0000 24 hours a day", "phone", "+1 (650) 253-0000"),
    ("+4915112345678", "phone", "+4915112345678"),
    ("Paris +33 1 42 68 53 00", "phone", "+33 1 42 68 53 00"),
    ("toll free 1-800-555-0199", "phone", "1-800-555-0199"),
    ("host 192.168.1.10 is up", "ip_address", "192.168.1.10"),
    ("connect to 10.0.0.1:8080.", "ip_address", "10.0.0.1"),
    ("route 0.0.0.0/0", "ip_address", "0.0.0.0"),
    ("v6 2001:db8::8a2e:370:7334 ok", "ip_address", "2001:db8::8a2e:370:7334"),
    ("[fe80::1]:443", "ip_address", "fe80::1"),
    (
        "2001:0db8:0000:0000:0000:ff00:0042:8329",
        "ip_address",
        "2001:0db8:0000:0000:0000:ff00:0042:8329",
    ),
    ("card 4111 1111 1111 1111 exp 12/25", "credit_card", "4111 1111 1111 1111"),
    ("card 4111-1111-1111-1111 12/25", "credit_card", "4111-1111-1111-1111"),
    ("Amex 3782 822463 10005", "credit_card", "3782 822463 10005"),
    ("MC 5555555555554444,", "credit_card", "5555555555554444"),
    ("Discover 6011111111111117", "credit_card", "6011111111111117"),
    ("IBAN DE89 3704 0044 0532 0130 00.", "iban", "DE89 3704 0044 0532 0130 00"),
    ("GB82WEST12345698765432", "iban", "GB82WEST12345698765432"),
    ("NL91 ABNA 0417 1643 00", "iban", "NL91 ABNA 0417 1643 00"),
    ("BE68 5390 0754 7034 FOR the rent", "iban", "BE68 5390 0754 7034"),
    ("key AKIAIOSFODNN7EXAMPLE", "secret", "AKIAIOSFODNN7EXAMPLE"),
    (
        "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
        "secret",
        "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
    ),
    (
        "github_pat_11ABCDEFG0123456789abcdefghij",
        "secret",
        "github_pat_11ABCDEFG0123456789abcdefghij",
    ),
    (
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKl",
        "secret",
        "xoxb-123456789012-1234567890123-AbCdEfGhIjKl",
    ),
    ("sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv", "secret", "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv"),
    (
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
        "secret",
        "AIzaSyA1234567890abcdefghijklmnopqrstuv",
    ),
    ("sk_live_4eC39HqLyjWDarjtT1zdp7dc", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "secret",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    ),
    ('api_key="Zx81kLq02Mnb7Vc4Tr9W"', "secret", "Zx81kLq02Mnb7Vc4Tr9W"),
    (
        "export AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCY.",
        "secret",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
    ),
    ("password: CorrectHorse42Battery", "secret", "CorrectHorse42Battery"),
]
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA3Tz2mr7SZiAMfQyuv\nBjM9Oi==\n-----END RSA PRIVATE KEY-----"


@pytest.mark.parametrize(("text", "kind", "pii"), POSITIVES)
def test_each_kind_is_found_with_its_exact_span(text, kind, pii):
    assert found(text) == [(kind, pii)]


def test_private_key_block_is_redacted_through_its_end_line():
    text = f"config:\n{PEM}\nthat was the key"
    out, counts = redact(text, CFG)
    assert out == "config:\n<SECRET>\nthat was the key" and counts["secret"] == 1
    cut = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nAAAABG5vbmU=\n\nthe end"
    assert redact(cut, CFG)[0] == "<SECRET>\n\nthe end"  # a key with its END line cut off


# --------------------------------------------------------------------------------------------
# Near misses: nothing of any kind is redacted

NEAR_MISSES = [
    "a@b",
    "user@localhost",
    "name@domain.c",
    "foo@@bar.com",
    "user@.com",
    "first.@example.com",
    "@property def name",
    "dial 555-0132",  # 7-digit local number
    "order (123) 456-7890",  # NANP area codes never start with 1
    "released 2024-01-15",
    "on 15.01.2024",
    "ISBN 0-306-40615-2",
    "ZIP 94103-1234",
    "+999 1234 5678",
    "pi is 31.01875 or so",
    "order 4155550132",  # unformatted digit runs are ids more often than phones
    "pages 1990-2010",
    "version 1.2.3.4",
    "v1.2.3.4",
    "release 10.0.0.1",
    "see section 1.2.3.4",
    "1.2.3.4.5",
    "OID 1.3.6.1.4.1.311",
    "256.1.1.1",
    "10.0.0.300",
    "192.168.1",
    "01.02.03.04",
    "at 12:30:45",
    "MAC 00:1A:2B:3C:4D:5E",
    "std::vector and a[1::2]",
    "1:2:3:4:5:6:7:8:9",
    "card 4111 1111 1111 1112",  # bad Luhn
    "9780306406157",  # ISBN-13
    "ISBN 978-3-16-148410-0",
    "1234567812345670",  # Luhn-valid, but no issuer starts with 1
    "id 12345678901234567890123",
    "DE88 3704 0044 0532 0130 00",  # bad checksum
    "DE89 3704 0044 0532 0130 001",  # one digit too many
    "XQ12 3456 7890 1234 5678 90",  # no such country
    "NL54 EAJY 2505 3872 13",  # bad checksum, and its digits must not become a phone
    "commit 3f786850e387550fdab836ed7e6dc881de23001b",
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "123e4567-e89b-12d3-a456-426614174000",
    "AKIAIOSFODNN7EXA",
    "ghp_short123",
    "use sk-learn-compatible-estimators-and-friends",
    "password: hunter2",
    "token=aaaaaaaaaaaaaaaaaaaaaaaa",
    "api_key=YOUR_API_KEY_HERE",
    "password = changeme_password_here",
    "token_count = 1234567890123456",
    "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A\n-----END PUBLIC KEY-----",
    "eyJhbGciOiJub25lIn0",
    "Zx81kLq02Mnb7Vc4Tr9WZx81kLq02Mnb7Vc4",  # high entropy, but no key name
]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text):
    assert found(text) == []
    assert redact(text, CFG) == (text, dict.fromkeys(PII_KINDS, 0))


# --------------------------------------------------------------------------------------------
# Overlaps and counts


def test_overlaps_are_counted_once():
    # An IPv4 inside an IPv6 address, a card number (also 16 digits a phone could start on), a key
    # made of digits and capitals, a key value that is also a JWT.
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
    text = f"::ffff:192.0.2.1 | 4111 1111 1111 1111 | AKIA2345678901234567 | token={jwt}"
    assert found(text) == [
        ("ip_address", "::ffff:192.0.2.1"),
        ("credit_card", "4111 1111 1111 1111"),
        ("secret", "AKIA2345678901234567"),
        ("secret", jwt),
    ]


def test_priority_goes_to_the_more_specific_kind():
    # A phone-shaped run inside a secret value is part of the secret.
    assert found("password=Ab415-555-0132xYz9q") == [("secret", "Ab415-555-0132xYz9q")]
    spans = find_pii("a 415-555-0132 b jane@example.com c 10.0.0.1", CFG)
    assert [s.kind for s in spans] == ["phone", "email", "ip_address"]  # in text order
    assert all(a.end <= b.start for a, b in itertools.pairwise(spans))


def test_redact_counts_every_kind_and_honours_config():
    text = "Mail jane@example.com or john@example.org, call (415) 555-0132, host 10.1.2.3."
    out, counts = redact(text, CFG)
    assert out == "Mail <EMAIL> or <EMAIL>, call <PHONE>, host <IP_ADDRESS>."
    assert counts == {
        "email": 2,
        "phone": 1,
        "ip_address": 1,
        "credit_card": 0,
        "iban": 0,
        "secret": 0,
    }
    only_email = PiiConfig(kinds=["email"], placeholder="[{KIND}]")
    out, counts = redact(text, only_email)
    assert out == "Mail [EMAIL] or [EMAIL], call (415) 555-0132, host 10.1.2.3."
    assert counts["email"] == 2 and counts["phone"] == counts["ip_address"] == 0
    assert redact(out, only_email) == (out, dict.fromkeys(PII_KINDS, 0))  # placeholders are inert


def test_default_region_reads_national_numbers():
    assert found("020 7946 0958") == []  # not a US number
    assert found("020 7946 0958", PiiConfig(default_region="GB")) == [("phone", "020 7946 0958")]


# --------------------------------------------------------------------------------------------
# The batch function


def test_redact_batch_replaces_text_and_appends_counts():
    batch = pa.table(
        {
            "id": ["a", "b", "c"],
            "text": pa.array(
                ["jane@example.com and 10.0.0.1", None, "nothing here"], pa.large_string()
            ),
            "meta": [{"k": 1}, {"k": 2}, {"k": 3}],
        }
    )
    out = redact_batch(batch, cfg=CFG)
    assert out.column_names == ["id", "text", "meta", *(f"pii_{k}" for k in PII_KINDS)]
    assert out.schema.field("text").type == pa.large_string()
    assert out["text"].to_pylist() == ["<EMAIL> and <IP_ADDRESS>", None, "nothing here"]
    assert out["id"].equals(batch["id"]) and out["meta"].equals(batch["meta"])
    assert all(out.schema.field(f"pii_{k}").type == pa.int32() for k in PII_KINDS)
    assert out["pii_email"].to_pylist() == [1, None, 0]
    assert out["pii_ip_address"].to_pylist() == [1, None, 0]
    assert out["pii_secret"].to_pylist() == [0, None, 0]
    again = redact_batch(out, cfg=CFG)  # a rerun replaces the count columns in place
    assert again.column_names == out.column_names
    assert again["pii_email"].to_pylist() == [0, None, 0]


def test_redact_batch_on_an_empty_batch():
    batch = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
    out = redact_batch(batch, cfg=CFG)
    assert out.num_rows == 0 and out.column_names[-1] == "pii_secret"


# --------------------------------------------------------------------------------------------
# Bounded cost: every quantifier is bounded, so 10 MB of adversarial text finishes quickly.

SIZE = 10_000_000


def _junk() -> str:
    rng = random.Random(0)
    return "".join(rng.choices(string.printable[:95], k=SIZE))


PATHOLOGICAL = {
    "random printable junk": _junk,
    "one run of digits": lambda: "7" * SIZE,
    "a@ repeated": lambda: "a@" * (SIZE // 2),
    "spaced digit pairs": lambda: "12 " * (SIZE // 3),
    "dotted digits": lambda: "1." * (SIZE // 2),
    "hex and colons": lambda: "a:" * (SIZE // 2),
    "unclosed key headers": lambda: "-----BEGIN RSA PRIVATE KEY-----" * (SIZE // 31),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_documents_finish(name):
    text = PATHOLOGICAL[name]()
    out, counts = redact(text, CFG)
    assert isinstance(out, str) and set(counts) == set(PII_KINDS)
    assert all(isinstance(n, int) and n >= 0 for n in counts.values())
    if name != "random printable junk":  # junk holds a few email-shaped strings by chance
        assert counts["email"] == counts["phone"] == counts["credit_card"] == 0
