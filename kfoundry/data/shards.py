"""Token shards: a corpus encoded once, stored as flat binary token files the trainer can memory-map.

Layout of a shard directory (written atomically: it appears whole or not at all)::

    meta.json              dtype, tokenizer hash, vocab size, BOS/EOS ids, counts per split and language
    run_config.json        the resolved command-line arguments (when written by `kfoundry data shard`)
    train-00000.bin        token ids, little-endian uint16 (vocab <= 65,536) or uint32, documents back to back
    train-00000.idx.npy    one row per document in that .bin: start, length, lang, doc_hash (see INDEX_DTYPE)
    val-00000.bin ...

Choices, and why:

- **Each document is stored as `[BOS] tokens [EOS]`.** BOS marks where a document starts, so the loader can
  start every training row at a document start (BOS-aligned packing) and the model never has to guess
  where a row begins. EOS teaches the model to *end* a document, which is how generation knows when to stop
  (and what `eos_token_id` means after export). The pair costs two tokens per document.
- **The train/validation split is by document, from a hash of `seed` and `doc.id`.** A document's side
  depends only on its own id, never on corpus order or size, so the same corpus always splits the same way,
  adding documents never moves old ones, and no document's text is in both splits. One exception keeps tiny
  corpora usable: if hashing leaves a split empty (say 10 documents at 5 %), the document whose hash is
  nearest the cut moves across. That is still a pure function of the set of documents.
- **uint16 when the vocabulary fits**, because token files are read once per step at training speed and
  half the bytes is half the I/O; uint32 otherwise.
- **Bounded memory**: documents are encoded in batches (`encode_batch` runs in Rust, in parallel) and
  written straight to open part files; the merge copies memory-mapped slices. A shard is closed before a
  document that would take it past `shard_tokens`; a document never spans two shards (a document longer
  than `shard_tokens` gets a shard of its own).
- **Parallel, with the same result**: encoding runs as N datatrove tasks on the curation executor (local
  processes, Slurm, Ray; kfoundry.data.shard_tasks), each on its own units of the corpus, and one merge
  task writes the shards in corpus order. The files are byte-identical whatever N is.
- **Nothing is lost silently**: documents that encode to no tokens are counted in `meta.json["dropped"]`
  under `empty_after_tokenize`, next to the corpus reader's own counts.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from kfoundry.config import write_config
from kfoundry.errors import CheckpointError, ConfigError, DataError, MissingPathError
from kfoundry.fileio import atomic_dir, atomic_write_json, read_json
from kfoundry.text import nfc

if TYPE_CHECKING:  # annotations only: shards are read without the corpus or tokenizer packages
    from kfoundry.corpus import CorpusStats, Document
    from kfoundry.tokenizer import KTokenizer

FORMAT = "kfoundry.shards"
FORMAT_VERSION = 1
SPLITS = ("train", "val")

# Language codes stored per document in the index. "unknown" is a document without a tag (the corpus reader
# tags text without letters, e.g. only digits, as None).
LANG_CODES: dict[str, int] = {"unknown": 0, "ko": 1, "en": 2, "other": 3}
_LANG_ALIASES = {"ko": "ko", "kor": "ko", "en": "en", "eng": "en"}

# One index row per document. `start` is the offset (in tokens) inside its own .bin file; `length` counts
# BOS and EOS; `doc_hash` is the first 8 bytes of blake2b(doc.id): it lets anyone check which documents a
# split holds (e.g. that validation and training are disjoint) without storing the ids themselves.
INDEX_DTYPE = np.dtype([("start", "<i8"), ("length", "<i4"), ("lang", "u1"), ("doc_hash", "<u8")])

# Reasons a document can be left out at this stage (the corpus reader counts its own).
DROP_EMPTY = "empty_after_tokenize"

# Encode this many documents (or characters) per encode_batch call: large enough to keep the Rust
# encoder's threads busy, small enough that a batch's token lists stay a few hundred MB at most.
_BATCH_DOCS = 1024
_BATCH_CHARS = 4_000_000


@functools.lru_cache(maxsize=256)  # a corpus has a handful of tags; this runs once per document
def lang_name(tag: str | None) -> str:
    """A reader's language tag as one of LANG_CODES: "ko-KR" and "kor_Hang" are "ko", "ja" is "other"."""
    if not tag:
        return "unknown"
    return _LANG_ALIASES.get(tag.lower().replace("_", "-").split("-")[0], "other")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so a vocabulary of up to 65,536 entries fits in two bytes."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def split_of(doc_id: str, seed: int, val_fraction: float) -> str:
    """'val' or 'train' for one document: a uniform number in [0, 1) from a hash of (seed, id)."""
    return "val" if _unit_hash(doc_id, seed) < val_fraction else "train"


