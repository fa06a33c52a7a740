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
  written straight to the open shard file; a shard is closed when it reaches `shard_tokens`. A document
  never spans two shards (a document longer than `shard_tokens` gets a shard of its own).
- **Nothing is lost silently**: documents that encode to no tokens are counted in `meta.json["dropped"]`
  under `empty_after_tokenize`, next to the corpus reader's own counts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from kfoundry.config import write_config
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
# Writing


@dataclasses.dataclass
class _Encoded:
    """One document after encoding, as it will be stored."""

    tokens: np.ndarray  # [BOS] + ids + [EOS], already in the shard dtype
    lang: int
    hash64: int
    n_bytes: int  # UTF-8 bytes of the NFC text: the denominator of bits-per-byte
    lang_name: str
    unit: float  # the split hash, kept for the empty-split rule


class _SplitWriter:
    """Appends documents to `<split>-NNNNN.bin` files in `root`, closing a shard when it is full.

    Documents are collected in memory and written in one call per encode batch (`flush`): one write of a
    few MB instead of a system call per document.
    """

    def __init__(self, root: Path, split: str, shard_tokens: int) -> None:
        self.root, self.split, self.shard_tokens = root, split, shard_tokens
        self.files: list[str] = []
        self.docs = 0
        self.tokens = 0
        self.bytes = 0
        self.by_lang: dict[str, list[int]] = {}  # name -> [docs, tokens, bytes]
        self._file: IO[bytes] | None = None
        self._pending: list[np.ndarray] = []
        self._index: list[tuple[int, int, int, int]] = []
        self._offset = 0  # tokens in the open shard, pending ones included

    def add(self, doc: _Encoded) -> None:
        n = len(doc.tokens)
        if self._file is not None and self._offset + n > self.shard_tokens:
            self._close_shard()
        if self._file is None:
            name = shard_name(self.split, len(self.files))
            self.files.append(name)
            self._file = open(self.root / name, "wb")
        self._pending.append(doc.tokens)
        self._index.append((self._offset, n, doc.lang, doc.hash64))
        self._offset += n
        self.docs += 1
        self.tokens += n
        self.bytes += doc.n_bytes
        counts = self.by_lang.setdefault(doc.lang_name, [0, 0, 0])
        counts[0] += 1
        counts[1] += n
        counts[2] += doc.n_bytes

    def flush(self) -> None:
        if self._pending:
            assert self._file is not None
            np.concatenate(self._pending).tofile(self._file)
            self._pending = []

    def _close_shard(self) -> None:
        self.flush()
        assert self._file is not None
        self._file.close()
        self._file = None
        bin_path = self.root / self.files[-1]
        np.save(index_path(bin_path), np.array(self._index, dtype=INDEX_DTYPE))
        self._index, self._offset = [], 0

    def close(self) -> None:
        if self._file is not None:
            self._close_shard()

    def summary(self) -> dict[str, Any]:
        return {
            "files": list(self.files),
            "docs": self.docs,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "by_lang": {k: dict(zip(("docs", "tokens", "bytes"), v)) for k, v in sorted(self.by_lang.items())},
        }


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
    """Encode `docs` with `tok` into a shard directory at `out_dir`; return its `meta.json` content.

    `docs` are `kfoundry.corpus.Document`s (anything with `.text`, `.id` and `.lang` will do); their text is
    NFC-normalised again here because this is an entry point. `stats` (a `CorpusStats`, filled while the
    documents are read) is recorded in `meta.json` once the iterator is exhausted (`stats.to_dict()`).
    `config`, when given, is written as `run_config.json` inside the same atomic directory.

    Raises ValueError for an empty corpus (or one whose every document encodes to nothing), a bad
    `val_fraction`, or an existing `out_dir` without `overwrite`.
    """
    out_dir = Path(out_dir)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; choose another --out or pass --overwrite")
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError("the tokenizer has no BOS/EOS token; shards store every document as [BOS] tokens [EOS]")
    dtype = token_dtype(tok.vocab_size)
    id_limit = np.iinfo(dtype).max

    dropped: Counter = Counter()
    seen = 0
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        writers = {s: _SplitWriter(tmp, s, shard_tokens) for s in SPLITS}
        # Held back for the empty-split rule: the train document nearest the cut (smallest hash) and the
        # validation document nearest it (largest hash). Each is written at the end, on its own side unless
        # the other side would otherwise be empty.
        held: dict[str, _Encoded | None] = {"train": None, "val": None}

        def place(doc: _Encoded, side: str) -> None:
            h = held[side]
            closer = h is None or (doc.unit < h.unit if side == "train" else doc.unit > h.unit)
            if val_fraction > 0 and closer:
                held[side] = doc
                doc = h  # type: ignore[assignment]
                if doc is None:
                    return
            writers[side].add(doc)

        for batch in _batches(docs):
            texts = [nfc(d.text) for d in batch]
            seen += len(batch)
            encoded = tok.encode_batch(texts, bos=False, eos=False)
            # One range check per batch: an id that does not fit the dtype would otherwise wrap silently.
            lo = min((min(ids) for ids in encoded if ids), default=0)
            hi = max((max(ids) for ids in encoded if ids), default=0)
            if lo < 0 or hi > id_limit:
                raise ValueError(f"token id {hi if hi > id_limit else lo} does not fit {dtype.name} "
                                 f"(vocab_size={tok.vocab_size}); is the tokenizer's vocab_size right?")
            for d, text, ids in zip(batch, texts, encoded):
                if len(ids) == 0:
                    dropped[DROP_EMPTY] += 1
                    continue
                lang = lang_name(d.lang)
                unit = _unit_hash(d.id, seed)
                stored = np.empty(len(ids) + 2, dtype=dtype)
                stored[0], stored[1:-1], stored[-1] = tok.bos_id, ids, tok.eos_id
                enc = _Encoded(
                    tokens=stored,
                    lang=LANG_CODES[lang],
                    hash64=doc_hash(d.id),
                    n_bytes=len(text.encode("utf-8")),
                    lang_name=lang,
                    unit=unit,
                )
                place(enc, "val" if unit < val_fraction else "train")
            for w in writers.values():
                w.flush()

        kept = sum(w.docs for w in writers.values()) + sum(h is not None for h in held.values())
        if seen == 0:
            raise ValueError("the corpus produced no documents; check --corpus (and the reader's dropped counts)")
        if kept == 0:
            raise ValueError(f"all {seen} documents encoded to no tokens ({DROP_EMPTY}); nothing to shard")
        n_train = writers["train"].docs + (held["train"] is not None)
        n_val = writers["val"].docs + (held["val"] is not None)
        # Training comes first: a one-document corpus trains; validation borrows only from a train side of 2+.
        dest = {"train": "val" if n_val == 0 and n_train > 1 else "train",
                "val": "train" if n_train == 0 else "val"}
        for side, h in held.items():
            if h is not None:
                writers[dest[side]].add(h)
        for w in writers.values():
            w.close()

        splits = {s: w.summary() for s, w in writers.items()}
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": getattr(tok, "pad_id", None),
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
            "corpus_stats": stats.to_dict() if stats is not None else None,
        }
        atomic_write_json(tmp / "meta.json", meta)
        if config is not None:
            write_config(config, tmp)
    return meta


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_meta(shard_dir: str | Path, expect_tokenizer_hash: str | None = None) -> dict[str, Any]:
    """Load `meta.json`, checking the format and (optionally) that the shards came from this tokenizer."""
    shard_dir = Path(shard_dir)
    path = shard_dir / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a shard directory (no meta.json): {shard_dir}")
    meta = read_json(path)
    if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported shard format {meta.get('format')!r} v{meta.get('version')!r}")
    if expect_tokenizer_hash is not None and meta["tokenizer_hash"] != expect_tokenizer_hash:
        raise ValueError(
            f"{shard_dir} was written with tokenizer {meta['tokenizer_hash']}, but this tokenizer is "
            f"{expect_tokenizer_hash}; re-run `kfoundry data shard` with the tokenizer you train with"
        )
    return meta


def iter_split(shard_dir: str | Path, split: str = "train") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield `(tokens, index)` per shard file of a split: a read-only memmap and its index rows."""
    shard_dir = Path(shard_dir)
    meta = read_meta(shard_dir)
    if split not in meta["splits"]:
        raise ValueError(f"unknown split {split!r}; this shard directory has {', '.join(meta['splits'])}")
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
