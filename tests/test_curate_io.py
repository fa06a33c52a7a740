"""The curation writers write exactly the records datatrove's JsonlWriter writes (tests for kfoundry.data.curate.io)."""

from __future__ import annotations

import gzip
import unicodedata

from datatrove.data import Document
from datatrove.pipeline.writers.jsonl import JsonlWriter

from kfoundry.data.curate.accounting import ExclusionRecorder, StepTally
from kfoundry.data.curate.io import RankJsonlReader, _flat_without_shard, flat_record, ingest_writer, stage_writer

TEXTS = ["전체관람가는 아닌것 같아요", "Hello, world! 123", "이모지 😀👍 와 숫자 42",
         unicodedata.normalize("NFD", "한국어 NFD 텍스트"), "줄\n바꿈\t탭 \"따옴표\" \\ 역슬래시", "ünïcödé ß"]


def _docs(n_shards: int = 3) -> list[Document]:
    return [Document(text=t, id=f"d{i}", metadata={"source": "s", "lang_hint": "ko", "shard": f"{i % n_shards:05d}",
                                                   "meta": {"rating": i, "nested": [1.5, None, "가"]}})
            for i, t in enumerate(TEXTS * 3)]


def _reference(folder, adapter, compression, filename):
    return JsonlWriter(str(folder), output_filename=filename, compression=compression, adapter=adapter)


def _write_all(writer, docs, rank: int) -> None:
    with writer as w:
        for d in docs:
            w.write(d, rank=rank)


def test_stage_and_ingest_writers_write_datatrove_bytes(tmp_path):
    docs = _docs()
    _write_all(stage_writer(tmp_path / "fast"), docs, rank=2)
    _write_all(_reference(tmp_path / "ref", flat_record, None, "${rank}.jsonl"), docs, rank=2)
    assert (tmp_path / "fast" / "00002.jsonl").read_bytes() == (tmp_path / "ref" / "00002.jsonl").read_bytes()

    _write_all(ingest_writer(tmp_path / "ingest"), docs, rank=0)
    _write_all(_reference(tmp_path / "ingest_ref", _flat_without_shard, None, "${shard}.jsonl"), docs, rank=0)
    names = sorted(p.name for p in (tmp_path / "ingest").iterdir())
    assert names == ["00000.jsonl", "00001.jsonl", "00002.jsonl"]
    for name in names:
        assert (tmp_path / "ingest" / name).read_bytes() == (tmp_path / "ingest_ref" / name).read_bytes()
    # and the next stage reads back what was written, metadata included
    back = list(RankJsonlReader(tmp_path / "ingest").run(rank=1))
    assert [(d.id, d.text, d.metadata["meta"]) for d in back] == [
        (d.id, d.text, d.metadata["meta"]) for d in docs if d.metadata["shard"] == "00001"]


def test_compressed_writers_hold_the_same_records(tmp_path):
    docs = _docs()
    _write_all(stage_writer(tmp_path / "fast", compressed=True), docs, rank=0)
    _write_all(_reference(tmp_path / "ref", flat_record, "gzip", "${rank}.jsonl.gz"), docs, rank=0)
    fast = gzip.decompress((tmp_path / "fast" / "00000.jsonl.gz").read_bytes())
    assert fast == gzip.decompress((tmp_path / "ref" / "00000.jsonl.gz").read_bytes())
    assert fast.count(b"\n") == len(docs)


def test_exclusion_recorder_counts_and_writes_every_removal(tmp_path):
    rec = ExclusionRecorder(str(tmp_path / "removed"), "quality", "quality")
    rec.tally = tally = StepTally("quality")
    docs = _docs()
    with rec:
        for i, d in enumerate(docs):
            tally.enter(d)
            d.metadata["filter_reason"] = "too_short" if i % 2 else None
            rec.write(d, rank=1)
    lines = gzip.decompress((tmp_path / "removed" / "00001.jsonl.gz").read_bytes()).decode("utf-8").splitlines()
    assert len(lines) == len(docs)
    assert tally.removed == {"too_short": [9, sum(len(d.text) for d in docs[1::2])],
                             "quality": [9, sum(len(d.text) for d in docs[0::2])]}
    assert '"removed_by":"quality"' in lines[0] and TEXTS[0] in lines[0]


