"""Text normalisation shared by every entry point (corpus, tokenizer, serving).

We normalise to NFC and never NFKC: NFKC folds full-width forms, circled numbers and compatibility jamo
into other characters, which changes meaning in Korean text; NFC only composes decomposed Hangul
(e.g. macOS file names and some web text arrive as NFD jamo sequences) into the syllables users typed.
"""

from __future__ import annotations

import re
import unicodedata


def nfc(text: str) -> str:
    # is_normalized is a fast check; most text is already NFC, so skip the copy.
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def is_hangul_syllable(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3"


# The Hangul letters: syllables, conjoining jamo and compatibility jamo (every code point listed is a letter,
# str.isalpha, so counting matches of this class counts Hangul letters). One regex pass in C instead of a
# Python loop per character: this runs on every document a corpus reader yields (tests/test_curate_steps.py
# checks the counts against the per-character rule on every code point below U+3190).
HANGUL_LETTER = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3131-\u318e]")


def hangul_share(text: str) -> float:
    """Share of letters that are Hangul syllables or jamo (0.0 for text without letters)."""
    letters = sum(map(str.isalpha, text))
    if not letters:
        return 0.0
    return len(HANGUL_LETTER.findall(text)) / letters
