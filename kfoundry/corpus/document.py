"""What a corpus yields (`Document`), how it accounts for what it read (`CorpusStats`), and the one
place where a raw record becomes a document (`finish`).

Every reader (text files, JSON Lines, CSV, Parquet, the hub, the starter sample) only *finds* records: it
yields a `Record` for each candidate document, or a `Rejected` when it already knows the record is bad
(undecodable bytes, a malformed JSON line, an unreadable file). `finish` then applies the same rules to
every source, so a text from the hub and a text from a local file are treated identically:

1. the text must be present and be a string (bytes are decoded as strict UTF-8);
2. it is NFC-normalized (never NFKC: see kfoundry.text);
3. whitespace-only documents are dropped;
4. it is cut to `max_chars` if asked (counted, still yielded);
5. a language tag is set from the source or guessed from the script.

Accounting invariant, checked by the tests: `read == yielded + sum(dropped.values())`. Nothing is lost
silently; each drop has a named reason and the first few locations are kept as examples.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from kfoundry.errors import DataError
from kfoundry.text import hangul_share, nfc

# Named reasons a record is dropped. Kept in one place so docs, tests and data cards agree on the names.
INVALID_UTF8 = "invalid_utf8"  # bytes that are not UTF-8
INVALID_UNICODE = "invalid_unicode"  # a decoded string holding lone surrogates (e.g. "\ud800" in JSON)
MALFORMED_JSON = "malformed_json"  # a JSON Lines line that does not parse
NOT_AN_OBJECT = "not_an_object"  # a JSON line that parses but is not an object ({...})
MISSING_FIELD = "missing_field"  # the text field/column is absent or null in this record
MISSING_COLUMN = "missing_column"  # a whole CSV/Parquet file lacks the text column (counted once per file)
NON_STRING_TEXT = "non_string_text"  # the text field holds a number, list, ...
EMPTY = "empty"  # empty or whitespace-only after normalization
UNREADABLE_FILE = "unreadable_file"  # a corrupt gzip/Parquet/CSV file; the rest of that file is skipped

# Changes made to documents that are still yielded.
TRUNCATED = "truncated"
NFC_CHANGED = "nfc_changed"

EXAMPLES_PER_REASON = 3

# Lone surrogates cannot be encoded as UTF-8; JSON lets them in through "\ud800"-style escapes.
_SURROGATE = re.compile("[\ud800-\udfff]")


class CorpusError(DataError):
    """A corpus spec a user can fix: a missing path, an unknown spec or file type, a bad weight.

    It is a `DataError` (so also a ValueError): the CLI prints it as one line and exits with code 2.
    """


@dataclass
class Document:
    text: str  # NFC-normalized, never empty or whitespace-only
    id: str  # stable and unique within a spec: "<source>#<line or row>" (see docs/corpus.md)
    source: str  # the file, hub dataset or starter part it came from
    lang: str | None = None  # "ko" | "en" | "other" | a tag the source gave | None (no letters at all)
    meta: dict = field(default_factory=dict)  # the record's other fields (JSON-safe values)


@dataclass
class CorpusStats:
    """Counts of what a spec read and what happened to it. Pass one to `iter_documents` and read it after.

    read     records looked at (a line, a row, a file, a paragraph of a large .txt)
    yielded  documents handed out
    dropped  reason -> records dropped (see the reason names above)
    changed  reason -> documents altered but still yielded ("truncated", "nfc_changed")
    examples reason -> up to three locations ("file.jsonl#12") so a user can find the bad input
    notes    one-line remarks: files skipped in a folder, where a mix stopped
    """

    read: int = 0
    yielded: int = 0
    dropped: Counter = field(default_factory=Counter)
    changed: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        self._example(reason, where)

    def change(self, reason: str, where: str) -> None:
        self.changed[reason] += 1
        self._example(reason, where)

    def _example(self, reason: str, where: str) -> None:
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append(where)

    def merge(self, other: CorpusStats) -> CorpusStats:
        """Add `other`'s counts into this one (e.g. stats of parallel workers); returns self."""
        self.read += other.read
        self.yielded += other.yielded
        self.dropped.update(other.dropped)
        self.changed.update(other.changed)
        for reason, where in other.examples.items():
            for w in where:
                self._example(reason, w)
        self.notes.extend(other.notes)
        return self

    def to_dict(self) -> dict:
        return {
            "read": self.read,
            "yielded": self.yielded,
            "dropped": dict(sorted(self.dropped.items())),
            "changed": dict(sorted(self.changed.items())),
            "examples": {k: list(v) for k, v in sorted(self.examples.items())},
            "notes": list(self.notes),
        }