def test_lean_filter_keeps_and_excludes_what_datatrove_s_loop_does(tmp_path):
    """LeanFilter.run (our steps' loop) against datatrove's BaseFilter.run on the same step: the same documents
    kept, in order, and the same records handed to the exclusion writer."""
    from datatrove.pipeline.filters.base_filter import BaseFilter

    from kfoundry.data.curate.language import LanguageConfig, LanguageRouter
    from kfoundry.data.curate.lean import LeanFilter

    texts = TEXTS + ["", "日本語のテキスト", "12345 !!!", "Only English words here", "한국어 and English 반반"]
    outputs = {}
    for name, run in (("lean", LeanFilter.run), ("datatrove", BaseFilter.run)):
        step = LanguageRouter(LanguageConfig(keep=["ko", "mixed"]))
        step.exclusion_writer = stage_writer(tmp_path / name)
        docs = [Document(text=t, id=f"d{i}", metadata={}) for i, t in enumerate(texts * 2)]
        kept = [(d.id, d.metadata["lang"]) for d in run(step, iter(docs), rank=0)]
        outputs[name] = (kept, (tmp_path / name / "00000.jsonl").read_bytes())
    assert outputs["lean"] == outputs["datatrove"]
    kept, removed = outputs["lean"]
    assert 0 < len(kept) < len(texts) * 2 and removed.count(b'"filter_reason":"lang_') == len(texts) * 2 - len(kept)


def test_lean_reader_builds_datatrove_s_documents(tmp_path):
    """RankJsonlReader's own loop (no per-document timer or statistics) yields the documents datatrove's
    JsonlReader builds from the same file: text, id, metadata; and a file over the 1 MiB gzip write buffer
    decompresses to datatrove's records."""
    from datatrove.pipeline.readers import JsonlReader

    docs = _docs() * 1000  # ~1.6 MB of records: several gzip blocks
    _write_all(stage_writer(tmp_path / "fast"), docs, rank=0)
    ours = list(RankJsonlReader(tmp_path / "fast").run(rank=0))
    ref = list(JsonlReader(str(tmp_path / "fast"), add_file_path=False).read_file("00000.jsonl"))
    assert len(ours) == len(docs) == len(ref)
    assert [(d.text, d.id, d.metadata, d.media) for d in ours] == [(d.text, d.id, d.metadata, d.media) for d in ref]
    assert [d.text for d in ours] == [d.text for d in docs]  # NFD and emoji come back as written
    _write_all(stage_writer(tmp_path / "gz", compressed=True), docs, rank=0)
    _write_all(_reference(tmp_path / "gz_ref", flat_record, "gzip", "${rank}.jsonl.gz"), docs, rank=0)
    fast = gzip.decompress((tmp_path / "gz" / "00000.jsonl.gz").read_bytes())
    assert len(fast) > 1 << 20 and fast == gzip.decompress((tmp_path / "gz_ref" / "00000.jsonl.gz").read_bytes())


def test_worker_modules_are_preloaded_in_the_fork_server():
    """The local executor's fork server is told to import what every stage's workers unpickle, so that each
    stage's pool does not import kfoundry, datatrove and kiwipiepy again in every worker."""
    import importlib

    from multiprocess import forkserver

    from kfoundry.data.curate.stages import WORKER_MODULES, preload_worker_modules

    preload_worker_modules()
    assert forkserver._forkserver._preload_modules == ["__main__", *WORKER_MODULES]
    for name in WORKER_MODULES:  # a misspelt name would be skipped silently by the fork server
        importlib.import_module(name)
