"""Step 3, quality: datatrove's Gopher and FineWeb heuristics, with per-language thresholds.

The filters are datatrove's own (`GopherQualityFilter`, `FineWebQualityFilter`, `GopherRepetitionFilter`);
what is ours is only the routing: a datatrove filter is built for one language, and our documents arrive
in several, so `ByLanguage` holds one instance per language route and asks the one that matches the
document's `lang` (set by the language step). Korean ("ko", and "mixed" Korean-with-English) gets
FineWeb-2's `kor_Hang` thresholds and Kiwi words; English gets datatrove's defaults, which are the values
FineWeb (English) ran with. The numbers live in the recipe YAML files, each with its source.

Order and speed. FineWeb-2 ran repetition -> FineWeb quality -> Gopher quality. A chain of filters keeps
exactly the documents that pass all of them, whatever the order, so we order them by cost: Kiwi is the
expensive part (its rate: docs/benchmarks.md, bench/kiwi_models.py), and checks that need no words run first:

1. `fineweb_quality` first. Its checks on line punctuation and duplicated lines need no words; the one that
   does (newlines per word) is 0 for a one-line document whatever the words are, so
   `ShortCircuitFineWebQuality` decides one-line documents with a whitespace split instead of Kiwi.
2. `gopher_quality` next (`ShortCircuitGopherQuality`), which tries, before any tokenizing:
   a. the proven word bound: every non-symbol word holds a character outside punctuation and spaces, and a
      tokenizer gives at most `max_words_per_char` words per character (1 for English; 2 for Kiwi, which
      splits a contracted syllable such as 했 into two morphemes), so a document with fewer than
      `min_doc_words / max_words_per_char` such characters cannot pass;
   b. Gopher's own word-free rules, moved ahead of the word-based ones: lines starting with a bullet, lines
      ending with an ellipsis; and a necessary condition of its stop-word rule: a word is a piece of the
      text, so a stop word can only be among the words if it occurs in the text at all;
   c. (`estimate=True`, the recipes' `quality.estimate_short_docs`) an *estimate* instead of the bound of
      (a): real Korean text has at most about 1.1 Kiwi words per such character (the largest ratio among
      the NSMC reviews we measured; 2 needs text made of contractions only), so a document with fewer than
      `min_doc_words / est_words_per_char` (1.2 for Kiwi) is taken as short untokenized. Unlike (a) and (b)
      this can differ from datatrove's verdict, on contrived text such as "했다 봤다 됐다 ..." repeated;
      `bench/curate_anchor.py` measures how often it does on real text.
3. `gopher_repetition` last, on few documents, reusing the words already computed (datatrove caches the
   last few tokenizations, and all filters of one language share one tokenizer object). Its n-gram
   statistics are computed by `FastGopherRepetition` from slices of one joined string instead of a join per
   position (and a set answers "no repeated n-gram" at once), with datatrove's exact values; on long
   documents this was ~15% of our time next to Kiwi's.

(a), (b) and the one-line shortcut give datatrove's keep/remove verdict exactly (tests/test_curate_steps.py
checks this on real reviews); the reason can differ, because a document failing several rules is counted
under the first one that ran. The order only changes which reason such a document is counted under.

A filter that raises on an odd document (datatrove's FineWeb filter divides by the word count, for one)
does not crash the worker: `ByLanguage` drops that document as `error_<ExceptionName>` and counts it.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from typing import Any

from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.text import PUNCTUATION_SET, split_into_words

from kfoundry.data.curate.lean import LeanFilter
from kfoundry.data.curate.words import JoinedWords, KoreanWords, LatinWords
from kfoundry.errors import ConfigError

# Step name -> datatrove class, in the order the steps run.
QUALITY_FILTERS: dict[str, type] = {
    "fineweb_quality": FineWebQualityFilter,
    "gopher_quality": GopherQualityFilter,
    "gopher_repetition": GopherRepetitionFilter,
}
# Which thresholds each language route uses.
ROUTE_THRESHOLDS = {"ko": "ko", "mixed": "ko", "en": "en"}


# datatrove's punctuation characters and whitespace (re's \s is str.isspace), for one regex pass in C.
_NOT_WORD_CHAR = re.compile("[\\s" + "".join(re.escape(c) for c in sorted(PUNCTUATION_SET)) + "]")


def max_words(text: str) -> int:
    """Characters that can carry a non-symbol word: neither datatrove punctuation nor whitespace.

    A non-symbol word (Gopher's count) holds at least one of them; times the tokenizer's
    `max_words_per_char`, this bounds the number of such words.
    """
    return len(text) - len(_NOT_WORD_CHAR.findall(text))


class ShortCircuitGopherQuality(GopherQualityFilter):
    """GopherQualityFilter that rejects documents it can judge without words first (see the module docstring).

    The word bound and the estimate need a tokenizer that declares `max_words_per_char` (and
    `est_words_per_char`); with a language code only the word-free rules run early.
    """

    def __init__(self, estimate: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        per_char = getattr(self.language, "max_words_per_char", None)
        est = getattr(self.language, "est_words_per_char", None) if estimate else None
        # below this many non-punctuation characters a document cannot (or, estimated, does not) reach
        # min_doc_words
        self._min_chars = 0
        if self.min_doc_words and (est or per_char):
            self._min_chars = self.min_doc_words / (est or per_char)

    def early_verdict(self, text: str) -> tuple[bool, str] | None:
        """A rejection decided without words, or None when the words are needed."""
        if self._min_chars and max_words(text) < self._min_chars:
            return False, "gopher_short_doc"
        lines = text.splitlines()
        if lines and self.max_bullet_lines_ratio and sum(
                s.lstrip().startswith("•") or s.lstrip().startswith("-") for s in lines
        ) / len(lines) > self.max_bullet_lines_ratio:
            return False, "gopher_too_many_bullets"
        if lines and self.max_ellipsis_lines_ratio and sum(
                s.rstrip().endswith("...") or s.rstrip().endswith("…") for s in lines
        ) / len(lines) > self.max_ellipsis_lines_ratio:
            return False, "gopher_too_many_end_ellipsis"
        if self.min_stop_words and sum(1 for w in self.stop_words if w in text) < self.min_stop_words:
            return False, "gopher_enough_stop_words"
        return None

    def filter(self, doc) -> bool | tuple[bool, str]:
        return self.early_verdict(doc.text) or super().filter(doc)


class ShortCircuitFineWebQuality(FineWebQualityFilter):
    """FineWebQualityFilter that judges one-line documents without the language's tokenizer (same verdict).

    Its only word-based rule is `newlines / words > new_line_ratio`, which is 0 for a document without a
    newline, whatever the words. For such a document (and one that is not blank) datatrove's rules reduce to
    arithmetic on one line, computed here in the same order, with the same formulas and reasons:
    `lines == [text]`, so the punctuation ratio is 1.0 or 0.0 (does the line end with a stop character), the
    short-line ratio 1.0 or 0.0 (is it at most `short_line_length` long), the duplicated-line characters 0,
    and the newline ratio 0 / (>= 1 word). Most web one-liners and short reviews end here, at the first rule.
    """

    def one_line_verdict(self, text: str) -> bool | tuple[bool, str]:
        """datatrove's verdict on a text without "\n" that is not blank (see the class docstring)."""
        ratio = 1.0 if text.endswith(self.stop_chars) else 0.0
        if ratio < self.line_punct_thr and not (ratio == 0 and self.line_punct_exclude_zero):
            return False, "line_punct_ratio"
        if (1.0 if len(text) <= self.short_line_length else 0.0) > self.short_line_threshold:
            return False, "short_line_ratio"
        if 0.0 > self.char_duplicates_ratio:  # no line repeats another: 0 duplicated characters
            return False, "char_dup_ratio"
        if 0.0 > self.new_line_ratio:  # no newline, and a non-blank line holds at least one word
            return False, "list_ratio"
        return True

    def filter(self, doc) -> bool | tuple[bool, str]:
        text = doc.text
        if "\n" not in text and text.strip():
            return self.one_line_verdict(text)
        return super().filter(doc)


def n_gram_strings(words: list[str], n: int, sep: str) -> list[str]:
    """`[sep.join(words[i:i + n]) for i in range(len(words) - n + 1)]`, as slices of one joined string."""
    return JoinedWords(words, sep).grams(n)


def top_duplicate_chars(words: list[str] | JoinedWords, n: int) -> int | None:
    """datatrove's `find_top_duplicate(get_n_grams(words, n))`: characters of the most frequent space-joined
    n-gram times its count (the first such n-gram on a tie, as `Counter.most_common`); None without n-grams.
    `words` may be a `JoinedWords(words, " ")` shared between calls."""
    grams = (words if isinstance(words, JoinedWords) else JoinedWords(words, " ")).grams(n)
    if not grams:
        return None
    gram, count = Counter(grams).most_common(1)[0]
    return len(gram) * count


def all_duplicate_chars(words: list[str] | JoinedWords, n: int) -> int:
    """datatrove's `find_all_duplicate(words, n)`: characters of the n-grams (words joined without a space)
    that repeat an earlier one, scanning left to right and skipping past each repeat. `words` may be a
    `JoinedWords(words, "")` shared between calls."""
    grams = (words if isinstance(words, JoinedWords) else JoinedWords(words, "")).grams(n)
    if len(set(grams)) == len(grams):  # no n-gram repeats: the scan below would count nothing
        return 0
    seen: set[str] = set()
    repeated = idx = 0
    while idx < len(grams):
        gram = grams[idx]
        if gram in seen:
            repeated += len(gram)
            idx += n
        else:
            seen.add(gram)
            idx += 1
    return repeated


class FastGopherRepetition(GopherRepetitionFilter):
    """GopherRepetitionFilter with the word n-gram statistics computed faster, to the same values.

    The paragraph and line rules run as datatrove's own code; the top and duplicated n-gram rules follow,
    in the same order with the same thresholds and reasons.
    """

    def filter(self, doc) -> bool | tuple[bool, str]:
        top, dup = self.top_n_grams, self.dup_n_grams
        self.top_n_grams = self.dup_n_grams = ()  # datatrove's filter runs its paragraph and line rules only
        try:
            verdict = super().filter(doc)
        finally:
            self.top_n_grams, self.dup_n_grams = top, dup
        if verdict is not True:
            return verdict
        words = split_into_words(doc.text, self.language)
        chars = len(doc.text)
        if top:
            spaced = JoinedWords(words, " ")
            for n, frac in top:
                top_chars = top_duplicate_chars(spaced, n)
                if top_chars is not None and top_chars / chars > frac:
                    return False, f"top_{n}_gram"
        if dup:
            glued = JoinedWords(words, "")
            for n, frac in dup:
                if all_duplicate_chars(glued, n) / chars > frac:
                    return False, f"duplicated_{n}_n_grams"
        return True


_CLASSES = {"gopher_quality": ShortCircuitGopherQuality, "fineweb_quality": ShortCircuitFineWebQuality,
            "gopher_repetition": FastGopherRepetition}


class ByLanguage(LeanFilter):
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
            raise ConfigError(f"quality.thresholds.{lang} must be a mapping of filter name -> arguments")
        for step, kwargs in steps.items():
            if step not in QUALITY_FILTERS:
                raise ConfigError(f"quality.thresholds.{lang}: unknown filter {step!r}; "
                                  f"known: {', '.join(QUALITY_FILTERS)}")
            allowed = set(inspect.signature(QUALITY_FILTERS[step].__init__).parameters) - {
                "self", "exclusion_writer", "language"}
            bad = sorted(set(kwargs or {}) - allowed)
            if bad:
                raise ConfigError(f"quality.thresholds.{lang}.{step}: unknown argument(s) {bad}; "
                                  f"{QUALITY_FILTERS[step].__name__} takes {sorted(allowed)}")


def build_quality_steps(thresholds: dict[str, dict[str, dict[str, Any]]], kiwi_model: str,
                        estimate_short_docs: bool = False) -> list[tuple[str, ByLanguage]]:
    """[(step name, ByLanguage filter)] in run order, for the languages the thresholds name.

    All filters of one language share one tokenizer object, so datatrove's small cache of the last
    tokenized texts lets the three filters tokenize each document once. `estimate_short_docs` turns on
    Gopher's word-count estimate (see the module docstring, 2c).
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
            extra = {"estimate": estimate_short_docs} if step == "gopher_quality" else {}
            filters[route] = _CLASSES[step](language=words[lang], **extra, **dict(kwargs))
        if filters:
            steps.append((step, ByLanguage(step, filters)))
    return steps
