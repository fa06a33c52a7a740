"""The readers and writers that connect the curation stages.

- `CorpusReader` is the only way documents enter: it runs kfoundry's own corpus reader
  (`kfoundry.corpus.iter_documents`, so every SPEC form works and bad records are counted under the same
  names as everywhere else in kfoundry) and deals the documents round-robin into `n_shards` JSONL files.
  Why not wrap `iter_documents` as a reader inside every stage: a SPEC is one stream (a single .jsonl.gz
  file cannot be split between workers without each of them decompressing all of it), so one task reads
  it once, and from then on every stage reads plain JSONL shards in parallel; on a cluster those shards are
  also what each node reads.
- `RankJsonlReader` reads exactly the file `<rank>.jsonl` of a folder. The MinHash and exact-dedup blocks
  remember documents by their position in a task's stream; reading "the file of my own rank" (instead of
  datatrove's "every n-th file of a sorted listing") keeps that position stable even when some task wrote
  no file at all.
- `stage_writer` writes `<rank>.jsonl` with metadata flattened into the record, which `RankJsonlReader`
  reads back unchanged.

The writers here are `FastJsonlWriter`s: they write the same bytes as datatrove's `JsonlWriter`, without its
per-document bookkeeping (two `Template.substitute` calls and document-length statistics for every record,
which cost more than reading the corpus did: 3.6 CPU s per 100k NSMC reviews in the one-process ingest).
The exclusion files are written at gzip level 1 instead of 9: a few percent larger files, the same
records, and a fraction of the time on the ~650k removals of a web corpus; records go to gzip in 1 MiB
blocks rather than one call per record. Neither the writers' loop nor `RankJsonlReader` times each document
or keeps per-document length statistics (datatrove does both, in every stage); their stats files get the
document totals once per task.
"""

from __future__ import annotations

import gzip
import io
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import orjson
from datatrove.data import Document
from datatrove.io import OutputFileManager
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.logging import logger
from datatrove.utils.typeshelper import StatHints

from kfoundry.corpus import CorpusStats, iter_documents
from kfoundry.fileio import atomic_write_json

READ_STEP = "read"


def shard_name(rank: int, compressed: bool = False) -> str:
    return f"{rank:05d}.jsonl" + (".gz" if compressed else "")


class CorpusReader(PipelineStep):
    """Documents of a corpus SPEC, each tagged with the shard it goes to; accounts for what it read."""

    type = "📖 - READER"
    name = "📖 kfoundry corpus"

    def __init__(self, spec: str, n_shards: int, out_dir: str | Path, seed: int = 0):
        super().__init__()
        if n_shards < 1:
            raise ValueError("n_shards must be positive")
        self.spec, self.n_shards, self.seed = spec, n_shards, seed
        self.accounting_file = str(Path(out_dir) / "accounting" / READ_STEP / "00000.json")

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        stats = CorpusStats()
        chars = 0
        hist: Counter = Counter()
        # No length cap here: enormous documents are the normalize step's to count (`too_long`).
        for i, doc in enumerate(iter_documents(self.spec, stats, max_chars_per_doc=None, seed=self.seed)):
            chars += len(doc.text)
            hist[len(doc.text).bit_length()] += 1
            meta = {"source": doc.source, "lang_hint": doc.lang, "shard": f"{i % self.n_shards:05d}"}
            if doc.meta:
                meta["meta"] = doc.meta  # nested, so a source field called "id" or "text" cannot clash
            yield Document(text=doc.text, id=doc.id, metadata=meta)
        s = stats.to_dict()
        if s["yielded"]:
            self.stat_update("documents", value=s["yielded"])
        atomic_write_json(self.accounting_file, {
            "step": READ_STEP, "docs_in": s["read"], "chars_in": chars, "docs_kept": s["yielded"],
            "chars_kept": chars, "chars_out": chars,
            # records that never became text carry no characters
            "removed": {k: {"docs": v, "chars": 0} for k, v in s["dropped"].items()},
            "changes": s["changed"],
            "examples": {k: [{"id": w, "text": ""} for w in v] for k, v in s["examples"].items()},
            "len_hist_in": {str(k): v for k, v in sorted(hist.items())},
            "kept_by_lang": {}, "notes": s["notes"],
        })


