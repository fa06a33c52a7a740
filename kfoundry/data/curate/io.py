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
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from string import Template

from datatrove.data import Document
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter

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
            self.stat_update("documents")
            yield Document(text=doc.text, id=doc.id, metadata=meta)
        s = stats.to_dict()
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


def _flat_without_shard(_writer, document: Document) -> dict:
    record = flat_record(_writer, document)
    record.pop("shard", None)
    return record


def ingest_writer(folder: str | Path) -> JsonlWriter:
    """Writes each document into the shard file its `shard` tag names (the tag itself is not written)."""
    writer = JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=_flat_without_shard)
    # The one ingest task writes every shard, so the file name comes from the document, not the rank (set
    # after construction: datatrove warns about templates without ${rank}, which here is the point).
    writer.output_filename = Template("${shard}.jsonl")
    return writer


def stage_writer(folder: str | Path, compressed: bool = False) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl" + (".gz" if compressed else ""),
                       compression="gzip" if compressed else None, adapter=flat_record)


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
        for doc in self.read_file(name):
            self.update_doc_stats(doc)
            yield doc