def _unit_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def doc_hash(doc_id: str) -> int:
    """The 64-bit id hash stored in the index (independent of the split seed)."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest(), "little")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:05d}.bin"


def index_path(bin_path: Path) -> Path:
    return bin_path.with_name(bin_path.name[: -len(".bin")] + ".idx.npy")


# ---------------------------------------------------------------------------------------------------------
# Writing, in two steps that run as parallel tasks (kfoundry.data.shard_tasks) or one after the other here.
#
# 1. encode: a task encodes its *units* (a unit is a block of consecutive documents of the corpus stream,
#    or of one file of it) into part files: per split a token file and an index with each document's
#    length, language, id hash, byte count and split hash. Which task encodes which unit changes nothing.
# 2. merge: one task walks the units in corpus order and copies their tokens into the final shard files,
#    cutting shards at `shard_tokens` exactly as one process writing the whole stream would. The copy is a
#    slice per shard boundary (not a Python call per document), and the empty-split rule needs only the two
#    documents nearest the cut, found from the part indexes. So the output is a pure function of the
#    document stream and the settings: identical whatever the task count.

PART_DTYPE = np.dtype([("length", "<i4"), ("lang", "u1"), ("doc_hash", "<u8"), ("n_bytes", "<i8"),
                       ("unit", "<f8")])
PART_SUFFIX = ".part.json"
STREAM_FILE = "stream.json"  # stream mode: the block count and the reader's counts, from the task that read it all


def unit_key(file_no: int, block_no: int) -> str:
    """Name of a unit's part files; sorting the names sorts the units in corpus order."""
    return f"u{file_no:06d}-{block_no:08d}"


