"""Step 6, Korean personal data: find it and replace it with a typed placeholder.

datatrove's `PIIFormatter` knows e-mail and IP addresses; Korean text carries more, in Korean formats.
Each type below has a pattern *and* a check, because digits in Korean text are mostly dates, prices,
order numbers and versions, and a false positive destroys ordinary text:

Type (placeholder): what is matched -> the check that must also hold.

- `email` (`<|email|>`): local@domain.tld -> a dotted domain with a letter TLD.
- `rrn` (`<|rrn|>`): 주민등록번호 / 외국인등록번호 YYMMDD-GNNNNNN with G in 1-8, or masked YYMMDD-G****** ->
  a real date; without the hyphen, the checksum.
- `card` (`<|card|>`): 4-4-4-4 or 4-6-5 digit groups, or 15-16 digits -> Luhn, and an issuer digit first
  (2-6 for the international brands, 9 for Korean domestic cards).
- `phone` (`<|phone|>`): mobile 010/011/016-019, area codes 02 and 031-064, 070, 050X, +82 forms, (02) ...,
  and 15XX/16XX/18XX-XXXX -> the digits fit the numbering plan; a 15XX-XXXX that reads as a year range
  ("1592-1598") needs a phone word (전화, 문의, 고객센터, ...) before it.
- `account` (`<|account|>`): 10-14 digits, bare or in 2-4 hyphenated groups -> a bank or account word
  (은행, 계좌, 입금, 국민, 신한, 카카오, ...) within 20 characters before it.
- `passport` (`<|passport|>`): M/S/R/G/D/T and 8 digits, or the 2021 format M123A4567 -> 여권/passport within
  30 characters before it.
- `ip` (`<|ip|>`): IPv4 dotted quads, IPv6 -> octets <= 255 / a valid IPv6 address; not glued to a word
  ("람보1.2.3.4" is a film series) nor after 버전/version/v; a quad of single digits needs an IP word before it.

Why the checksum is not required for a hyphenated 주민등록번호: numbers issued since October 2020 have a
random tail and no checksum, but `YYMMDD-G` with a real date is still unmistakable. Thirteen bare digits are
accepted only when the checksum holds (most 13-digit runs are not personal numbers).

Overlaps are resolved in the order of this list (an RRN is not also read as an account number); a span is
replaced at most once. `find_pii` returns the spans, `redact` the new text and counts per type.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

from datatrove.pipeline.base import PipelineStep

from kfoundry.errors import ConfigError

PII_TYPES = ("email", "rrn", "card", "phone", "account", "passport", "ip")


def placeholder(kind: str) -> str:
    return f"<|{kind}|>"


@dataclass(frozen=True)
class PiiSpan:
    kind: str
    start: int
    end: int
    text: str


# Digit runs must not continue a longer number on either side ("2024-010-1234-5678" is not a phone).
_L = r"(?<![0-9A-Za-z])(?<![0-9][\-.])"
_R = r"(?![0-9A-Za-z])(?![\-.][0-9])"
_SEP = r"[\-. ]?"

_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9][A-Za-z0-9._%+\-]*@"
                    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![A-Za-z0-9\-])")
_RRN = re.compile(_L + r"(\d{2})(\d{2})(\d{2})(\s?[\-–]\s?|)([1-8])(\d{6}|[*xX]{6})" + r"(?![0-9A-Za-z*])")
_CARD = re.compile(_L + r"(?:\d{4}([\- ])\d{4}\1\d{4}\1\d{4}|\d{4}([\- ])\d{6}\2\d{5}|\d{15,16})" + _R)
_PHONE = re.compile(
    r"(?<![0-9A-Za-z+])(?<![0-9][\-.])(?:"
    r"\+82[\-. ]?(?:\(0\))?[\-. ]?(?:1[016789]|2|[3-6][1-5]|70)[\-. ]?\d{3,4}[\-. ]?\d{4}"  # +82 10 1234 5678
    r"|01[016789]" + _SEP + r"\d{3,4}" + _SEP + r"\d{4}"                                     # mobile
    r"|\(0(?:2|[3-6][1-5]|70)\)\s?\d{3,4}" + _SEP + r"\d{4}"                                 # (02) 123-4567
    r"|0(?:2|[3-6][1-5]|70|50\d)[\-. ]\d{3,4}[\-. ]\d{4}"                                     # 02-123-4567
    r"|0(?:2|[3-6][1-5]|70)\d{7,8}"                                                          # 0212345678
    r"|1[568]\d{2}-\d{4}"                                                                    # 1588-1234
    r")" + _R)
_ACCOUNT = re.compile(_L + r"(?:\d{2,7}(?:-\d{2,7}){1,3}|\d{10,14})" + _R)
_PASSPORT = re.compile(r"(?<![A-Za-z0-9])(?:[MSRGDT]\d{8}|[MSRGDT]\d{3}[A-Z]\d{4})(?![A-Za-z0-9])")
_IPV4 = re.compile(r"(?<![0-9.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                   r"(?![0-9])(?!\.[0-9])")
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")

_BANK_WORDS = re.compile(
    r"계좌|입금|송금|이체|예금주|은행|뱅크|국민|신한|우리|하나|농협|기업|카카오|토스|새마을|우체국|수협|신협|씨티|"
    r"SC제일|부산|대구|경남|광주|전북|제주|산업|account|bank|IBAN", re.IGNORECASE)
_PASSPORT_WORDS = re.compile(r"여권|passport", re.IGNORECASE)
_PHONE_WORDS = re.compile(r"전화|대표|고객센터|콜센터|문의|연락|휴대폰|핸드폰|상담|번호|tel|call|phone|☎", re.IGNORECASE)
_IP_WORDS = re.compile(r"ip|아이피|주소|서버|접속|host|server|address", re.IGNORECASE)
_VERSION_WORDS = re.compile(r"(?:버전|version|ver\.?|v)\s*$", re.IGNORECASE)

_RRN_WEIGHTS = (2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5)
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def rrn_checksum_ok(digits: str) -> bool:
    """The pre-2020 주민등록번호 check digit: (11 - sum(d_i * w_i) mod 11) mod 10 == d_13."""
    if len(digits) != 13 or not digits.isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits, _RRN_WEIGHTS))
    return (11 - total % 11) % 10 == int(digits[12])


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _real_date(mm: str, dd: str) -> bool:
    m, d = int(mm), int(dd)
    return 1 <= m <= 12 and 1 <= d <= _DAYS[m - 1]


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _rrn_spans(text: str):
    for m in _RRN.finditer(text):
        _yy, mm, dd, sep, _g, tail = m.groups()
        if not _real_date(mm, dd):
            continue
        if not sep and not (tail.isdigit() and rrn_checksum_ok(_digits(m.group()))):
            continue  # 13 bare digits: only with a valid checksum
        yield m.start(), m.end()


def _card_spans(text: str):
    for m in _CARD.finditer(text):
        digits = _digits(m.group())
        # issuer numbers start with 2-6 (international brands) or 9 (Korean domestic cards); 0000... is filler
        if digits[0] in "234569" and len(set(digits)) > 1 and luhn_ok(digits):
            yield m.start(), m.end()


def _phone_spans(text: str):
    for m in _PHONE.finditer(text):
        s = m.group()
        if s.startswith("1") and "-" in s:  # 1588-1234, unless it reads as a year range ("1592-1598")
            a, b = (int(x) for x in s.split("-"))
            is_range = 1500 <= a < b <= 2100 or text[m.end():m.end() + 1] == "년"
            if is_range and not _PHONE_WORDS.search(text[max(0, m.start() - 15):m.start()]):
                continue
        yield m.start(), m.end()


def _account_spans(text: str):
    for m in _ACCOUNT.finditer(text):
        if 10 <= len(_digits(m.group())) <= 14 and _BANK_WORDS.search(text[max(0, m.start() - 20):m.start()]):
            yield m.start(), m.end()


def _passport_spans(text: str):
    for m in _PASSPORT.finditer(text):
        if _PASSPORT_WORDS.search(text[max(0, m.start() - 30):m.start()]):
            yield m.start(), m.end()


def _ip_spans(text: str):
    for m in _IPV4.finditer(text):
        before = text[max(0, m.start() - 20):m.start()]
        if before[-1:].isalnum() or _VERSION_WORDS.search(before[-12:]):
            continue  # "람보1.2.3.4", "버전 1.2.3.4": a title or a version, not an address
        if all(len(o) == 1 for o in m.group().split(".")) and not _IP_WORDS.search(before):
            continue  # "1.2.3.4" alone reads as a list of parts; an address needs "IP"/"서버"/... before it
        yield m.start(), m.end()
    for m in _IPV6.finditer(text):
        s = m.group()
        if s.count(":") < 2 or not any(c.isalnum() for c in s):
            continue
        groups = [g for g in s.split(":") if g]
        if len(groups) < 3 and "::" not in s:
            continue
        if not any(len(g) >= 3 or any(c in "abcdefABCDEF" for c in g) for g in groups):
            continue  # "10:30:15" is a time
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        yield m.start(), m.end()


_FINDERS = {
    "email": lambda t: ((m.start(), m.end()) for m in _EMAIL.finditer(t)),
    "rrn": _rrn_spans,
    "card": _card_spans,
    "phone": _phone_spans,
    "account": _account_spans,
    "passport": _passport_spans,
    "ip": _ip_spans,
}


def find_pii(text: str, kinds: tuple[str, ...] | list[str] = PII_TYPES) -> list[PiiSpan]:
    """Non-overlapping PII spans in `text`, in text order; earlier kinds in PII_TYPES win overlaps."""
    taken: list[tuple[int, int]] = []
    spans: list[PiiSpan] = []
    if not any(c.isdigit() or c == "@" or c == ":" for c in text):
        return spans  # every type needs a digit, an @ or (IPv6) a colon
    for kind in PII_TYPES:
        if kind not in kinds:
            continue
        for start, end in _FINDERS[kind](text):
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            spans.append(PiiSpan(kind, start, end, text[start:end]))
    return sorted(spans, key=lambda s: s.start)


def redact(text: str, kinds: tuple[str, ...] | list[str] = PII_TYPES) -> tuple[str, Counter]:
    """`text` with every PII span replaced by its placeholder, and the count per type."""
    spans = find_pii(text, kinds)
    if not spans:
        return text, Counter()
    out, last = [], 0
    for s in spans:
        out.append(text[last:s.start])
        out.append(placeholder(s.kind))
        last = s.end
    out.append(text[last:])
    return "".join(out), Counter(s.kind for s in spans)


class RedactPII(PipelineStep):
    """datatrove step: replaces personal data with typed placeholders; never drops a document.

    The counts go to `changes` (`pii_<type>` spans replaced, `docs_with_pii`), and each document with a
    replacement records its own counts in `metadata["pii"]`.
    """

    type = "🕵 - FORMAT"
    name = "🕵 Korean PII"

    def __init__(self, kinds: list[str] | tuple[str, ...] = PII_TYPES):
        super().__init__()
        unknown = sorted(set(kinds) - set(PII_TYPES))
        if unknown:
            raise ConfigError(f"pii.types: unknown {unknown}; known: {', '.join(PII_TYPES)}")
        self.kinds = tuple(kinds)
        self.changes: Counter = Counter()

    def run(self, data, rank: int = 0, world_size: int = 1):
        for doc in data:
            with self.track_time():
                text, counts = redact(doc.text, self.kinds)
                if counts:
                    doc.text = text
                    doc.metadata["pii"] = dict(counts)
                    self.changes["docs_with_pii"] += 1
                    for kind, n in counts.items():
                        self.changes[f"pii_{kind}"] += n
            yield doc
