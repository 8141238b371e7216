"""PII redaction: emails, phone numbers, IP addresses, card numbers, IBANs and secrets.

    ds = ds.map_batches(redact_batch, batch_format="pyarrow", fn_kwargs={"cfg": PiiConfig()})
    text, counts = redact("mail jane@example.com", PiiConfig())  # "mail <EMAIL>", {"email": 1, ...}

Each kind is found by a regex whose quantifiers are all bounded (so the cost of a document is linear
in its length, with a bounded constant), then checked wherever a check exists: Luhn and issuer
ranges for cards, ISO 13616 mod-97 and the country's length for IBANs, `ipaddress` for IPs,
`phonenumbers` for phones, entropy for `key=value` secrets. Overlapping finds are resolved by kind
(secret > email > credit_card > iban > ip_address > phone), then by length, so each character is
redacted, and counted, once.
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
import math
import re
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import phonenumbers
import pyarrow as pa
from pydantic import Field, field_validator

from workloads.common.config import StrictModel

__all__ = ["PII_KINDS", "PiiConfig", "PiiSpan", "find_pii", "redact", "redact_batch"]

PiiKind = Literal["email", "phone", "ip_address", "credit_card", "iban", "secret"]
PII_KINDS: tuple[PiiKind, ...] = typing.get_args(PiiKind)
# An overlap goes to the kind with the more specific shape (a key's digits are not a phone number,
# an email's domain is not an IP), then to the longer span.
_PRIORITY = {
    k: i for i, k in enumerate(("secret", "email", "credit_card", "iban", "ip_address", "phone"))
}

Span = tuple[int, int]


class PiiConfig(StrictModel):
    """Which kinds of PII to redact, and what to write in their place."""

    type: Literal["pii"] = Field(default="pii", description="Step type tag.")
    kinds: list[PiiKind] = Field(
        default_factory=lambda: list(PII_KINDS),
        description=f"Kinds of PII to redact, of {', '.join(PII_KINDS)}.",
    )
    placeholder: str = Field(
        default="<{KIND}>",
        description="Replacement text; `{KIND}` becomes the upper-case kind, e.g. <IP_ADDRESS>.",
    )
    default_region: str = Field(
        default="US",
        description="Region (ISO 3166 alpha-2) for phone numbers written without a +country code.",
    )

    @field_validator("placeholder")
    @classmethod
    def _placeholder_formats(cls, value: str) -> str:
        try:
            value.format(KIND="EMAIL")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"must be a format string whose only field is {{KIND}} ({exc})"
            ) from None
        return value

    @field_validator("default_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region that phonenumbers knows")
        return value


class PiiSpan(NamedTuple):
    """`text[start:end]` is PII of `kind`."""

    start: int
    end: int
    kind: PiiKind


# --------------------------------------------------------------------------------------------
# Emails


_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![\w-])"
)


def _emails(text: str, cfg: PiiConfig) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        local = m.group().split("@", 1)[0]
        stripped = local.lstrip(".")  # "...jane@x.org": the address starts after the dots
        if stripped and not stripped.endswith(".") and ".." not in stripped:
            yield m.start() + len(local) - len(stripped), m.end()


# --------------------------------------------------------------------------------------------
# Phone numbers: candidates by shape, validity by phonenumbers (country code, length, ranges)


# Not inside a longer run of digit groups (an IBAN's or a card's tail), nor after a dot or a word.
_PHONE = re.compile(
    r"(?<![\w+.-])(?<!\d[ .-])(?:"
    r"\+\d{1,15}(?:[ .-]?\(\d{1,4}\)[ .-]?\d{1,8}|[ .-]\d{1,8}){0,6}"  # +44 20 7946 0958
    r"|(?:\(\d{1,5}\)[ .-]?|\d{1,5}[ .-])\d{2,5}(?:[ .-]\d{2,5}){0,3}"  # (415) 555-0132
    r")(?!\w|[.-]\d)"
)


_DOTTED_SHORT_GROUPS = re.compile(r"\d{1,3}(?:\.\d{1,3})+")  # IPs and versions, never phones


@functools.lru_cache(maxsize=65536)  # repeated numbers (and repetitive junk) parse once
def _valid_phone(candidate: str, region: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    if not 7 <= digits <= 15:
        return False
    # Without a country code, phonenumbers accepts short local numbers ("310-1875" is valid in
    # Canada) that are far more often decimals ("31.01875"), ranges and ids.
    if _DOTTED_SHORT_GROUPS.fullmatch(candidate) or (
        not candidate.startswith("+") and (digits < 8 or candidate.count(".") == 1)
    ):
        return False
    try:
        return phonenumbers.is_valid_number(phonenumbers.parse(candidate, region))
    except phonenumbers.NumberParseException:
        return False


def _phones(text: str, cfg: PiiConfig) -> Iterator[Span]:
    """Valid candidates, else their longest valid prefix that ends at a space: the shape also takes
    in a number that follows ("(415) 555-0132 24 hours a day")."""
    pos = 0
    while m := _PHONE.search(text, pos):
        s = m.group()
        ends = [len(s)] + [i for i in range(len(s) - 1, 0, -1) if s[i] == " " and s[i - 1] != " "]
        end = next((n for n in ends if _valid_phone(s[:n], cfg.default_region)), None)
        if end is None:
            pos = m.end()
        else:
            yield m.start(), m.start() + end
            pos = m.start() + end


# --------------------------------------------------------------------------------------------
# IP addresses


_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?!\w|\.\d)")
_IPV6 = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?:\.\d{1,3}){0,3}(?![\w:]|\.\d)"
)
# Dotted quads after these words are versions or section numbers, not addresses.
_NOT_IP_CONTEXT = re.compile(
    r"(?i)(?<![a-z])(?:version|ver|v|release|rel|build|revision|rev|firmware|fw|patch|update|"
    r"section|sec|chapter|clause|figure|fig|table|step|item)\.?\s{0,2}[:#]?\s{0,2}$"
)


def _ip_addresses(text: str, cfg: PiiConfig) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())  # octets 0-255, no leading zeros
        except ValueError:
            continue
        if not _NOT_IP_CONTEXT.search(text, max(0, m.start() - 24), m.start()):
            yield m.span()
    if ":" not in text:
        return
    for m in _IPV6.finditer(text):
        s = m.group()
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        # Keep "fe80::1" and "2001:db8::8a2e:370:7334"; skip slices and scopes ("1::2", "ab::cd").
        groups = [g for g in re.split(r"[:.]", s) if g]
        if any(c.isdigit() for c in s) and (len(groups) >= 3 or max(map(len, groups)) >= 3):
            yield m.span()


# --------------------------------------------------------------------------------------------
# Card numbers


# Unbroken, or in groups of four with one kind of separator, or Amex/Diners 4-6-5 and 4-6-4; not
# the tail of a longer run of groups, and not taking in an expiry date ("4111 ... 1111 12/25").
_CARD = re.compile(
    r"(?<![\w.,+-])(?<!\d[ -])"
    r"(?:\d{13,19}|\d{4}([ -])\d{4}(?:\1\d{4}){1,2}(?:\1\d{1,4}(?!/))?|\d{4}([ -])\d{6}\2\d{4,5})"
    r"(?!\w|[.,]\d)"
)
_ALL_LENGTHS = (16, 17, 18, 19)
# (lowest prefix, highest prefix, lengths): Visa, Mastercard, Amex, Discover, UnionPay, JCB, Diners.
_ISSUERS = (
    ("4", "4", (13, 16, 19)),
    ("51", "55", (16,)),
    ("2221", "2720", (16,)),
    ("34", "34", (15,)),
    ("37", "37", (15,)),
    ("6011", "6011", _ALL_LENGTHS),
    ("644", "649", _ALL_LENGTHS),
    ("65", "65", _ALL_LENGTHS),
    ("62", "62", _ALL_LENGTHS),
    ("3528", "3589", _ALL_LENGTHS),
    ("300", "305", (14, *_ALL_LENGTHS)),
    ("36", "36", (14, *_ALL_LENGTHS)),
    ("38", "39", _ALL_LENGTHS),
)


def _luhn(digits: str) -> bool:
    total = 0
    for i, c in enumerate(reversed(digits)):
        d = int(c) * (1 + i % 2)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def _valid_card(candidate: str) -> bool:
    digits = candidate.replace(" ", "").replace("-", "")
    return _luhn(digits) and any(
        lo <= digits[: len(lo)] <= hi and len(digits) in lengths for lo, hi, lengths in _ISSUERS
    )


def _cards(text: str, cfg: PiiConfig) -> Iterator[Span]:
    return (m.span() for m in _CARD.finditer(text) if _valid_card(m.group()))


# --------------------------------------------------------------------------------------------
# IBANs


_IBAN = re.compile(
    r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,8}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9])"
)
# ISO 13616 registry: total IBAN length per country.
_IBAN_LENGTHS = {
    **dict.fromkeys(("NO",), 15),
    **dict.fromkeys(("BE",), 16),
    **dict.fromkeys(("DK", "FI", "FK", "FO", "GL", "NL", "SD"), 18),
    **dict.fromkeys(("MK", "SI"), 19),
    **dict.fromkeys(("AT", "BA", "EE", "KZ", "LT", "LU", "MN", "XK"), 20),
    **dict.fromkeys(("CH", "HR", "LI", "LV"), 21),
    **dict.fromkeys(("BG", "BH", "CR", "DE", "GB", "GE", "IE", "ME", "RS", "VA"), 22),
    **dict.fromkeys(("AE", "GI", "IL", "IQ", "OM", "SO", "TL"), 23),
    **dict.fromkeys(("AD", "CZ", "ES", "MD", "PK", "RO", "SA", "SE", "SK", "TN", "VG"), 24),
    **dict.fromkeys(("LY", "PT", "ST"), 25),
    **dict.fromkeys(("IS", "TR"), 26),
    **dict.fromkeys(("BI", "DJ", "FR", "GR", "IT", "MC", "MR", "SM"), 27),
    **dict.fromkeys(("AL", "AZ", "BY", "CY", "DO", "GT", "HU", "LB", "NI", "PL", "SV"), 28),
    **dict.fromkeys(("BR", "EG", "PS", "QA", "UA"), 29),
    **dict.fromkeys(("JO", "KW", "MU", "YE"), 30),
    **dict.fromkeys(("MT", "SC"), 31),
    **dict.fromkeys(("LC",), 32),
    **dict.fromkeys(("RU",), 33),
}


def _iban_checksum_ok(iban: str) -> bool:
    """ISO 13616: the IBAN with its first four characters moved to the end, letters as 10-35, is 1
    mod 97."""
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _ibans(text: str, cfg: PiiConfig) -> Iterator[Span]:
    for m in _IBAN.finditer(text):
        s = m.group()
        length = _IBAN_LENGTHS.get(s[:2])
        compact = s.replace(" ", "")
        if length is None or len(compact) < length:
            continue
        # The IBAN ends at its country's length, between groups; the match may run on into a
        # following upper-case word ("... 7034 FOR"), but not into more digits.
        end, seen = 0, 0
        while seen < length:
            seen += s[end] != " "
            end += 1
        rest = s[end:]
        if (not rest or rest[0] == " " and rest[1:].isalpha()) and _iban_checksum_ok(
            compact[:length]
        ):
            yield m.start(), m.start() + end


# --------------------------------------------------------------------------------------------
# Secrets


_TOKEN = re.compile(
    r"(?<![\w-])(?:"
    r"(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,251}"  # GitHub
    r"|github_pat_[A-Za-z0-9_]{22,243}"
    r"|xox[abprs]-[A-Za-z0-9-]{10,250}"  # Slack
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{20,200}"  # OpenAI style
    r"|AIza[A-Za-z0-9_-]{35}"  # Google API key
    r"|[sr]k_live_[A-Za-z0-9]{24,247}"  # Stripe
    r"|eyJ[A-Za-z0-9_-]{8,4000}\.[A-Za-z0-9_-]{2,4000}\.[A-Za-z0-9_-]{0,4000}"  # JWT
    r")(?![\w-])"
)
_PEM_BEGIN = re.compile(r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"(?:\r?\n[A-Za-z0-9+/=]{1,100}){1,1000}")  # a key cut off before its END
_PEM_MAX_CHARS = 16384  # an RSA-4096 key is about 3.3 KB
_ASSIGNMENT = re.compile(
    r"(?i)(?:api[_-]?key|secret|token|passw(?:or)?d|pwd)[\w-]{0,30}?['\"]?[ \t]{0,3}[:=][ \t]{0,3}"
    r"['\"]?([A-Za-z0-9+/=_.~!@#$%^*-]{16,256})"
)


def _high_entropy(value: str) -> bool:
    """At least two of lower/upper/digit, and at least 3 bits per character: not a placeholder such
    as YOUR_API_KEY_HERE, a word, or a run of one character."""
    classes = sum(any(f(c) for c in value) for f in (str.islower, str.isupper, str.isdigit))
    n = len(value)
    entropy = -sum(k / n * math.log2(k / n) for k in Counter(value).values())
    return classes >= 2 and entropy >= 3.0


def _secrets(text: str, cfg: PiiConfig) -> Iterator[Span]:
    for m in _TOKEN.finditer(text):
        s = m.group()
        # "sk-" also starts prose like "sk-learn-compatible-estimators": keys mix case and digits.
        if not s.startswith("sk-") or (_high_entropy(s) and not s.islower()):
            yield m.span()
    if "PRIVATE KEY" in text:
        ends = [m.span() for m in _PEM_END.finditer(text)]
        end_starts = [s for s, _ in ends]
        for m in _PEM_BEGIN.finditer(text):
            i = bisect.bisect_left(end_starts, m.end())
            if i < len(ends) and ends[i][0] - m.end() <= _PEM_MAX_CHARS:
                yield m.start(), ends[i][1]
            else:
                body = _PEM_BODY.match(text, m.end())
                yield m.start(), body.end() if body else m.end()
    for m in _ASSIGNMENT.finditer(text):
        value = m.group(1).rstrip(".")  # a sentence's full stop is not part of the value
        if len(value) >= 16 and _high_entropy(value):
            yield m.start(1), m.start(1) + len(value)


# --------------------------------------------------------------------------------------------
# Overlap resolution, redaction


_FINDERS: dict[PiiKind, Callable[[str, PiiConfig], Iterator[Span]]] = {
    "email": _emails,
    "phone": _phones,
    "ip_address": _ip_addresses,
    "credit_card": _cards,
    "iban": _ibans,
    "secret": _secrets,
}


# Digit groups inside an IBAN-shaped code are not phone or card numbers, even when the code fails
# its checksum ("NL54 EAJY 2505 3872 13" holds a valid US phone number).
_CODE_PARTS = ("phone", "credit_card")


def _inside(span: PiiSpan, codes: list[Span], starts: list[int]) -> bool:
    """Whether `span` overlaps one of `codes` (sorted, disjoint, with their `starts`)."""
    i = bisect.bisect_left(starts, span.end) - 1
    return i >= 0 and codes[i][1] > span.start


def find_pii(text: str, cfg: PiiConfig) -> list[PiiSpan]:
    """Non-overlapping PII spans of the configured kinds, in text order."""
    candidates = [
        PiiSpan(start, end, kind)
        for kind in dict.fromkeys(cfg.kinds)
        for start, end in _FINDERS[kind](text, cfg)
    ]
    if any(c.kind in _CODE_PARTS for c in candidates):
        codes = [m.span() for m in _IBAN.finditer(text)]
        starts = [start for start, _ in codes]
        candidates = [
            c for c in candidates if c.kind not in _CODE_PARTS or not _inside(c, codes, starts)
        ]
    candidates.sort(key=lambda c: (_PRIORITY[c.kind], c.start - c.end, c.start))
    taken = bytearray(len(text)) if candidates else bytearray()
    kept = []
    for c in candidates:
        if taken.find(1, c.start, c.end) == -1:
            taken[c.start : c.end] = b"\x01" * (c.end - c.start)
            kept.append(c)
    return sorted(kept)


def redact(text: str, cfg: PiiConfig) -> tuple[str, dict[str, int]]:
    """`text` with each PII span replaced by the placeholder, and the number of spans per kind
    (every kind in PII_KINDS is a key)."""
    counts = dict.fromkeys(PII_KINDS, 0)
    parts, pos = [], 0
    for span in find_pii(text, cfg):
        parts += (text[pos : span.start], cfg.placeholder.format(KIND=span.kind.upper()))
        counts[span.kind] += 1
        pos = span.end
    if not parts:
        return text, counts
    parts.append(text[pos:])
    return "".join(parts), counts


def redact_batch(batch: pa.Table, *, cfg: PiiConfig) -> pa.Table:
    """Redact the `text` column and add an int32 `pii_<kind>` count column per kind in PII_KINDS.

    Null texts stay null and get null counts. Other columns are kept, in order; count columns that
    already exist (a rerun) are replaced in place.
    """
    texts = batch.column("text")
    redacted: list[str | None] = []
    counts: dict[str, list[int | None]] = {kind: [] for kind in PII_KINDS}
    for text in texts.to_pylist():
        if text is None:
            redacted.append(None)
            for column in counts.values():
                column.append(None)
            continue
        new_text, found = redact(text, cfg)
        redacted.append(new_text)
        for kind, n in found.items():
            counts[kind].append(n)
    index = batch.schema.get_field_index("text")
    batch = batch.set_column(index, batch.schema.field(index), pa.array(redacted, texts.type))
    for kind, values in counts.items():
        field = pa.field(f"pii_{kind}", pa.int32())
        column = pa.array(values, pa.int32())
        existing = batch.schema.get_field_index(field.name)
        if existing >= 0:
            batch = batch.set_column(existing, field, column)
        else:
            batch = batch.append_column(field, column)
    return batch
