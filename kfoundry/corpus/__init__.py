"""Where text comes from: a corpus SPEC in, a stream of NFC-normalized `Document`s out.

    from kfoundry.corpus import iter_documents, CorpusStats
    stats = CorpusStats()
    for doc in iter_documents("starter", stats):           # or "data/", "a.jsonl:0.7,b.txt:0.3", "hf:org/ds@train"
        ...
    print(stats.to_dict())                                   # read / yielded / dropped by reason / ...

SPEC forms (grammar in kfoundry.corpus.spec, guide in docs/corpus.md):
- `starter`                       Korean constitution + bills and Python's reference topics, offline
- `path.txt|.jsonl|.jsonl.gz|.parquet|.csv` or a folder of them; `#field=NAME` / `#column=NAME` picks the
                                   text field (default `text`), e.g. `ChatbotData.csv#column=Q`
- `hf:NAME[:CONFIG][@SPLIT]`      streamed with `datasets` (a hub id or a local dataset folder)
- `a.jsonl:0.7,b.txt:0.3`         a mix; weights are character shares (kfoundry.corpus.mix)

`iter_documents` checks the whole spec before it returns (missing paths, unknown kinds, unopenable hub
datasets raise `CorpusError`), so a stage fails in its first second, not an hour into a run. Reading is
lazy: documents are produced as the caller asks for them, and bad records are counted; when the stream ends,
one line on stderr says how many were dropped and why, so a count is never only in a JSON file. Damage that
means the input itself is wrong is an error instead: a truncated .jsonl.gz/.parquet (unless the spec says
`#truncated=keep`), a .txt file that is not UTF-8, an unfinished `data prepare` output (kfoundry.corpus.prepared).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from collections import Counter
from typing import Iterator

from kfoundry.corpus.document import CorpusError, CorpusStats, Document, finish, guess_lang
from kfoundry.corpus.files import expand_path, read_file
from kfoundry.corpus.hub import hub_records, open_hub
from kfoundry.corpus.mix import weighted_interleave
from kfoundry.corpus.prepared import resolve_prepared
from kfoundry.corpus.spec import HubSource, PathSource, Source, StarterSource, parse_spec
from kfoundry.corpus.starter import describe_starter, part_paths, starter_records

__all__ = ["CorpusError", "CorpusStats", "Document", "describe_sources", "file_specs", "guess_lang",
           "iter_documents"]


def iter_documents(
    spec: str,
    stats: CorpusStats | None = None,
    *,
    max_chars_per_doc: int | None = None,
    seed: int = 0,
) -> Iterator[Document]:
    """Documents of SPEC, in a deterministic order. Counts go into `stats` as the stream is consumed.

    max_chars_per_doc cuts longer documents (counted as changed["truncated"]; the document is kept).
    seed only breaks ties between equally-behind sources of a mix (see kfoundry.corpus.mix).
    """
    if max_chars_per_doc is not None and (
        isinstance(max_chars_per_doc, bool) or not isinstance(max_chars_per_doc, int) or max_chars_per_doc < 1
    ):
        raise CorpusError(f"max_chars_per_doc must be a positive integer, got {max_chars_per_doc!r}")
    stats = stats if stats is not None else CorpusStats()
    parts = parse_spec(spec)
    # Open every source now (not lazily) so that any spec error surfaces before the first document.
    streams = [(p.source.label, p.weight, _open(p.source, stats, max_chars_per_doc)) for p in parts]
    stream = streams[0][2] if len(streams) == 1 else weighted_interleave(streams, stats, seed)
    return _report_drops(stream, spec, stats)


def _report_drops(docs: Iterator[Document], spec: str, stats: CorpusStats) -> Iterator[Document]:
    """Pass `docs` through; when the stream ends, print one line on stderr if records were dropped."""
    before, read_before = Counter(stats.dropped), stats.read
    yield from docs
    dropped = stats.dropped - before
    if dropped:
        reasons = ", ".join(f"{k}={v:,}" for k, v in sorted(dropped.items()))
        first = next((w[0] for k, w in sorted(stats.examples.items()) if k in dropped and w), "")
        print(f"[corpus] {spec}: {sum(dropped.values()):,} of {stats.read - read_before:,} records dropped ({reasons})"
              + (f"; first at {first}" if first else ""), file=sys.stderr, flush=True)


def _open(source: Source, stats: CorpusStats, max_chars: int | None) -> Iterator[Document]:
    if isinstance(source, StarterSource):
        part_paths()  # fails now if konlpy or pydoc_data is missing
        return finish(starter_records(), stats, max_chars)
    if isinstance(source, HubSource):
        return finish(hub_records(source, open_hub(source)), stats, max_chars)
    source = _prepared(source)
    entries, skipped = expand_path(source)
    if skipped:
        listed = ", ".join(f"{n} {suffix}" for suffix, n in sorted(skipped.items()))
        stats.notes.append(f"skipped unsupported files in {source.path!r}: {listed}")
    records = itertools.chain.from_iterable(read_file(e) for e in entries)
    return finish(records, stats, max_chars)


def file_specs(spec: str) -> list[tuple[str, int]] | None:
    """(spec, bytes) of each file of a one-path SPEC, in reading order, or None for any other SPEC.

    Reading the returned specs one after another gives exactly the documents of SPEC, with the same ids:
    this is how parallel tasks split a folder between them (kfoundry.data.shard_tasks). A mix, a hub
    dataset or the starter is one stream that cannot be split by file.
    """
    parts = parse_spec(spec)
    if len(parts) != 1 or not isinstance(parts[0].source, PathSource):
        return None
    source = _prepared(parts[0].source)
    entries, _ = expand_path(source)
    options = (f"#field={source.field}" if source.field else "") + ("#truncated=keep" if source.keep_truncated else "")
    return [(e.path + options, os.path.getsize(e.path)) for e in entries]


def _prepared(source: PathSource) -> PathSource:
    """A `data prepare` output is read only when finished, and then as its curated folder."""
    path = resolve_prepared(source.path)
    return source if path == source.path else dataclasses.replace(source, path=path)


def describe_sources(spec: str) -> list[dict]:
    """What SPEC reads, for data cards and the provenance ledger; touches no document and no network.

    One dict per file, hub dataset or starter part: source, kind, path, licence (None when unknown),
    weight, plus field/config/split where they apply.
    """
    described: list[dict] = []
    for part in parse_spec(spec):
        source = part.source
        if isinstance(source, StarterSource):
            entries = describe_starter()
        elif isinstance(source, HubSource):
            entries = [
                {"source": source.label, "kind": "hf", "path": source.name, "licence": None,
                 "config": source.config, "split": source.split, "field": source.field or "text"}
            ]
        else:
            assert isinstance(source, PathSource)
            files, _ = expand_path(_prepared(source))
            entries = [
                {"source": f.path, "kind": f.kind, "path": os.path.abspath(f.path), "licence": None,
                 "field": None if f.kind == "txt" else f.field}
                for f in files
            ]
        described.extend({**e, "weight": part.weight} for e in entries)
    return described