def _batches(docs: Iterable[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def check_settings(val_fraction: float, shard_tokens: int, tok: KTokenizer | None = None) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ConfigError(f"shard_tokens must be positive, got {shard_tokens}")
    if tok is not None and (tok.bos_id is None or tok.eos_id is None):
        raise CheckpointError("the tokenizer has no BOS/EOS token; shards store every document as [BOS] tokens [EOS]")


def encode_unit(docs: Iterable[Document], tok: KTokenizer, parts_dir: str | Path, key: str, *,
                val_fraction: float, seed: int, stats: CorpusStats | None = None) -> dict[str, Any]:
    """Encode one unit's documents into `parts_dir/<key>.<split>.bin|.idx.npy` and `<key>.part.json`.

    Memory is bounded by one encode batch: tokens go to the open part files batch by batch. The
    `.part.json` file is written last (atomically), so a unit without it is unfinished and is redone.
    `stats`, the CorpusStats the documents were read with, is recorded once `docs` is exhausted.
    """
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    id_limit = np.iinfo(dtype).max
    dropped: Counter = Counter()
    seen = 0
    counts = {s: 0 for s in SPLITS}
    files = {s: open(parts_dir / f"{key}.{s}.bin.tmp", "wb") for s in SPLITS}
    rows: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    try:
        for batch in _batches(docs):
            texts = [nfc(d.text) for d in batch]
            seen += len(batch)
            encoded = tok.encode_batch(texts, bos=False, eos=False)
            # One range check per batch: an id that does not fit the dtype would otherwise wrap silently.
            lo = min((min(ids) for ids in encoded if ids), default=0)
            hi = max((max(ids) for ids in encoded if ids), default=0)
            if lo < 0 or hi > id_limit:
                raise CheckpointError(f"token id {hi if hi > id_limit else lo} does not fit {dtype.name} "
                                      f"(vocab_size={tok.vocab_size}); is the tokenizer's vocab_size right?")
            pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for d, text, ids in zip(batch, texts, encoded):
                if len(ids) == 0:
                    dropped[DROP_EMPTY] += 1
                    continue
                unit = _unit_hash(d.id, seed)
                side = "val" if unit < val_fraction else "train"
                stored = np.empty(len(ids) + 2, dtype=dtype)
                stored[0], stored[1:-1], stored[-1] = tok.bos_id, ids, tok.eos_id
                pending[side].append(stored)
                rows[side].append(np.array([(len(stored), LANG_CODES[lang_name(d.lang)], doc_hash(d.id),
                                             len(text.encode("utf-8")), unit)], dtype=PART_DTYPE))
            for s in SPLITS:
                if pending[s]:
                    np.concatenate(pending[s]).tofile(files[s])
                    counts[s] += len(pending[s])
    finally:
        for f in files.values():
            f.close()
    for s in SPLITS:
        index = np.concatenate(rows[s]) if rows[s] else np.zeros(0, dtype=PART_DTYPE)
        np.save(parts_dir / f"{key}.{s}.idx.npy", index)
        os.replace(parts_dir / f"{key}.{s}.bin.tmp", parts_dir / f"{key}.{s}.bin")
    info = {"key": key, "docs_seen": seen, "dropped": dict(dropped), "splits": counts, "dtype": dtype.name,
            "corpus_stats": stats.to_dict() if stats is not None else None}
    atomic_write_json(parts_dir / f"{key}{PART_SUFFIX}", info)
    return info


def finished_units(parts_dir: str | Path) -> list[str]:
    return sorted(p.name[: -len(PART_SUFFIX)] for p in Path(parts_dir).glob(f"*{PART_SUFFIX}"))


class _ShardSink:
    """The final `<split>-NNNNN.bin` files of one split: whole runs of documents are appended at a time, and
    a shard is closed before a document that would take it past `shard_tokens` (a document longer than
    `shard_tokens` gets a shard of its own; no document spans two shards)."""

    def __init__(self, root: Path, split: str, shard_tokens: int) -> None:
        self.root, self.split, self.shard_tokens = root, split, shard_tokens
        self.files: list[str] = []
        self.docs = self.tokens = self.bytes = 0
        self.by_lang: Counter = Counter()  # (lang name, "docs"|"tokens"|"bytes") -> count
        self._file: IO[bytes] | None = None
        self._index: list[np.ndarray] = []
        self._offset = 0

    def add(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        """Append documents: `tokens` holds them back to back, `rows` (PART_DTYPE) describes each."""
        ends = np.cumsum(rows["length"], dtype=np.int64)
        done = 0  # documents written so far
        while done < len(rows):
            base = ends[done - 1] if done else 0
            room = self.shard_tokens - self._offset
            fit = int(np.searchsorted(ends[done:] - base, room, side="right"))
            if fit == 0:
                if self._offset > 0:  # the next document does not fit: start a new shard
                    self._close_shard()
                    continue
                fit = 1  # longer than a whole shard: it gets one of its own
            self._write(tokens[base:ends[done + fit - 1]], rows[done:done + fit])
            done += fit

    def _write(self, tokens: np.ndarray, rows: np.ndarray) -> None:
        if self._file is None:
            self.files.append(shard_name(self.split, len(self.files)))
            self._file = open(self.root / self.files[-1], "wb")
        np.asarray(tokens).tofile(self._file)
        index = np.zeros(len(rows), dtype=INDEX_DTYPE)
        index["length"], index["lang"], index["doc_hash"] = rows["length"], rows["lang"], rows["doc_hash"]
        index["start"] = self._offset + np.concatenate(([0], np.cumsum(rows["length"][:-1], dtype=np.int64)))
        self._index.append(index)
        n = int(rows["length"].sum(dtype=np.int64))
        self._offset += n
        self.docs += len(rows)
        self.tokens += n
        self.bytes += int(rows["n_bytes"].sum())
        for code, name in _CODE_NAMES.items():
            mine = rows["lang"] == code
            if mine.any():
                self.by_lang[name, "docs"] += int(mine.sum())
                self.by_lang[name, "tokens"] += int(rows["length"][mine].sum(dtype=np.int64))
                self.by_lang[name, "bytes"] += int(rows["n_bytes"][mine].sum())
        if self._offset >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        np.save(index_path(self.root / self.files[-1]), np.concatenate(self._index))
        self._index, self._offset = [], 0

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    def summary(self) -> dict[str, Any]:
        langs = sorted({name for name, _ in self.by_lang})
        return {"files": list(self.files), "docs": self.docs, "tokens": self.tokens, "bytes": self.bytes,
                "by_lang": {n: {k: self.by_lang[n, k] for k in ("docs", "tokens", "bytes")} for n in langs}}


_CODE_NAMES = {code: name for name, code in LANG_CODES.items()}


def _held(parts_dir: Path, keys: list[str], val_fraction: float) -> dict[str, tuple[str, int, float] | None]:
    """The empty-split rule's candidates: the train document nearest the cut (smallest split hash) and the
    validation document nearest it (largest), as (unit key, row, hash); the first one in corpus order wins a
    tie, as a single writer would have it."""
    held: dict[str, tuple[str, int, float] | None] = {"train": None, "val": None}
    if val_fraction <= 0:
        return held
    for key in keys:
        for side in SPLITS:
            units = np.load(parts_dir / f"{key}.{side}.idx.npy")["unit"]
            if not len(units):
                continue
            i = int(np.argmin(units) if side == "train" else np.argmax(units))
            h = held[side]
            if h is None or (units[i] < h[2] if side == "train" else units[i] > h[2]):
                held[side] = (key, i, float(units[i]))
    return held


def merge_parts(parts_dir: str | Path, out_dir: str | Path, tok_info: dict[str, Any], *, val_fraction: float,
                seed: int, shard_tokens: int, config: dict[str, Any] | None = None, overwrite: bool = False,
                expect_units: list[str] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """Merge the finished units in `parts_dir` into the shard directory `out_dir` (atomically); return meta.

    `tok_info` holds the tokenizer's hash, vocab_size, bos_id, eos_id and pad_id. `expect_units`, when
    given, must all be finished (a unit missing is an error: a task did not finish). `notes` are the corpus
    reader's remarks about the whole SPEC (files skipped in a folder) when its units were read file by file.
    """
    parts_dir, out_dir = Path(parts_dir), Path(out_dir)
    check_settings(val_fraction, shard_tokens)
    keys = finished_units(parts_dir)
    if expect_units is not None:
        missing = sorted(set(expect_units) - set(keys))
        if missing:
            raise RuntimeError(f"{len(missing)} units of {parts_dir} were not encoded (first: {missing[0]}); "
                               "re-run the command to finish them")
        keys = sorted(expect_units)
    infos = [read_json(parts_dir / f"{k}{PART_SUFFIX}") for k in keys]
    dtype = token_dtype(tok_info["vocab_size"])
    seen = sum(i["docs_seen"] for i in infos)
    dropped: Counter = Counter()
    for i in infos:
        dropped.update(i["dropped"])
    if seen == 0:
        raise DataError("the corpus produced no documents; check --corpus (and the reader's dropped counts)")
    kept = sum(sum(i["splits"].values()) for i in infos)
    if kept == 0:
        raise DataError(f"all {seen} documents encoded to no tokens ({DROP_EMPTY}); nothing to shard")
    held = _held(parts_dir, keys, val_fraction)
    n_side = {s: sum(i["splits"][s] for i in infos) for s in SPLITS}
    # Training comes first: a one-document corpus trains; validation borrows only from a train side of 2+.
    dest = {"train": "val" if n_side["val"] == 0 and n_side["train"] > 1 else "train",
            "val": "train" if n_side["train"] == 0 else "val"}
    stats = None
    for i in infos:
        if i.get("corpus_stats") is not None:
            stats = _merge_stats(stats, i["corpus_stats"])
    if (parts_dir / STREAM_FILE).is_file():
        stats = read_json(parts_dir / STREAM_FILE).get("corpus_stats", stats)
    if notes and stats is not None:
        stats["notes"] = list(notes) + [n for n in stats.get("notes", []) if n not in notes]

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        sinks = {s: _ShardSink(tmp, s, shard_tokens) for s in SPLITS}
        late: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
        for key in keys:
            for side in SPLITS:
                rows = np.load(parts_dir / f"{key}.{side}.idx.npy")
                if not len(rows):
                    continue
                tokens = np.memmap(parts_dir / f"{key}.{side}.bin", dtype=dtype, mode="r")
                h = held[side]
                if h is not None and h[0] == key:
                    # the held document is written last, on the side `dest` says; the rest stays in order
                    r = h[1]
                    start = int(rows["length"][:r].sum(dtype=np.int64))
                    end = start + int(rows["length"][r])
                    late[dest[side]].append((np.array(tokens[start:end]), rows[r:r + 1]))
                    if r:
                        sinks[side].add(tokens[:start], rows[:r])
                    if r + 1 < len(rows):
                        sinks[side].add(tokens[end:], rows[r + 1:])
                else:
                    sinks[side].add(tokens, rows)
                del tokens
        for side in ("train", "val"):  # a single writer added the held train document first
            for tokens, rows in late[side]:
                sinks[side].add(tokens, rows)
        for sink in sinks.values():
            sink.close()
        splits = {s: sink.summary() for s, sink in sinks.items()}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "tokenizer_hash": tok_info["hash"],
            "vocab_size": tok_info["vocab_size"],
            "bos_id": tok_info["bos_id"],
            "eos_id": tok_info["eos_id"],
            "pad_id": tok_info.get("pad_id"),
            "doc_layout": "[BOS] tokens [EOS]",
            "lang_codes": dict(LANG_CODES),
            "split_rule": {
                "seed": seed,
                "val_fraction": val_fraction,
                "hash": "blake2b-64(f'{seed}\\0{doc.id}') / 2**64 < val_fraction -> val",
                "empty_split": "if a split would be empty, the document nearest the cut moves across",
            },
            "shard_tokens": shard_tokens,
            "docs_seen": seen,
            "docs": sum(sp["docs"] for sp in splits.values()),
            "tokens": sum(sp["tokens"] for sp in splits.values()),
            "bytes": sum(sp["bytes"] for sp in splits.values()),
            "splits": splits,
            "dropped": dict(dropped),
            "corpus_stats": stats,
        }
        atomic_write_json(tmp / "meta.json", meta)
        if config is not None:
            write_config(config, tmp)
    return meta


def _merge_stats(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Sum two `CorpusStats.to_dict()` results (units of one corpus read by different tasks)."""
    if a is None:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v) for k, v in b.items()}
    out = dict(a)
    out["read"] = a.get("read", 0) + b.get("read", 0)
    out["yielded"] = a.get("yielded", 0) + b.get("yielded", 0)
    for k in ("dropped", "changed"):
        c = Counter(a.get(k, {}))
        c.update(b.get(k, {}))
        out[k] = dict(sorted(c.items()))
    ex = {k: list(v) for k, v in a.get("examples", {}).items()}
    for k, v in b.get("examples", {}).items():
        ex[k] = (ex.get(k, []) + list(v))[:3]
    out["examples"] = dict(sorted(ex.items()))
    out["notes"] = list(a.get("notes", [])) + [n for n in b.get("notes", []) if n not in a.get("notes", [])]
    return out


def tokenizer_info(tok: KTokenizer) -> dict[str, Any]:
    return {"hash": tok.hash, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": getattr(tok, "pad_id", None)}


def write_shards(
    docs: Iterable[Document],
    tok: KTokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    shard_tokens: int = 1 << 24,
    stats: CorpusStats | None = None,
    config: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Encode `docs` with `tok` into a shard directory at `out_dir` in this process; return its `meta.json`.

    The same two steps as the parallel `kfoundry.data.shard_tasks.shard_corpus` (one unit, then the merge),
    so both give the same files. `docs` are `kfoundry.corpus.Document`s (anything with `.text`, `.id` and
    `.lang` will do); their text is NFC-normalised again here because this is an entry point. `stats` (a
    `CorpusStats`, filled while the documents are read) is recorded in `meta.json`. `config`, when given, is
    written as `run_config.json` inside the same atomic directory.

    Raises ValueError for an empty corpus (or one whose every document encodes to nothing), a bad
    `val_fraction`, or an existing `out_dir` without `overwrite`.
    """
    out_dir = Path(out_dir)
    check_settings(val_fraction, shard_tokens, tok)
    if out_dir.exists() and not overwrite:
        raise ConfigError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix=f".parts-{out_dir.name}-", dir=out_dir.parent))
    try:
        encode_unit(docs, tok, parts, unit_key(0, 0), val_fraction=val_fraction, seed=seed, stats=stats)
        return merge_parts(parts, out_dir, tokenizer_info(tok), val_fraction=val_fraction, seed=seed,
                           shard_tokens=shard_tokens, config=config, overwrite=overwrite)
    finally:
        shutil.rmtree(parts, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_meta(shard_dir: str | Path, expect_tokenizer_hash: str | None = None) -> dict[str, Any]:
    """Load `meta.json`, checking the format and (optionally) that the shards came from this tokenizer."""
    shard_dir = Path(shard_dir)
    path = shard_dir / "meta.json"
    if not path.is_file():
        raise MissingPathError(f"not a shard directory (no meta.json): {shard_dir}")
    meta = read_json(path)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: unsupported shard format {meta.get('format')!r} v{meta.get('version')!r}")
    if expect_tokenizer_hash is not None and meta["tokenizer_hash"] != expect_tokenizer_hash:
        raise DataError(
            f"{shard_dir} was written with tokenizer {meta['tokenizer_hash']}, but this tokenizer is "
            f"{expect_tokenizer_hash}; re-run `kfoundry data shard` with the tokenizer you train with"
        )
    return meta


def iter_split(shard_dir: str | Path, split: str = "train") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(tokens, index)` per shard file of a split: a read-only memmap and its index rows."""
    shard_dir = Path(shard_dir)
    meta = read_meta(shard_dir)
    if split not in meta["splits"]:
        raise ConfigError(f"unknown split {split!r}; this shard directory has {', '.join(meta['splits'])}")
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    for name in meta["splits"][split]["files"]:
        bin_path = shard_dir / name
        index = np.load(index_path(bin_path), mmap_mode="r")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        yield tokens, index


def read_documents(shard_dir: str | Path, split: str = "train") -> Iterator[np.ndarray]:
    """Each stored document's tokens (with BOS and EOS), in file order. For inspection and tests."""
    for tokens, index in iter_split(shard_dir, split):
        for row in index:
            yield np.asarray(tokens[row["start"] : row["start"] + row["length"]])
