"""Text normalisation shared by every entry point (corpus, tokenizer, serving).

We normalise to NFC and never NFKC: NFKC folds full-width forms, circled numbers and compatibility jamo
into other characters, which changes meaning in Korean text; NFC only composes decomposed Hangul
(e.g. macOS file names and some web text arrive as NFD jamo sequences) into the syllables users typed.
"""

from __future__ import annotations

import unicodedata


def nfc(text: str) -> str:
    # is_normalized is a fast check; most text is already NFC, so skip the copy.
    return text if unicodedata.is_normalized("NFC", text) else unicodedata.normalize("NFC", text)


def is_hangul_syllable(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3"


def hangul_share(text: str) -> float:
    """Share of letters that are Hangul syllables or jamo (0.0 for text without letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    hangul = sum(1 for c in letters if is_hangul_syllable(c) or "\u1100" <= c <= "\u11ff" or "\u3130" <= c <= "\u318f")
    return hangul / len(letters)
