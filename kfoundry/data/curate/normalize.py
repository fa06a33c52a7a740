"""Step 1, normalize: make every document's text clean Unicode before anything measures it.

In order, for each document:

1. **Length guard.** A document longer than `max_chars` is dropped as `too_long` before any work is spent on
   it (one runaway 100 MB "document" would otherwise stall a worker and skew every ratio downstream).
2. **Binary junk.** If more than `max_junk_fraction` of the characters are control characters, U+FFFD
   replacement characters or private-use code points, the text is not language: dropped as `binary_junk`.
3. **Korean mojibake (CP949 read as Latin-1).** Korean pages saved as EUC-KR/CP949 and decoded as Latin-1
   arrive as "¾È³çÇÏ¼¼¿ä". ftfy does not handle this legacy Korean case, so we do: text made only of
   Latin-1 characters, many of them in the CP949 lead/trail byte range, is re-encoded and decoded as CP949,
   and the repair is kept only if the result is mostly Hangul (`mojibake_cp949_fixed`).
4. **UTF-8 mojibake** ("ì•ˆë…•" for "안녕") is repaired with ftfy, configured so that it changes nothing
   else: no full-width folding, no quote uncurling, no ligature splitting (those are NFKC-like and change
   Korean text; see kfoundry.text). ftfy only runs on texts holding a character that mojibake produces.
5. **Line breaks, controls, spaces.** CRLF/CR become LF; C0/C1 control characters (except tab and newline),
   BOMs and zero-width spaces are removed; exotic spaces (NBSP, thin spaces) become a plain space; trailing
   spaces are trimmed per line and runs of blank lines are cut to one. Leading indentation is kept, because
   code and poetry need it.
6. **NFC** (never NFKC).
7. **Length limits** again on the clean text: `empty`, `too_short` (< `min_chars`), `too_long`.

Each repair is counted under a named change (`changes`), each drop under a named reason.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import ftfy

from kfoundry.data.curate.lean import LeanFilter
from kfoundry.errors import ConfigError
from kfoundry.text import hangul_share, nfc

TOO_LONG, BINARY_JUNK, EMPTY, TOO_SHORT = "too_long", "binary_junk", "empty", "too_short"

# Characters that only garbage carries: C0/C1 controls other than \t \n \r, U+FFFD, private use, non-characters.
_JUNK = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\ufffe\uffff]")
_REMOVE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b\u2060\ufffe\uffff]")
_EXOTIC_SPACE = re.compile("[\xa0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING_SPACE = re.compile(r"[ \t]+(?=\n|$)")
_BLANK_RUNS = re.compile(r"\n{3,}")
# Characters that UTF-8 mojibake is made of (Latin-1 supplement and the CP1252 extras); Hangul/ASCII text
# without any of them cannot be UTF-8 mojibake, so ftfy is skipped for it.
_MOJIBAKE_HINT = re.compile("[\x80-\xff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc"
                            "\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
_CP949_BYTE = re.compile("[\xa1-\xfe]")
# Everything steps 2-5 act on, in one class: a text without any of it comes out of them unchanged, so the
# common case (plain Hangul/ASCII text) goes straight to NFC. Why that is exact, rule by rule:
# - junk: every _JUNK character is in the class, so the junk fraction is 0 (the limit is > 0);
# - CP949 repair: it needs at least 4 characters in \xa1-\xfe, all in the class;
# - ftfy: it only runs on texts with a _MOJIBAKE_HINT character, all in the class;
# - CR, _REMOVE and _EXOTIC_SPACE characters are in the class; _TRAILING_SPACE needs a space or tab before a
#   newline or the end, _BLANK_RUNS three newlines, strip("\n") a newline at the start or the end: the
#   alternatives after the class. (\t and \n themselves are left out of it: they are kept as they are.)
_NEEDS_REPAIR = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\xff\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u1680"
    "\u2000-\u200b\u202f\u205f\u2060\u2013\u2014\u2018-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac"
    "\u2122\ue000-\uf8ff\ufeff\ufffd-\uffff]|[ \t](?=\n|\\Z)|\n\n\n|\\A\n|\n\\Z")


@dataclass
class NormalizeConfig:
    min_chars: int = 1
    max_chars: int = 1_000_000
    max_junk_fraction: float = 0.1
    fix_mojibake: bool = True

    def __post_init__(self) -> None:
        if self.min_chars < 1 or self.max_chars < self.min_chars:
            raise ConfigError(f"normalize: need 1 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        if not 0.0 < self.max_junk_fraction <= 1.0:
            raise ConfigError(f"normalize: max_junk_fraction must be in (0, 1], got {self.max_junk_fraction}")


def junk_fraction(text: str) -> float:
    return len(_JUNK.findall(text)) / len(text) if text else 0.0


def repair_cp949(text: str) -> str | None:
    """The Hangul text that CP949 bytes decoded as Latin-1 stood for, or None if `text` is not that."""
    if not text or max(text) > "\xff":
        return None
    high = len(_CP949_BYTE.findall(text))
    if high < 4 or high < 0.3 * sum(1 for c in text if not c.isspace()):
        return None
    try:
        fixed = text.encode("latin-1").decode("cp949")
    except UnicodeError:
        return None
    return fixed if hangul_share(fixed) >= 0.5 else None


def _ftfy_config():
    # Only the repairs that undo damage; everything that would rewrite legitimate text is off.
    return ftfy.TextFixerConfig(
        unescape_html=False, fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False,
        fix_line_breaks=False, remove_control_chars=False, normalization=None, explain=False,
    )


def normalize_text(text: str, cfg: NormalizeConfig, changes: Counter | None = None,
                   ftfy_config=None, precheck: bool = True) -> tuple[str | None, str | None]:
    """(clean text, None) or (None, drop reason). Repairs are added to `changes`.

    precheck: skip steps 2-5 for a text that holds nothing they act on (`_NEEDS_REPAIR`; the result is the
    same either way, tests/test_curate_steps.py compares both on NSMC and crafted inputs).
    """
    changes = changes if changes is not None else Counter()
    if len(text) > cfg.max_chars:
        return None, TOO_LONG
    if precheck and not _NEEDS_REPAIR.search(text):
        out = text
    else:
        out, reason = _repair(text, cfg, changes, ftfy_config)
        if reason:
            return None, reason
    normal = nfc(out)
    if normal is not out:
        changes["nfc_changed"] += 1
    if not normal.strip():
        return None, EMPTY
    if len(normal) < cfg.min_chars:
        return None, TOO_SHORT
    if len(normal) > cfg.max_chars:
        return None, TOO_LONG
    return normal, None


def _repair(text: str, cfg: NormalizeConfig, changes: Counter, ftfy_config) -> tuple[str, str | None]:
    """Steps 2-5 of the module docstring: (repaired text, None) or (text, drop reason)."""
    if junk_fraction(text) > cfg.max_junk_fraction:
        return text, BINARY_JUNK
    out = text
    if cfg.fix_mojibake:
        fixed = repair_cp949(out)
        if fixed is not None:
            out = fixed
            changes["mojibake_cp949_fixed"] += 1
        elif _MOJIBAKE_HINT.search(out):
            fixed = ftfy.fix_text(out, ftfy_config or _ftfy_config())
            if fixed != out:
                out = fixed
                changes["mojibake_fixed"] += 1
    lines = out.replace("\r\n", "\n").replace("\r", "\n")
    out = _REMOVE.sub("", lines)
    if len(out) != len(lines):
        changes["controls_removed"] += 1
    spaced = _EXOTIC_SPACE.sub(" ", out)
    spaced = _BLANK_RUNS.sub("\n\n", _TRAILING_SPACE.sub("", spaced)).strip("\n")
    if spaced != out:
        changes["whitespace_normalized"] += 1
    return spaced, None


class Normalize(LeanFilter):
    """datatrove step: rewrites `doc.text` in place, drops what cannot be text (see module docstring)."""

    name = "🧽 Normalize (kfoundry)"

    def __init__(self, cfg: NormalizeConfig, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.cfg = cfg
        self.changes: Counter = Counter()
        self._ftfy = None

    def filter(self, doc) -> bool | tuple[bool, str]:
        if self._ftfy is None and self.cfg.fix_mojibake:
            self._ftfy = _ftfy_config()
        text, reason = normalize_text(doc.text, self.cfg, self.changes, self._ftfy)
        if reason:
            return False, reason
        doc.text = text
        return True
