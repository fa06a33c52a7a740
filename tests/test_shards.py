"""Token shards (kfoundry.data.shards), the packed loader (kfoundry.data.loader) and `kfoundry data shard`."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch

from kfoundry.cli import main
from kfoundry.corpus import Document
from kfoundry.data.loader import PackedLoader
from kfoundry.data.shards import (
    DROP_EMPTY,
    LANG_CODES,
    doc_hash,
    iter_split,
    lang_name,
    read_documents,
    read_meta,
    split_of,
    token_dtype,
    write_shards,
)
from kfoundry.text import nfc
from kfoundry.tokenizer import KTokenizer, train_tokenizer

from conftest import MIXED_TEXTS

KO_WORDS = ["대한민국", "헌법", "국민", "자유", "권리", "오늘", "날씨", "맑음", "학교", "친구", "사랑", "한글"]
EN_WORDS = ["the", "quick", "brown", "fox", "law", "people", "freedom", "school", "weather", "today"]
EMOJI = ["😀", "🎉", "🇰🇷", "👍🏽"]


def make_texts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(text, lang) pairs: Korean, English and mixed documents with digits, emoji and NFD Hangul."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        words = rng.choices(KO_WORDS if kind != 1 else EN_WORDS, k=rng.randint(3, 40))
        text = f"{i} " + " ".join(words) + f" {rng.randint(0, 99999):,} {rng.choice(EMOJI)}"
        if kind == 2:  # decomposed jamo, as macOS and some web pages deliver Korean
            text = unicodedata.normalize("NFD", text) + " mixed English words"
        out.append((text, "en" if kind == 1 else "ko"))
    return out


def make_docs(n: int, seed: int = 0) -> list[Document]:
    texts = make_texts(n, seed)
    return [Document(text=t, id=f"doc-{i}", source="test", lang=lang) for i, (t, lang) in enumerate(texts)]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [t for t in MIXED_TEXTS if t] + [t for t, _ in make_texts(300, seed=99)]
    tok = train_tokenizer(texts, vocab_size=400)
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    tok.save(path)
    return path


@pytest.fixture(scope="session")
def tok(tok_dir: Path) -> KTokenizer:
    return KTokenizer.load(tok_dir)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory: pytest.TempPathFactory, tok: KTokenizer) -> Path:
    """120 documents, small shard files (several per split) so shard boundaries are exercised."""
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(make_docs(120), tok, out, val_fraction=0.2, seed=0, shard_tokens=500)
    return out


class Wide:
    """The test tokenizer, claiming a vocabulary too large for uint16 (so shards must be uint32)."""

    def __init__(self, tok: KTokenizer) -> None:
        self._tok = tok
        self.vocab_size = 70_000
        self.hash = "wide-" + tok.hash

    def __getattr__(self, name: str):
        return getattr(self._tok, name)


def stored_docs(path: Path, split: str) -> dict[int, np.ndarray]:
    """doc_hash -> stored tokens, for every document of a split."""
    return {int(row["doc_hash"]): np.asarray(tokens[row["start"] : row["start"] + row["length"]])
            for tokens, index in iter_split(path, split) for row in index}


def segments(row: torch.Tensor, bos: int) -> list[list[int]]:
    """Split a packed row at every BOS: one list per document (prefix) in the row."""
    ids = row.tolist()
    starts = [i for i, t in enumerate(ids) if t == bos] + [len(ids)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


# ---------------------------------------------------------------------------------------------------------
# Shards


def test_round_trip_mixed_text(tmp_path: Path, tok: KTokenizer) -> None:
    texts = MIXED_TEXTS + [t for t, _ in make_texts(30)]
    docs = [Document(text=t, id=f"m{i}", source="test", lang=None) for i, t in enumerate(texts)]
    meta = write_shards(docs, tok, tmp_path / "s", val_fraction=0.3, seed=1)

    by_hash = {doc_hash(d.id): d for d in docs}
    seen = 0
    for split in ("train", "val"):
        for h, toks in stored_docs(tmp_path / "s", split).items():
            assert toks[0] == tok.bos_id and toks[-1] == tok.eos_id
            assert tok.decode(toks[1:-1].tolist()) == nfc(by_hash[h].text)
            seen += 1
    # The empty string is the one document with no tokens: counted under its reason, not stored.
    assert meta["dropped"] == {DROP_EMPTY: 1}
    assert seen == meta["docs"] == len(texts) - 1 == meta["docs_seen"] - 1
    # NFD input comes back composed (stored text is NFC).
    nfd = next(d for d in docs if "\u1112\u1161\u11ab" in d.text)
    stored = {**stored_docs(tmp_path / "s", "train"), **stored_docs(tmp_path / "s", "val")}[doc_hash(nfd.id)]
    assert "한글" in tok.decode(stored[1:-1].tolist())
    # Byte and token accounting adds up across splits and languages.
    total_bytes = sum(len(nfc(t).encode()) for t in texts)
    assert meta["bytes"] == total_bytes
    for sp in meta["splits"].values():
        assert sum(v["tokens"] for v in sp["by_lang"].values()) == sp["tokens"]


def test_dtype_follows_vocab_size(tmp_path: Path, tok: KTokenizer) -> None:
    assert token_dtype(512) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(200_000) == np.uint32

    small = write_shards(make_docs(20), tok, tmp_path / "u16", val_fraction=0.0)
    wide = write_shards(make_docs(20), Wide(tok), tmp_path / "u32", val_fraction=0.0)
    assert small["dtype"] == "uint16" and wide["dtype"] == "uint32"
    assert (tmp_path / "u16/train-00000.bin").stat().st_size == 2 * small["tokens"]
    assert (tmp_path / "u32/train-00000.bin").stat().st_size == 4 * wide["tokens"]
    a = [d.tolist() for d in read_documents(tmp_path / "u16")]
    b = [d.tolist() for d in read_documents(tmp_path / "u32")]
    assert a == b and len(a) == 20


def test_split_is_deterministic_and_disjoint(tmp_path: Path, tok: KTokenizer) -> None:
    docs = make_docs(300)
    m1 = write_shards(docs, tok, tmp_path / "a", val_fraction=0.2, seed=0)
    write_shards(docs, tok, tmp_path / "b", val_fraction=0.2, seed=0)
    m3 = write_shards(docs, tok, tmp_path / "c", val_fraction=0.2, seed=1)
    for name in m1["splits"]["train"]["files"] + m1["splits"]["val"]["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    train_a, val_a = set(stored_docs(tmp_path / "a", "train")), set(stored_docs(tmp_path / "a", "val"))
    train_c, val_c = set(stored_docs(tmp_path / "c", "train")), set(stored_docs(tmp_path / "c", "val"))
    assert not train_a & val_a and not train_c & val_c
    assert len(train_a | val_a) == 300
    assert val_a != val_c  # another seed, another split
    assert 30 <= len(val_a) <= 90 and 30 <= m3["splits"]["val"]["docs"] <= 90  # ~20 % of 300
    # The side of a document depends on its id alone, not on what else is in the corpus.
    assert val_a == {doc_hash(d.id) for d in docs if split_of(d.id, 0, 0.2) == "val"}
    write_shards(docs[::-1][:200], tok, tmp_path / "d", val_fraction=0.2, seed=0)
    assert set(stored_docs(tmp_path / "d", "val")) <= val_a


def test_tiny_corpus_keeps_both_splits(tmp_path: Path, tok: KTokenizer) -> None:
    docs = make_docs(3)
    meta = write_shards(docs, tok, tmp_path / "three", val_fraction=0.01)
    assert meta["splits"]["train"]["docs"] == 2 and meta["splits"]["val"]["docs"] == 1
    one = write_shards(docs[:1], tok, tmp_path / "one", val_fraction=0.5)
    assert one["splits"]["train"]["docs"] == 1 and one["splits"]["val"]["docs"] == 0


def test_empty_corpus_is_a_clear_error(tmp_path: Path, tok: KTokenizer) -> None:
    with pytest.raises(ValueError, match="no documents"):
        write_shards([], tok, tmp_path / "empty")
    with pytest.raises(ValueError, match=DROP_EMPTY):
        write_shards([Document(text="", id="e", source="t")], tok, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()


def test_failure_midway_leaves_no_shard_dir(tmp_path: Path, tok: KTokenizer) -> None:
    def docs_then_crash():
        yield from make_docs(2500)  # > one encode batch, several 500-token shards already on disk
        raise OSError("disk vanished")

    with pytest.raises(OSError, match="disk vanished"):
        write_shards(docs_then_crash(), tok, tmp_path / "out", shard_tokens=500)
    assert list(tmp_path.iterdir()) == []  # neither the shard dir nor its temporary sibling


def test_existing_dir_needs_overwrite(tmp_path: Path, tok: KTokenizer) -> None:
    write_shards(make_docs(5), tok, tmp_path / "s")
    with pytest.raises(ValueError, match="already exists"):
        write_shards(make_docs(5), tok, tmp_path / "s")
    meta = write_shards(make_docs(9), tok, tmp_path / "s", overwrite=True)
    assert read_meta(tmp_path / "s")["docs"] == meta["docs"] == 9


def test_lang_codes_from_reader_tags() -> None:
    assert [lang_name(t) for t in ("ko", "ko-KR", "kor_Hang", "en", "eng_Latn", "ja", "other", None)] == [
        "ko", "ko", "ko", "en", "en", "other", "other", "unknown"]


# ---------------------------------------------------------------------------------------------------------
# Loader


def test_rows_are_consecutive_windows_of_the_document_stream(shard_dir: Path, tok: KTokenizer) -> None:
    """No token is cropped: the rows, each overlapping the next by one token, spell out the shuffled documents
    one after another (a document longer than a row continues in the next row)."""
    loader = PackedLoader(shard_dir, "train", batch_size=4, seq_len=64, seed=3)
    docs = {i: d.tolist() for i, d in enumerate(read_documents(shard_dir, "train"))}
    stream = [t for e in range(2) for i in loader.documents(e) for t in docs[int(i)]]
    assert stream[0] == tok.bos_id
    it = iter(loader)
    at = 0
    for _ in range(20):
        x, y = next(it)
        assert x.shape == y.shape == (4, 64) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
        for row_x, row_y in zip(x, y):
            assert torch.cat([row_x, row_y[-1:]]).tolist() == stream[at : at + 65]
            at += 64  # the next row starts with this row's last token


def test_resume_gives_the_same_batches_across_epochs(shard_dir: Path) -> None:
    def make() -> PackedLoader:
        return PackedLoader(shard_dir, "train", batch_size=3, seq_len=48, seed=7)

    ref = make()
    it = iter(ref)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))  # survives a trip through trainer_state.json
    expected = []
    while ref.epoch < 2:  # across two epoch boundaries
        expected.append(next(it))

    resumed = make()
    resumed.load_state_dict(state)
    got = list(zip(range(len(expected)), resumed))
    for (xe, ye), (_, (xg, yg)) in zip(expected, got):
        assert torch.equal(xe, xg) and torch.equal(ye, yg)
    # A different batch size may resume from the same document position.
    other = PackedLoader(shard_dir, "train", batch_size=6, seq_len=48, seed=7)
    other.load_state_dict(state)
    x, _ = next(iter(other))
    assert torch.equal(x[:3], expected[0][0])
    # A state from another seed describes another order: refused.
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(shard_dir, "train", batch_size=3, seq_len=48, seed=8).load_state_dict(state)


def test_epochs_reshuffle(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir, "train", batch_size=2, seq_len=32, seed=0)
    orders = [loader.documents(e) for e in range(3)]
    assert sorted(orders[0].tolist()) == sorted(orders[1].tolist()) == list(range(loader.num_docs))
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    again = PackedLoader(shard_dir, "train", batch_size=2, seq_len=32, seed=0)
    assert np.array_equal(again.documents(1), orders[1])


def test_ranks_read_disjoint_documents(shard_dir: Path, tok: KTokenizer) -> None:
    loaders = [PackedLoader(shard_dir, "train", batch_size=2, seq_len=400, seed=5, rank=r, world_size=3,
                            loop=False) for r in range(3)]
    # What the batches actually contain (whole documents, identified by content) never overlaps across ranks.
    seen = []
    for lo in loaders:
        docs = set()
        for x, y in lo:
            for row_x, row_y in zip(x, y):
                docs.update(tuple(s) for s in segments(torch.cat([row_x, row_y[-1:]]), tok.bos_id)[:-1])
        seen.append(docs)
    assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


def test_global_batch_is_independent_of_world_size(shard_dir: Path) -> None:
    """Rank r of w owns rows r::w of the global batch; one process with batch_size * w sees the same rows, and a
    state saved by 2 ranks resumes in 1 process (and back) at the same global position."""
    single = iter(PackedLoader(shard_dir, "train", batch_size=4, seq_len=48, seed=3))
    ranks = [iter(PackedLoader(shard_dir, "train", batch_size=2, seq_len=48, seed=3, rank=r, world_size=2))
             for r in range(2)]
    for _ in range(7):  # across an epoch boundary of this small split
        x, _ = next(single)
        parts = [next(it)[0] for it in ranks]
        assert torch.equal(x[0::2], parts[0]) and torch.equal(x[1::2], parts[1])
    two = [PackedLoader(shard_dir, "train", batch_size=2, seq_len=48, seed=3, rank=r, world_size=2) for r in range(2)]
    its = [iter(lo) for lo in two]
    for _ in range(3):
        for it in its:
            next(it)
    assert two[0].state_dict() == two[1].state_dict()
    one = PackedLoader(shard_dir, "train", batch_size=4, seq_len=48, seed=3)
    one.load_state_dict(two[0].state_dict())
    x1, _ = next(iter(one))
    x2 = [next(it)[0] for it in its]
    assert torch.equal(x1[0::2], x2[0]) and torch.equal(x1[1::2], x2[1])


def test_lang_filter(shard_dir: Path, tok: KTokenizer) -> None:
    meta = read_meta(shard_dir)
    by_lang = meta["splits"]["val"]["by_lang"]
    assert set(by_lang) == {"ko", "en"}
    for lang in ("ko", "en"):
        loader = PackedLoader(shard_dir, "val", batch_size=2, seq_len=32, lang=lang, loop=False)
        assert loader.num_docs == by_lang[lang]["docs"]
        for x, _ in loader:
            text = tok.decode([t for t in x.flatten().tolist() if t not in (tok.bos_id, tok.eos_id)])
            hangul = sum("가" <= c <= "힣" for c in text)
            assert (hangul > 0) == (lang == "ko")
    with pytest.raises(ValueError, match="unknown lang"):
        PackedLoader(shard_dir, "val", lang="fr")
    assert LANG_CODES["ko"] != LANG_CODES["en"]


def test_one_pass_ends_and_repeats(shard_dir: Path, tok: KTokenizer) -> None:
    loader = PackedLoader(shard_dir, "val", batch_size=4, seq_len=40, loop=False)
    first = list(loader)
    second = list(loader)
    assert first and len(first) == len(second)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    # The pass is one stream of every document's tokens, cut into rows of 40 targets that overlap by one token:
    # every token but the first is predicted exactly once, and only the last row is padded.
    total = int(loader._lengths.sum())
    rows = -(-(total - 1) // 40)
    assert sum(x.shape[0] for x, _ in first) == rows
    assert all(x.shape[0] == 4 for x, _ in first[:-1])
    assert sum(int((y >= 0).sum()) for _, y in first) == total - 1
    x, y = first[-1]
    assert (y[:-1] >= 0).all() and (x[:-1] != tok.pad_id).all()
    pad = int((y[-1] == -1).sum())
    assert pad == 40 * rows - (total - 1) and (x[-1, 41 - pad :] == tok.pad_id).all()
    assert y[-1, 39 - pad] == tok.eos_id  # the pass ends on the last document's EOS


def test_tiny_validation_split_still_yields(tmp_path: Path, tok: KTokenizer) -> None:
    write_shards(make_docs(3), tok, tmp_path / "s", val_fraction=0.01)
    (x, y), = list(PackedLoader(tmp_path / "s", "val", batch_size=8, seq_len=512, loop=False))
    n = read_meta(tmp_path / "s")["splits"]["val"]["tokens"]
    assert x.shape == (1, 512) and int((y >= 0).sum()) == n - 1
    assert list(PackedLoader(tmp_path / "s", "val", lang="en", loop=False)) == []  # no English in val
    with pytest.raises(ValueError, match="no documents to train on"):
        PackedLoader(tmp_path / "s", "val", lang="en")  # a looping loader needs documents


def test_tokenizer_hash_is_checked(shard_dir: Path, tok: KTokenizer) -> None:
    PackedLoader(shard_dir, expect_tokenizer_hash=tok.hash)
    with pytest.raises(ValueError, match="tokenizer"):
        PackedLoader(shard_dir, expect_tokenizer_hash="0" * 16)


def test_loader_memory_maps_shards(shard_dir: Path) -> None:
    loader = PackedLoader(shard_dir, "train")
    assert len(loader._shards) == len(read_meta(shard_dir)["splits"]["train"]["files"]) > 1
    assert all(isinstance(s.base, np.memmap) for s in loader._shards)  # views of the mapped files, not copies


# ---------------------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_a_shard_dir(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": t}, ensure_ascii=False) for t in MIXED_TEXTS + [t for t, _ in make_texts(40)]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "shards"
    rc = main(["data", "shard", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out),
               "--val-fraction", "0.1", "--seed", "3"])
    assert rc == 0
    meta = read_meta(out)
    assert meta["docs"] == len(MIXED_TEXTS) - 1 + 40  # the empty line is dropped by the corpus reader
    assert meta["corpus_stats"]["dropped"] == {"empty": 1}
    assert meta["split_rule"]["seed"] == 3
    cfg = json.loads((out / "run_config.json").read_text(encoding="utf-8"))
    assert cfg["val_fraction"] == 0.1 and cfg["tokenizer_hash"] == meta["tokenizer_hash"]
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"{meta['docs']:,} docs" in line and "empty=1" in line
    # Running again into the same dir is refused (exit 2) unless --overwrite.
    args = ["data", "shard", "--corpus", str(corpus), "--tokenizer", str(tok_dir), "--out", str(out)]
    assert main(args) == 2
    assert main(args + ["--overwrite"]) == 0


def test_cli_missing_inputs_exit_2(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shards"
    rc = main(["data", "shard", "--corpus", str(tmp_path / "nope.jsonl"), "--tokenizer", str(tok_dir),
               "--out", str(out)])
    assert rc == 2 and not out.exists()
    assert "nope.jsonl" in capsys.readouterr().err
    rc = main(["data", "shard", "--corpus", str(tmp_path), "--tokenizer", str(tmp_path / "no-tok"), "--out", str(out)])
    assert rc == 2 and "no-tok" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Sharding as datatrove tasks (kfoundry.data.shard_tasks): the same files whatever the task count


def shard_files(path: Path) -> dict[str, bytes]:
    """Every file of a shard directory but run_config.json (which records the task count)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.name != "run_config.json"}


