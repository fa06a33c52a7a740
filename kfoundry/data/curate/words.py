"""Word tokenizers handed to datatrove's filters and dedup blocks.

datatrove's quality filters (Gopher, FineWeb) and MinHash count *words*; which words depends on the
tokenizer the block is given (`language=` accepts a `WordTokenizer` object as well as a language code).
We give each block one of these:

- `KoreanWords`: Kiwi morphemes, as FineWeb-2 does for `kor_Hang` (datatrove's `KiwiTokenizer`). FineWeb-2's
  Korean thresholds (average word length 1-6, stop words such as 의/는/에서) were measured on Kiwi
  morphemes, so an eojeol (space) split would be the wrong ruler for them. Two changes from datatrove's
  class: the Kiwi model is `knlm` by default (datatrove uses `sbg`; `knlm` analyses several times more characters
  per CPU second -- docs/benchmarks.md, bench/kiwi_models.py -- and both segment ordinary prose almost identically;
  a recipe can ask for `sbg` with `quality.kiwi_model`), and the loaded model is cached per process, so the
  many copies of a pipeline a local executor makes do not each spend seconds loading it again.
- `LatinWords`: a regular-expression tokenizer for English. datatrove assigns spaCy's blank English
  tokenizer, which would add spaCy as a dependency for a rule that is, in effect, "runs of letters and
  digits, with punctuation as its own token"; this regex follows the same rule.
- `SpaceWords`: a plain whitespace split of text that datatrove's `simplify_text` has already lower-cased
  and stripped of punctuation; used for MinHash and decontamination, where one block sees every language.
  For Korean a space-separated word is an eojeol. That is also what FineWeb-2's MinHash effectively used:
  datatrove's default simplification strips diacritics through NFD, which decomposes every Hangul syllable
  into jamo, and Kiwi, handed jamo, returns whole eojeols (we keep NFC instead; see stages.py).

The tokenizers are plain objects with no loaded state, so they pickle cheaply into worker processes.
"""

from __future__ import annotations

import functools
import itertools
import operator
import re
from typing import Any

from datatrove.utils.word_tokenizers import KiwiTokenizer, WordTokenizer
from kiwipiepy import Kiwi

from kfoundry.errors import ConfigError

KIWI_MODELS = ("knlm", "sbg")

# Runs of letters/digits (with inner apostrophes or hyphens: "don't", "state-of-the-art"), else one symbol.
_LATIN_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*|[^\w\s]|_+")
_SENTENCE = re.compile(r"[^.!?。？！\n]+(?:[.!?。？！]+|\n|$)")


@functools.lru_cache(maxsize=None)
def _kiwi(model_type: str) -> Any:
    """One loaded Kiwi model per process and model type (loading takes seconds; analysing is the hot path)."""
    return Kiwi(model_type=model_type)


class KoreanWords(KiwiTokenizer):
    """datatrove's Kiwi tokenizer with a choice of model and a per-process model cache.

    `max_words_per_char`: datatrove cuts each Kiwi morpheme out of the text by its span, and a contracted
    syllable is two morphemes with the same span (했 = 하 + 었 gives the words "했", "했"; 섰었 gives four).
    A Hangul syllable fuses at most a stem and one ending, so a text has at most two words per character;
    the quality step uses this bound to skip Kiwi for documents that cannot reach a minimum word count.
    `est_words_per_char` is the tighter ratio real text stays under, for the optional estimate.
    """

    max_words_per_char = 2
    # Measured, not proven: the most Kiwi words per non-punctuation character among NSMC reviews was 1.12
    # (contractions: 했다 gives 했, 했, 다). Used only when a recipe asks for the estimate (quality.py, 2c).
    est_words_per_char = 1.2

    def __init__(self, model_type: str = "knlm"):
        if model_type not in KIWI_MODELS:
            raise ConfigError(f"unknown Kiwi model {model_type!r}; choose one of {', '.join(KIWI_MODELS)}")
        super().__init__(model_type=model_type)

    @property
    def tokenizer(self) -> Any:
        return _kiwi(self.model_type)


class LatinWords(WordTokenizer):
    """Words of Latin-script text: letter/digit runs, each punctuation mark a token of its own."""

    max_words_per_char = 1  # words are disjoint pieces of the text

    def __init__(self) -> None:
        super().__init__(language="en")

    def word_tokenize(self, text: str) -> list[str]:
        return _LATIN_WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in _SENTENCE.finditer(text) if m.group().strip()]


class SpaceWords(WordTokenizer):
    """Whitespace-separated words; for text already simplified by datatrove's `simplify_text`."""

    def __init__(self) -> None:
        super().__init__(language="space")

    def word_tokenize(self, text: str) -> list[str]:
        return text.split()

    def sent_tokenize(self, text: str) -> list[str]:
        return [line for line in text.splitlines() if line.strip()]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(m.start(), m.end()) for m in re.finditer(r"[^\n]+", text) if m.group().strip()]


class JoinedWords:
    """Words joined once with a separator; every n-gram of them is a slice of that one string.

    `grams(n)` is `[sep.join(words[i:i + n]) for i in range(len(words) - n + 1)]`, built without a join per
    position; the word offsets are computed once (in C: map/accumulate) and shared by every n, so the nine
    n-gram sizes of the repetition rules cost two joins per document instead of nine.
    """

    def __init__(self, words: list[str], sep: str):
        self.text = sep.join(words)
        self.cut = len(sep)
        # start of word i in `text` (and, one past the end, len(text) + len(sep))
        self.starts = list(itertools.accumulate(map(operator.add, map(len, words), itertools.repeat(self.cut)),
                                                initial=0))

    def grams(self, n: int) -> list[str]:
        text, cut, starts = self.text, self.cut, self.starts
        return [text[a:b - cut] for a, b in zip(starts, starts[n:])]
