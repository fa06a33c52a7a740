"""Step 3, quality: datatrove's Gopher and FineWeb heuristics, with per-language thresholds.

The filters are datatrove's own (`GopherQualityFilter`, `FineWebQualityFilter`, `GopherRepetitionFilter`);
what is ours is only the routing: a datatrove filter is built for one language, and our documents arrive
in several, so `ByLanguage` holds one instance per language route and asks the one that matches the
document's `lang` (set by the language step). Korean ("ko", and "mixed" Korean-with-English) gets
FineWeb-2's `kor_Hang` thresholds and Kiwi words; English gets datatrove's defaults, which are the values
FineWeb (English) ran with. The numbers live in the recipe YAML files, each with its source.

Order and speed. FineWeb-2 ran repetition -> FineWeb quality -> Gopher quality. A chain of filters keeps
exactly the documents that pass all of them, whatever the order, so we order them by cost: Kiwi is the
expensive part (about 30,000 characters per CPU second here), and two exact shortcuts avoid it:

1. `fineweb_quality` first. Its checks on line punctuation and duplicated lines need no words; the one that
   does (newlines per word) is 0 for a one-line document whatever the words are, so
   `ShortCircuitFineWebQuality` decides one-line documents with a whitespace split instead of Kiwi.
2. `gopher_quality` next. Every non-symbol word holds a character outside punctuation and spaces, and a
   tokenizer gives at most `max_words_per_char` words per character (1 for English; 2 for Kiwi, which
   splits a contracted syllable such as 했 into two morphemes), so a document with fewer than
   `min_doc_words / max_words_per_char` such characters cannot pass: `ShortCircuitGopherQuality` rejects it
   untokenized.
3. `gopher_repetition` last, on few documents, reusing the words already computed (datatrove caches the
   last few tokenizations, and all filters of one language share one tokenizer object).

Both shortcuts give datatrove's verdict and reason exactly (tests/test_curate_steps.py checks this on real
reviews). The order only changes which reason a document failing several checks is counted under.

A filter that raises on an odd document (datatrove's FineWeb filter divides by the word count, for one)
does not crash the worker: `ByLanguage` drops that document as `error_<ExceptionName>` and counts it.
"""

from __future__ import annotations

import inspect
from typing import Any

from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import PUNCTUATION_SET

from kfoundry.data.curate.words import KoreanWords, LatinWords, SpaceWords

# Step name -> datatrove class, in the order the steps run.
QUALITY_FILTERS: dict[str, type] = {
    "fineweb_quality": FineWebQualityFilter,
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
}
# Which thresholds each language route uses.
ROUTE_THRESHOLDS = {"ko": "ko", "mixed": "ko", "en": "en"}


def max_words(text: str) -> int:
    """Characters that can carry a non-symbol word: neither datatrove punctuation nor whitespace.

    A non-symbol word (Gopher's count) holds at least one of them; times the tokenizer's
    `max_words_per_char`, this bounds the number of such words.
    """
    return sum(1 for c in text if c not in PUNCTUATION_SET and not c.isspace())


class ShortCircuitGopherQuality(GopherQualityFilter):
    """GopherQualityFilter that rejects obviously short documents without tokenizing them (same verdict).

    Only for tokenizers that declare `max_words_per_char`; with a language code it is datatrove's filter.
    """

    def filter(self, doc) -> bool | tuple[bool, str]:
        per_char = getattr(self.language, "max_words_per_char", None)
        if self.min_doc_words and per_char and max_words(doc.text) * per_char < self.min_doc_words:
            return False, "gopher_short_doc"
        return super().filter(doc)


class ShortCircuitFineWebQuality(FineWebQualityFilter):
    """FineWebQualityFilter that judges one-line documents without the language's tokenizer (same verdict).

    Its only word-based rule is `newlines / words > new_line_ratio`, which is 0 for a document without a
    newline, whatever the words; a clone with a whitespace tokenizer gives the same answer for such documents.
    """

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self._one_line = FineWebQualityFilter(**{**kwargs, "language": SpaceWords()})

    def filter(self, doc) -> bool | tuple[bool, str]:
        if "\n" not in doc.text and doc.text.strip():
            return self._one_line.filter(doc)
        return super().filter(doc)


_CLASSES = {"gopher_quality": ShortCircuitGopherQuality, "fineweb_quality": ShortCircuitFineWebQuality,
            "gopher_repetition": GopherRepetitionFilter}


class ByLanguage(BaseFilter):
    """One datatrove filter per language route; documents of a route without a filter pass unchanged."""

    def __init__(self, step: str, filters: dict[str, BaseFilter], exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.step = step
        self.filters = filters
        self.name = f"{next(iter(filters.values())).name} by language" if filters else step

    def filter(self, doc) -> bool | tuple[bool, str]:
        inner = self.filters.get(doc.metadata.get("lang"))
        if inner is None:
            return True
        try:
            return inner.filter(doc)
        except Exception as e:  # one odd document must not stop a worker; it is counted instead
            return False, f"error_{type(e).__name__}"


def check_thresholds(thresholds: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Fail early (at recipe load) on a misspelt filter or argument name."""
    for lang, steps in thresholds.items():
        if not isinstance(steps, dict):
            raise ValueError(f"quality.thresholds.{lang} must be a mapping of filter name -> arguments")
        for step, kwargs in steps.items():
            if step not in QUALITY_FILTERS:
                raise ValueError(f"quality.thresholds.{lang}: unknown filter {step!r}; "
                                 f"known: {', '.join(QUALITY_FILTERS)}")
            allowed = set(inspect.signature(QUALITY_FILTERS[step].__init__).parameters) - {
                "self", "exclusion_writer", "language"}
            bad = sorted(set(kwargs or {}) - allowed)
            if bad:
                raise ValueError(f"quality.thresholds.{lang}.{step}: unknown argument(s) {bad}; "
                                 f"{QUALITY_FILTERS[step].__name__} takes {sorted(allowed)}")


def build_quality_steps(thresholds: dict[str, dict[str, dict[str, Any]]], kiwi_model: str
                        ) -> list[tuple[str, ByLanguage]]:
    """[(step name, ByLanguage filter)] in run order, for the languages the thresholds name.

    All filters of one language share one tokenizer object, so datatrove's small cache of the last
    tokenized texts lets the three filters tokenize each document once.
    """
    check_thresholds(thresholds)
    words = {"ko": KoreanWords(kiwi_model), "en": LatinWords()}
    steps = []
    for step in QUALITY_FILTERS:
        filters: dict[str, BaseFilter] = {}
        for route, lang in ROUTE_THRESHOLDS.items():
            kwargs = (thresholds.get(lang) or {}).get(step)
            if kwargs is None:
                continue
            filters[route] = _CLASSES[step](language=words[lang], **dict(kwargs))
        if filters:
            steps.append((step, ByLanguage(step, filters)))
    return steps