MISSING = object()  # sentinel: the record has no text field at all (distinct from a null or "" text)


@dataclass
class Record:
    """A candidate document as a reader found it; `finish` decides whether it becomes a Document."""

    id: str
    source: str
    text: Any  # str | bytes | None | MISSING | anything a JSON/Parquet field may hold
    lang: str | None = None
    meta: dict = field(default_factory=dict)
    where: str | None = None  # its position (PATH#LINE) when that is not its id: what drop examples name

    @property
    def location(self) -> str:
        return self.where or self.id


@dataclass
class Rejected:
    """A record a reader already knows is bad, with the reason and where it was."""

    reason: str
    where: str


def guess_lang(text: str, sample_chars: int = 4096) -> str | None:
    """A cheap offline language tag from the script of the first few thousand characters.

    "ko" when at least 30% of the letters are Hangul (Korean web text mixes in Latin brand names, code and
    units, so a majority rule would miss much of it); "en" when most letters are Latin (we do not tell
    English from other Latin-script languages offline); "other" for other scripts; None without letters.
    """
    sample = text[:sample_chars]
    if hangul_share(sample) >= 0.3:  # checked first: most of our text is Korean and exits after one pass
        return "ko"
    letters = [c for c in sample if c.isalpha()]
    if not letters:
        return None
    latin = sum(1 for c in letters if c < "\u0250")  # Basic Latin .. Latin Extended-B
    return "en" if latin / len(letters) >= 0.5 else "other"


def json_safe(value: Any) -> Any:
    """Meta values must survive json.dumps (data cards, the ledger): keep JSON types, stringify the rest."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return nfc(value)
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    return str(value)


def finish(
    items: Iterable[Record | Rejected], stats: CorpusStats, max_chars: int | None = None
) -> Iterator[Document]:
    """Turn a reader's records into Documents, counting every record under `stats`."""
    for item in items:
        stats.read += 1
        if isinstance(item, Rejected):
            stats.drop(item.reason, item.where)
            continue
        doc = _to_document(item, stats, max_chars)
        if doc is not None:
            stats.yielded += 1
            yield doc


def _to_document(rec: Record, stats: CorpusStats, max_chars: int | None) -> Document | None:
    text = rec.text
    if text is MISSING or text is None:
        stats.drop(MISSING_FIELD, rec.location)
        return None
    if isinstance(text, (bytes, bytearray)):  # e.g. a Parquet binary column
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            stats.drop(INVALID_UTF8, rec.location)
            return None
    if not isinstance(text, str):
        stats.drop(NON_STRING_TEXT, rec.location)
        return None
    if _SURROGATE.search(text):
        stats.drop(INVALID_UNICODE, rec.location)
        return None
    normal = nfc(text)
    if not normal.strip():
        stats.drop(EMPTY, rec.location)
        return None
    if normal is not text:
        stats.change(NFC_CHANGED, rec.location)
    if max_chars is not None and len(normal) > max_chars:
        normal = normal[:max_chars]
        stats.change(TRUNCATED, rec.location)
    lang = rec.lang if isinstance(rec.lang, str) and rec.lang else guess_lang(normal)
    return Document(text=normal, id=rec.id, source=rec.source, lang=lang, meta=rec.meta)
