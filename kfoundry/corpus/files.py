"""Local files and folders: find them (`expand_path`) and read them (`read_file`).

Readers only find records; the rules that make a record a document live in `document.finish`. Each
reader works on bytes where it can, so one undecodable line or paragraph is dropped as "invalid_utf8"
instead of failing the whole file.

What one document is, per file type:
- `.txt`      the whole file, unless it is larger than TXT_SPLIT_BYTES; then each blank-line separated
              paragraph is a document (one 5 GB dump must not become one 5 GB string). Id: `path#LINE`,
              the 1-based line where the document starts.
- `.jsonl`, `.jsonl.gz`  one JSON object per line, text in field `text` (or `#field=NAME`); blank lines
              are skipped. Id: `path#LINE`. A string `lang` field is used as the language tag; the other
              fields go to `meta`.
- `.csv`      one row per document, text in column `text` (or `#column=NAME`); UTF-8, with or without BOM.
              Id: `path#ROW` (0-based data row). Other columns go to `meta`.
- `.parquet`  one row per document, as for CSV. Id: `path#ROW` (0-based).
Folders: every supported file inside, recursively, in sorted path order; hidden files and folders (a
leading ".") are ignored and other unsupported files are listed in the stats notes.

Damage that is an error, not a count (a half-copied download must never pass for a smaller corpus):
- a `.jsonl.gz` or `.parquet` file that is cut off or corrupt raises `CorpusError` at the point of damage,
  unless the spec says `#truncated=keep`; then what was read before the damage is used and the file is
  counted once as `unreadable_file`;
- a `.txt` file that is not UTF-8 (a binary file, or CP949 text) raises `CorpusError` saying so. (A large
  .txt file whose first 64 KiB are UTF-8 text is read paragraph by paragraph; a bad paragraph in it is
  counted as `invalid_utf8`.)
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import os
import pyarrow as pa
import pyarrow.parquet as pq
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePath
from typing import Iterator

from kfoundry.corpus.document import (INVALID_UTF8, MALFORMED_JSON, MISSING, MISSING_COLUMN, NOT_AN_OBJECT,
                                      UNREADABLE_FILE, CorpusError, Record, Rejected, json_safe)
from kfoundry.corpus.spec import PathSource

# Longest suffix first, so "x.jsonl.gz" is not taken for an unknown ".gz".
SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet", ".csv", ".txt")
DEFAULT_FIELD = "text"
TXT_SPLIT_BYTES = 1 << 20  # 1 MiB: above this a .txt file is split into blank-line separated paragraphs
PARQUET_BATCH_ROWS = 1024
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class FileEntry:
    path: str  # spelled from the user's spec, so document ids do not depend on the machine
    kind: str  # one of SUFFIXES without the leading dot
    field: str  # the JSON field / table column that holds the text
    keep_truncated: bool = False  # "#truncated=keep": a damaged compressed file yields what it held


def file_kind(path: str) -> str | None:
    name = path.lower()
    return next((s[1:] for s in SUFFIXES if name.endswith(s)), None)


def expand_path(source: PathSource) -> tuple[list[FileEntry], Counter]:
    """The files a path source names, and a count of unsupported files skipped in a folder (by suffix).

    Raises CorpusError for a missing path, an unsupported file, or a folder without supported files.
    """
    path = source.path
    field = source.field or DEFAULT_FIELD
    if os.path.isfile(path):
        kind = file_kind(path)
        if kind is None:
            raise CorpusError(
                f"unsupported corpus file type {PurePath(path).suffix or '(none)'!r} for {path!r}; "
                f"supported: {', '.join(SUFFIXES)} (JSON Lines files must end in .jsonl)"
            )
        if kind == "txt" and source.field:
            raise CorpusError(f"'#field=' does not apply to a .txt file: {path!r}")
        return [FileEntry(path, kind, field, source.keep_truncated)], Counter()
    if not os.path.isdir(path):
        raise CorpusError(f"corpus path not found: {path!r}")
    found: list[tuple[tuple[str, ...], str]] = []
    skipped: Counter = Counter()
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .cache ...
        for name in files:
            if name.startswith("."):
                continue
            full = os.path.join(root, name)
            if file_kind(name) is None:
                skipped[PurePath(name).suffix.lower() or "(no suffix)"] += 1
            else:
                found.append((PurePath(os.path.relpath(full, path)).parts, full))
    if not found:
        raise CorpusError(f"corpus folder {path!r} has no supported files ({', '.join(SUFFIXES)})")
    entries = [FileEntry(full, file_kind(full) or "", field, source.keep_truncated) for _, full in sorted(found)]
    return entries, skipped


def read_file(entry: FileEntry) -> Iterator[Record | Rejected]:
    readers = {"txt": _read_txt, "jsonl": _read_jsonl, "jsonl.gz": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}
    return readers[entry.kind](entry)


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# The first bytes of a .txt file decide whether it is text at all: a NUL byte or invalid UTF-8 there means
# a binary file or another encoding, which is the user's to fix, not a count of "0 documents".
_SNIFF_BYTES = 1 << 16


def _check_utf8_text(entry: FileEntry, head: bytes, whole: bool) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(head, final=whole)  # final=False: a character cut at the sniff boundary is fine
        bad = head.find(b"\x00")
    except UnicodeDecodeError as e:
        bad = e.start
    if bad >= 0:
        raise CorpusError(f"{entry.path} is not UTF-8 text (byte {bad} is {head[bad:bad + 1]!r}): a binary "
                          "file, or text in another encoding (convert it, e.g. `iconv -f CP949 -t UTF-8`)")


def _txt_record(entry: FileEntry, data: bytes, line: int) -> Record | Rejected:
    where = f"{entry.path}#{line}"
    text = _decode(data)
    if text is None:
        return Rejected(INVALID_UTF8, where)
    # Universal newlines, as Python's text mode would give; a trailing newline is not content.
    text = text.replace("\r\n", "\n").replace("\r", "\n").rstrip("\n")
    return Record(id=where, source=entry.path, text=text)


def _read_txt(entry: FileEntry) -> Iterator[Record | Rejected]:
    if os.path.getsize(entry.path) <= TXT_SPLIT_BYTES:
        with open(entry.path, "rb") as f:
            data = f.read().removeprefix(_BOM)
        _check_utf8_text(entry, data, whole=True)
        yield _txt_record(entry, data, 1)
        return
    with open(entry.path, "rb") as f:
        _check_utf8_text(entry, f.read(_SNIFF_BYTES).removeprefix(_BOM), whole=False)
    # Large file: stream paragraphs. Splitting bytes on b"\n" is safe in UTF-8, where 0x0A never occurs
    # inside a multi-byte character, so each paragraph can be decoded (and rejected) on its own.
    para: list[bytes] = []
    start = 1
    with open(entry.path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1:
                line = line.removeprefix(_BOM)
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                yield _txt_record(entry, b"".join(para), start)
                para = []
    if para:
        yield _txt_record(entry, b"".join(para), start)


def _read_jsonl(entry: FileEntry) -> Iterator[Record | Rejected]:
    opener = gzip.open if entry.kind == "jsonl.gz" else open
    lineno = 0
    try:
        with opener(entry.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                yield _json_record(entry, raw, lineno)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut-off gzip is EOFError
        yield _damaged(entry, lineno, "line", e)


def _damaged(entry: FileEntry, position: int, unit: str, error: BaseException) -> Rejected:
    """A cut-off or corrupt file: an error, unless the spec opted in with `#truncated=keep`."""
    where = f"{entry.path}#{position + 1}: {type(error).__name__}: {error}"
    if entry.keep_truncated:
        return Rejected(UNREADABLE_FILE, where)
    raise CorpusError(f"{entry.path} is truncated or corrupt ({type(error).__name__} after {position:,} "
                      f"{unit}s: {error}); download or copy it again, or add '#truncated=keep' to the corpus "
                      "spec to use what was read before the damage")


def _json_record(entry: FileEntry, raw: bytes, lineno: int) -> Record | Rejected:
    where = f"{entry.path}#{lineno}"
    line = _decode(raw.removeprefix(_BOM) if lineno == 1 else raw)
    if line is None:
        return Rejected(INVALID_UTF8, where)
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return Rejected(MALFORMED_JSON, where)
    if not isinstance(obj, dict):
        return Rejected(NOT_AN_OBJECT, where)
    return _row_record(entry, obj, where)


def _row_record(entry: FileEntry, row: dict, where: str) -> Record:
    """A record from one JSON object or table row: the text field, a string `lang`, the rest as meta.

    The document's id is the row's own non-empty string `id` when it has one (datasets carry ids, and curated
    output keeps each document's original id), else its position `PATH#LINE`. The train/validation split
    hashes the id, so a row's own id keeps the split the same when the files are moved, renamed or re-sharded
    (a speedrun in another --out folder splits its curated corpus the same way)."""
    lang = row.get("lang")
    own_id = row.get("id")
    meta = {str(k): json_safe(v) for k, v in row.items() if k not in (entry.field, "lang") and k is not None}
    return Record(
        id=own_id if isinstance(own_id, str) and own_id else where,
        where=where,
        source=entry.path,
        text=row.get(entry.field, MISSING),
        lang=lang if isinstance(lang, str) else None,
        meta=meta,
    )


def _read_csv(entry: FileEntry) -> Iterator[Record | Rejected]:
    # Real documents exceed the csv module's default 128 KiB field limit; raising it is process-wide but
    # only ever makes parsing more permissive.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    row_no = 0
    try:
        # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row can be found and
        # dropped instead of the decoder failing the whole file.
        with open(entry.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if entry.field not in columns:
                yield Rejected(MISSING_COLUMN, f"{entry.path}: no column {entry.field!r} (columns: {columns})")
                return
            for row_no, row in enumerate(reader):
                where = f"{entry.path}#{row_no}"
                if any(isinstance(v, str) and _has_surrogate(v) for v in row.values()):
                    yield Rejected(INVALID_UTF8, where)
                    continue
                yield _row_record(entry, row, where)
    except csv.Error as e:
        yield Rejected(UNREADABLE_FILE, f"{entry.path}#{row_no}: {e}")


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _read_parquet(entry: FileEntry) -> Iterator[Record | Rejected]:
    row_no = 0
    try:
        pf = pq.ParquetFile(entry.path)
        columns = pf.schema_arrow.names
        if entry.field not in columns:
            yield Rejected(MISSING_COLUMN, f"{entry.path}: no column {entry.field!r} (columns: {columns})")
            return
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            for row in batch.to_pylist():
                yield _row_record(entry, row, f"{entry.path}#{row_no}")
                row_no += 1
    except (pa.ArrowException, OSError) as e:  # not a Parquet file, a truncated one, a corrupt page
        yield _damaged(entry, row_no, "row", e)