def flat_record(_writer, document: Document) -> dict:
    """A document as one flat JSON object: text, id and its metadata side by side.

    What datatrove's default adapter makes with `expand_metadata=True`, without its `dataclasses.asdict`
    deep copy (a third of a writer's time on short documents). Our metadata never holds "text" or "id":
    a source's own fields are nested under "meta".
    """
    return {"text": document.text, "id": document.id, **document.metadata}


class _FastGzipFiles(OutputFileManager):
    """datatrove's output file manager, opening gzip files at a chosen compression level (fsspec's is 9)."""

    def __init__(self, fs, level: int):
        super().__init__(fs, mode="wb", compression=None)
        self.level = level
        self._raw: list[Any] = []

    def get_file(self, filename):
        if filename not in self._output_files:
            raw = self.fs.open(filename, mode="wb")
            self._raw.append(raw)  # GzipFile(fileobj=...) does not close the file under it; close() does
            gz = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=self.level)
            # One record is one small write; gzip runs its CRC and deflate call per write, so records are
            # gathered into 1 MiB blocks first (the same stream of bytes goes into the same deflate state).
            self._output_files[filename] = io.BufferedWriter(gz, buffer_size=1 << 20)
        return self._output_files[filename]

    def close(self):
        super().close()
        for raw in self._raw:
            raw.close()
        self._raw.clear()


class FastJsonlWriter(JsonlWriter):
    """datatrove's `JsonlWriter` with one file per task (`${rank}...`) or per `key(document)`, and no
    per-document statistics beyond the count: the records written are byte for byte the same.

    key: names the output file of each document (without the extension); default: the task's rank.
    gzip_level: for `compressed` files; 9 is what datatrove writes, 1 is for the bulky exclusion files.
    """

    def __init__(self, folder: str | Path, adapter: Callable, compressed: bool = False,
                 key: Callable[[Document], str] | None = None, gzip_level: int = 9):
        ext = ".jsonl" + (".gz" if compressed else "")
        super().__init__(str(folder), output_filename="${rank}" + ext, compression=None, adapter=adapter)
        if compressed:
            self.output_mg = _FastGzipFiles(self.output_folder, gzip_level)
        self.ext = ext
        self.key = key
        self._written = 0  # counted here, added to datatrove's stats once when the files close

    def write(self, document: Document, rank: int = 0, **kwargs) -> None:
        name = (self.key(document) if self.key else f"{rank:05d}") + self.ext
        self._write(self.adapter(document), self.output_mg.get_file(name), name)
        self._written += 1

    def run(self, data, rank: int = 0, world_size: int = 1):
        """datatrove's `DiskWriter.run` without a timer around every document."""
        with self:
            for document in data:
                self.write(document, rank)
                yield document

    def close(self) -> None:
        if self._written:
            self.stat_update(StatHints.total, value=self._written)
            self._written = 0
        super().close()


def _flat_without_shard(_writer, document: Document) -> dict:
    record = flat_record(_writer, document)
    record.pop("shard", None)
    return record


def ingest_writer(folder: str | Path) -> JsonlWriter:
    """Writes each document into the shard file its `shard` tag names (the tag itself is not written)."""
    return FastJsonlWriter(folder, _flat_without_shard, key=lambda doc: doc.metadata["shard"])


def stage_writer(folder: str | Path, compressed: bool = False) -> JsonlWriter:
    return FastJsonlWriter(folder, flat_record, compressed=compressed)


class RankJsonlReader(JsonlReader):
    """Reads `<folder>/<rank>.jsonl` only (nothing when that task wrote no file)."""

    name = "🐿 Jsonl (own rank)"

    def __init__(self, folder: str | Path, compressed: bool = False):
        super().__init__(str(folder), compression="gzip" if compressed else None, add_file_path=False)
        self.compressed = compressed

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if data:
            yield from data
        name = shard_name(rank, self.compressed)
        if not self.data_folder.exists(name):
            return
        # datatrove's `read_file` loop without its per-document timer and length statistics (these files
        # are our own; the documents are built by the same adapter, skipped and warned about the same way)
        count = 0
        with self.data_folder.open(name, "r", compression=self.compression) as f:
            for li, line in enumerate(f):
                try:
                    document = self.get_document_from_dict(orjson.loads(line), name, li)
                except (EOFError, orjson.JSONDecodeError) as e:
                    logger.warning(f"Error when reading `{name}`: {e}")
                    continue
                if document:
                    count += 1
                    yield document
        if count:
            self.stat_update(StatHints.total, value=count)