def write_corpus_files(folder: Path, n_files: int, docs_per_file: int) -> None:
    folder.mkdir(parents=True)
    texts = make_texts(n_files * docs_per_file, seed=5)
    for f in range(n_files):
        lines = [json.dumps({"text": t, "lang": lang}, ensure_ascii=False)
                 for t, lang in texts[f * docs_per_file:(f + 1) * docs_per_file]]
        if f == 1:
            lines.insert(3, '{"text": "broken')  # counted by the reader, in every layout
        (folder / f"part-{f}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / "notes.md").write_text("skipped, and said so")


@pytest.mark.parametrize("layout", ["files", "stream"])
def test_task_count_does_not_change_the_shards(tmp_path: Path, tok_dir: Path, layout: str) -> None:
    """1 task (this process) vs 3 tasks on 2 local worker processes: byte-identical shard files, and so the
    same token streams and the same train/validation split. `files`: a folder of 4 files (each task reads
    only its own files); `stream`: one file, cut into blocks of 25 documents dealt round-robin."""
    from kfoundry.data.shard_tasks import shard_corpus

    if layout == "files":
        write_corpus_files(tmp_path / "corpus", n_files=4, docs_per_file=60)
        spec = str(tmp_path / "corpus")
    else:
        write_corpus_files(tmp_path / "corpus", n_files=1, docs_per_file=240)
        spec = str(tmp_path / "corpus" / "part-0.jsonl")
    kw = dict(val_fraction=0.2, seed=3, shard_tokens=700, block_docs=25)
    one = shard_corpus(spec, tok_dir, tmp_path / "one", tasks=1, **kw)
    three = shard_corpus(spec, tok_dir, tmp_path / "three", tasks=3, workers=2, **kw)
    assert one == three
    assert shard_files(tmp_path / "one") == shard_files(tmp_path / "three")
    assert one["splits"]["val"]["docs"] > 0 and len(one["splits"]["train"]["files"]) > 2  # boundaries exercised
    # ... and the same as the single-process writer on the same documents
    from kfoundry.corpus import CorpusStats, iter_documents

    stats = CorpusStats()
    write_shards(iter_documents(spec, stats), KTokenizer.load(tok_dir), tmp_path / "ref", stats=stats,
                 val_fraction=0.2, seed=3, shard_tokens=700)
    assert shard_files(tmp_path / "ref") == shard_files(tmp_path / "one")
    assert not list(tmp_path.glob("*.work")) and not list(tmp_path.glob(".parts-*"))  # work files removed
    if layout == "files":
        assert one["corpus_stats"]["dropped"] == {"malformed_json": 1}
        assert one["corpus_stats"]["notes"] == [f"skipped unsupported files in {spec!r}: 1 .md"]


def test_sharding_tasks_resume_and_cli(tmp_path: Path, tok_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """A unit finished by an earlier (killed) run is not encoded again; the CLI takes --tasks/--workers."""
    from kfoundry.data.shard_tasks import EncodeShards

    write_corpus_files(tmp_path / "corpus", n_files=3, docs_per_file=40)
    spec = str(tmp_path / "corpus")
    # an earlier run got as far as task 1 of 3 (a unit of its own): its part files survive the kill
    work = tmp_path / "out.work"
    EncodeShards(spec, tok_dir, work / "parts", val_fraction=0.1).run(rank=1, world_size=3)
    (finished,) = sorted((work / "parts").glob("*.part.json"))
    stamp = finished.stat().st_mtime_ns
    EncodeShards(spec, tok_dir, work / "parts", val_fraction=0.1).run(rank=1, world_size=3)
    assert finished.stat().st_mtime_ns == stamp  # the finished unit is skipped, not encoded again
    from kfoundry.data.shard_tasks import WORK_SETTINGS
    from kfoundry.fileio import atomic_write_json

    atomic_write_json(work / WORK_SETTINGS, {"spec": spec, "tokenizer": str(tok_dir.resolve()), "tasks": 3, "seed": 0,
                                             "val_fraction": 0.1, "shard_tokens": 1 << 24, "max_chars_per_doc": None,
                                             "block_docs": 4096})
    from kfoundry.data.shard_tasks import shard_corpus

    meta = shard_corpus(spec, tok_dir, tmp_path / "out", tasks=3, workers=2, val_fraction=0.1)
    assert meta["docs"] == 120
    assert not work.exists()  # merged, then cleaned up
    code = main(["data", "shard", "--corpus", spec, "--tokenizer", str(tok_dir), "--out", str(tmp_path / "cli"),
                 "--val-fraction", "0.1", "--tasks", "3", "--workers", "2"])
    assert code == 0 and "120 docs" in capsys.readouterr().out
    assert shard_files(tmp_path / "cli") == shard_files(tmp_path / "out")
