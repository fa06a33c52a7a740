"""Step 2, language: route each document by the script of its letters, offline.

datatrove's `LanguageFilter` downloads a fastText/GlotLID model at run time; we cannot (offline machines,
reproducible runs) and for Korean we do not need to: Hangul is used by one language only, so the share of
letters that are Hangul (kfoundry.text.hangul_share) is a reliable, free language signal. Latin letters
are taken as English; we do not tell English from other Latin-script languages offline.

Routes (thresholds are recipe keys under `language:`):

    no letters at all                      -> "none"    (digits, emoji, punctuation only)
    hangul_share >= ko_min_hangul          -> "ko"
    hangul_share >= mixed_min_hangul       -> "mixed"   Korean text with much English/code in it
    latin_share  >= en_min_latin           -> "en"
    otherwise                              -> "other"   (Japanese, Chinese, Cyrillic, ...)

A document whose route is not in `keep` is dropped with reason `lang_<route>`. Kept documents carry
`lang`, `hangul_share` and `latin_share` in their metadata; the quality step picks its thresholds by
`lang` ("mixed" documents get the Korean ones: they are Korean pages that quote English).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kfoundry.data.curate.lean import LeanFilter
from kfoundry.errors import ConfigError
from kfoundry.text import HANGUL_LETTER

ROUTES = ("ko", "mixed", "en", "other", "none")


@dataclass
class LanguageConfig:
    keep: list[str] = field(default_factory=lambda: ["ko", "mixed"])
    ko_min_hangul: float = 0.5
    mixed_min_hangul: float = 0.15
    en_min_latin: float = 0.8

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep) - set(ROUTES))
        if unknown or not self.keep:
            raise ConfigError(f"language.keep must list routes among {', '.join(ROUTES)}; got {self.keep}")
        if not 0.0 < self.mixed_min_hangul <= self.ko_min_hangul <= 1.0:
            raise ConfigError("language: need 0 < mixed_min_hangul <= ko_min_hangul <= 1")
        if not 0.0 < self.en_min_latin <= 1.0:
            raise ConfigError("language: en_min_latin must be in (0, 1]")


def latin_share(text: str) -> float:
    """Share of letters that are Latin (Basic Latin .. Latin Extended-B); 0.0 without letters."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if c < "\u0250") / len(letters)


# The letters that latin_share counts, as a character class (Hangul: kfoundry.text.HANGUL_LETTER), so that
# one regex pass in C counts them (a Python loop per character was most of this step's time). Every code
# point listed is a letter (str.isalpha), so the counts equal those of latin_share (tests/test_curate_steps.py).
_LATIN_LETTER = re.compile("[A-Za-z\u00aa\u00b5\u00ba\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f]")


def shares(text: str) -> tuple[int, float, float]:
    """(letters, hangul share, latin share) of a text, as hangul_share and latin_share compute them."""
    letters = sum(map(str.isalpha, text))
    if not letters:
        return 0, 0.0, 0.0
    return letters, len(HANGUL_LETTER.findall(text)) / letters, len(_LATIN_LETTER.findall(text)) / letters


def route(text: str, cfg: LanguageConfig) -> tuple[str, float, float]:
    """(route, hangul share, latin share) of one text."""
    letters, hangul, latin = shares(text)
    if not letters:
        return "none", 0.0, 0.0
    if hangul >= cfg.ko_min_hangul:
        return "ko", hangul, latin
    if hangul >= cfg.mixed_min_hangul:
        return "mixed", hangul, latin
    if latin >= cfg.en_min_latin:
        return "en", hangul, latin
    return "other", hangul, latin


class LanguageRouter(LeanFilter):
    """datatrove step: tags `lang`, `hangul_share`, `latin_share`; drops routes the recipe does not keep."""

    name = "🔤 Language routing (Hangul share)"

    def __init__(self, cfg: LanguageConfig, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.cfg = cfg
        self.keep = frozenset(cfg.keep)

    def filter(self, doc) -> bool | tuple[bool, str]:
        lang, hangul, latin = route(doc.text, self.cfg)
        doc.metadata["lang"] = lang
        doc.metadata["hangul_share"] = round(hangul, 3)
        doc.metadata["latin_share"] = round(latin, 3)
        if lang not in self.keep:
            return False, f"lang_{lang}"
        return True
