"""kfoundry.corpus: every source kind, bad-input accounting, NFC, mixes, spec errors, the starter corpus."""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import unicodedata
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kfoundry.corpus import CorpusError, CorpusStats, Document, describe_sources, guess_lang, iter_documents
from kfoundry.corpus import files as corpus_files
from kfoundry.errors import KFoundryError

NFD_HANGUL = "\u1112\u1161\u11ab\u1100\u1173\u11af"  # "한글" as decomposed jamo
BAD_UTF8 = b"\xff\xfe broken \xc3\x28"


def read_all(spec: str, **kwargs) -> tuple[list[Document], CorpusStats]:
    stats = CorpusStats()
    docs = list(iter_documents(spec, stats, **kwargs))
    return docs, stats


def assert_accounted(stats: CorpusStats) -> None:
    """Every record read is either yielded or dropped under a named reason."""
    assert stats.read == stats.yielded + sum(stats.dropped.values())


def assert_clean(docs: list[Document]) -> None:
    for d in docs:
        assert unicodedata.is_normalized("NFC", d.text)
        assert d.text.strip()
    assert len({d.id for d in docs}) == len(docs), "ids must be unique within a spec"


def write_jsonl_lines(path: Path, lines: list[bytes]) -> None:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


# A JSON Lines file holding one of every kind of bad line, plus good Korean/English/emoji/NFD lines.
JSONL_LINES = [
    json.dumps({"text": "대한민국 헌법 제1조", "id": "a"}, ensure_ascii=False).encode(),
    json.dumps({"text": "The quick brown fox.", "lang": "en-x"}).encode(),
    json.dumps({"text": f"{NFD_HANGUL} 2026년 😀"}, ensure_ascii=True).encode(),  # NFD via \\u escapes
    b'{"text": "cut off',  # malformed JSON
    b'{"text": "' + BAD_UTF8 + b'"}',  # invalid UTF-8
    b"[1, 2, 3]",  # valid JSON, not an object
    b'{"body": "no text field"}',  # missing field
    b'{"text": null}',  # null counts as missing
    b'{"text": 12345}',  # not a string
    b'{"text": "   \\n\\t "}',  # whitespace only
    b'{"text": ""}',  # empty
    b'{"text": "lone \\ud800 surrogate"}',  # decodes to an unencodable string
    b"",  # blank line: not a record at all
]
JSONL_DROPS = {
    "malformed_json": 1,
    "invalid_utf8": 1,
    "not_an_object": 1,
    "missing_field": 2,
    "non_string_text": 1,
    "empty": 2,
    "invalid_unicode": 1,
}


# --- starter -----------------------------------------------------------------------------------------


def test_starter_has_korean_and_english_with_licences():
    docs, stats = read_all("starter")
    assert_clean(docs)
    assert_accounted(stats)
    by_source = Counter(d.source for d in docs)
    # preamble + 130 articles + addenda; 10 bills; one doc per pydoc topic
    assert by_source["starter:kolaw"] == 132
    assert by_source["starter:kobill"] == 10
    assert by_source["starter:pydoc"] > 50
    langs = Counter(d.lang for d in docs)
    assert set(langs) == {"ko", "en"} and langs["ko"] == 142
    ko_chars = sum(len(d.text) for d in docs if d.lang == "ko")
    assert 40_000 < ko_chars < 100_000 and sum(len(d.text) for d in docs) > 400_000
    # interleaved: the first three documents already cover both languages
    assert {d.lang for d in docs[:3]} == {"ko", "en"}
    chapter1 = next(d for d in docs if d.id == "starter:kolaw#chapter-01-article-001")
    assert chapter1.text.startswith("제1장 총강") and "대한민국은 민주공화국이다" in chapter1.text
    addenda = next(d for d in docs if d.id == "starter:kolaw#addenda")
    assert addenda.text.startswith("부칙 <헌법 제10호") and "펼침" not in addenda.text
    assert not any("\f" in d.text for d in docs)
    described = describe_sources("starter")
    assert [d["source"] for d in described] == ["starter:kolaw", "starter:kobill", "starter:pydoc"]
    assert "art. 7" in described[0]["licence"] and "PSF" in described[2]["licence"]
    assert all(Path(d["path"]).exists() for d in described)


def test_starter_is_deterministic():
    first = [d.id for d in iter_documents("starter")]
    assert first == [d.id for d in iter_documents("starter")]


# --- .txt ---------------------------------------------------------------------------------------------


def test_txt_files_in_a_folder_are_one_document_each(tmp_path, mixed_texts):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(mixed_texts):
        (folder / f"{i}.txt").write_text(text + "\r\n", encoding="utf-8")
    (folder / "sub" / "z.txt").write_bytes(b"\xef\xbb\xbf" + "BOM 뒤의 한국어 문장".encode())  # BOM is stripped
    (folder / "README.md").write_text("# not a corpus file")
    (folder / ".hidden.txt").write_text("never read")
    docs, stats = read_all(str(folder))
    assert_clean(docs)
    assert_accounted(stats)
    assert stats.dropped == Counter({"empty": 1})  # a .txt that is not UTF-8 is an error (test below)
    assert stats.notes == [f"skipped unsupported files in {str(folder)!r}: 1 .md"]  # reported, not silent
    # sorted, recursive; text as written minus the trailing newline, CRLF folded, NFD composed
    names = [Path(d.source).relative_to(folder).as_posix() for d in docs]
    assert names == sorted(names, key=lambda n: Path(n).parts) and names[-1] == "sub/z.txt"
    texts = {Path(d.source).name: d.text for d in docs}
    assert texts["0.txt"] == mixed_texts[0]
    assert texts["4.txt"] == unicodedata.normalize("NFC", mixed_texts[4]) and "한글" in texts["4.txt"]
    assert texts["z.txt"] == "BOM 뒤의 한국어 문장"
    assert stats.changed["nfc_changed"] == 1
    langs = {Path(d.source).name: d.lang for d in docs}
    assert langs["0.txt"] == "ko" and langs["1.txt"] == "en" and langs["3.txt"] == "ko"


def test_large_txt_is_split_on_blank_lines(tmp_path, monkeypatch, mixed_texts):
    monkeypatch.setattr(corpus_files, "TXT_SPLIT_BYTES", 64)
    monkeypatch.setattr(corpus_files, "_SNIFF_BYTES", 16)  # the start is text; a later bad paragraph is counted
    path = tmp_path / "big.txt"
    body = b"\n\n\n".join(t.encode() for t in mixed_texts[:5]) + b"\n\n" + BAD_UTF8 + "\n\nlast 마지막\nline 줄\n".encode()
    path.write_bytes(body)
    docs, stats = read_all(str(path))
    assert_accounted(stats)
    assert [d.text for d in docs] == [unicodedata.normalize("NFC", t) for t in mixed_texts[:5]] + ["last 마지막\nline 줄"]
    assert [d.id for d in docs[:2]] == [f"{path}#1", f"{path}#4"]  # the line where each paragraph starts
    assert stats.dropped == Counter({"invalid_utf8": 1})


# --- JSON Lines ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_jsonl_counts_every_kind_of_bad_line(tmp_path, name):
    path = tmp_path / name
    write_jsonl_lines(path, JSONL_LINES)
    docs, stats = read_all(str(path))
    assert_clean(docs)
    assert_accounted(stats)
    assert stats.dropped == Counter(JSONL_DROPS)
    assert stats.read == len(JSONL_LINES) - 1  # the blank line is not a record
    assert [d.text for d in docs] == ["대한민국 헌법 제1조", "The quick brown fox.", "한글 2026년 😀"]
    assert [d.id for d in docs] == ["a", f"{path}#2", f"{path}#3"]  # a row's own id, else its position
    assert docs[0].meta == {"id": "a"} and docs[0].lang == "ko"
    assert docs[1].lang == "en-x"  # a tag from the source wins over the guess
    assert stats.examples["malformed_json"] == [f"{path}#4"]
    assert json.loads(json.dumps(stats.to_dict()))["dropped"]["empty"] == 2


def test_jsonl_field_option_and_truncation(tmp_path):
    path = tmp_path / "d.jsonl"
    write_jsonl_lines(path, [json.dumps({"body": "가나다라마바사 abc"}, ensure_ascii=False).encode(), '{"body": "짧다"}'.encode()])
    docs, stats = read_all(f"{path}#field=body", max_chars_per_doc=4)
    assert [d.text for d in docs] == ["가나다라", "짧다"]
    assert stats.changed["truncated"] == 1 and stats.yielded == 2


def test_truncated_gzip_is_an_error_unless_kept(tmp_path):
    """A half-copied .jsonl.gz must not pass for a smaller corpus (it used to yield a prefix and exit 0)."""
    path = tmp_path / "cut.jsonl.gz"
    lines = [json.dumps({"text": f"문서 {i} document 😀"}, ensure_ascii=False).encode() for i in range(2000)]
    blob = gzip.compress(b"\n".join(lines))
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorpusError, match=r"cut\.jsonl\.gz is truncated or corrupt .*'#truncated=keep'") as e:
        read_all(str(path))
    assert "\n" not in str(e.value)
    with pytest.raises(CorpusError, match="truncated or corrupt"):  # inside a folder too
        read_all(str(tmp_path))
    docs, stats = read_all(f"{path}#truncated=keep")  # the user's explicit choice: keep what was read
    assert 0 < len(docs) < 2000
    assert stats.dropped == Counter({"unreadable_file": 1})
    assert_accounted(stats)
    docs, _ = read_all(f"{path}#field=text#truncated=keep")  # options combine
    assert 0 < len(docs) < 2000
    with pytest.raises(CorpusError, match="only value"):
        read_all(f"{path}#truncated=yes")


def test_binary_txt_is_reported_as_not_utf8(tmp_path, monkeypatch):
    png = tmp_path / "photo.txt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    with pytest.raises(CorpusError, match=r"photo\.txt is not UTF-8 text"):
        read_all(str(png))
    cp949 = tmp_path / "euckr.txt"
    cp949.write_bytes("오늘 본 영화는 정말 재미있었다".encode("cp949"))
    with pytest.raises(CorpusError, match="not UTF-8 text .*iconv"):
        read_all(str(cp949))
    nul = tmp_path / "nul.txt"
    nul.write_bytes("한글 text 😀".encode() + b"\x00\x00")  # valid UTF-8 but a NUL: not a text file
    with pytest.raises(CorpusError, match="not UTF-8 text"):
        read_all(str(nul))
    # a large file is sniffed at its start; a multi-byte character cut at the sniff boundary is fine
    monkeypatch.setattr(corpus_files, "TXT_SPLIT_BYTES", 10)
    monkeypatch.setattr(corpus_files, "_SNIFF_BYTES", 7)
    big = tmp_path / "big.txt"
    big.write_text("한글한글\n\nNFD \u1112\u1161\u11ab 😀\n", encoding="utf-8")
    docs, _ = read_all(str(big))
    assert [d.text for d in docs] == ["한글한글", "NFD 한 😀"]
    monkeypatch.setattr(corpus_files, "_SNIFF_BYTES", 1 << 16)
    with pytest.raises(CorpusError, match="not UTF-8"):
        read_all(str(png))


def test_broken_jsonl_lines_are_counted_on_the_console(tmp_path, capsys):
    path = tmp_path / "d.jsonl"
    write_jsonl_lines(path, JSONL_LINES)
    docs, stats = read_all(str(path))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    dropped = sum(JSONL_DROPS.values())
    assert err[0].startswith(f"[corpus] {path}: {dropped} of {dropped + len(docs)} records dropped (")
    assert "malformed_json=1" in err[0] and "invalid_utf8=1" in err[0] and f"first at {path}#" in err[0]
    read_all(str(path), max_chars_per_doc=10 ** 6)
    capsys.readouterr()
    clean = tmp_path / "clean.jsonl"
    write_jsonl_lines(clean, JSONL_LINES[:3])
    read_all(str(clean))
    assert capsys.readouterr().err == ""  # nothing dropped, nothing said


# --- CSV ----------------------------------------------------------------------------------------------


def test_csv_by_column_with_bad_rows(tmp_path):
    path = tmp_path / "chat.csv"
    rows = [
        "Q,A,label",
        "안녕하세요 😀,반가워요,0",
        f'"multi\nline {NFD_HANGUL}",두 줄,1',
        ",빈 질문,0",  # empty text
        "short",  # a short row: Q is there, A and label are missing
    ]
    data = "\ufeff" + "\n".join(rows) + "\n"
    path.write_bytes(data.encode() + b"\xff\xfebroken,x,0\n" + "English question,answer,2\n".encode())
    docs, stats = read_all(f"{path}#column=Q")
    assert_accounted(stats)
    assert [d.text for d in docs] == ["안녕하세요 😀", "multi\nline 한글", "short", "English question"]
    assert docs[0].meta == {"A": "반가워요", "label": "0"} and docs[0].id == f"{path}#0"
    assert stats.dropped == Counter({"empty": 1, "invalid_utf8": 1})
    # the same file by a column it lacks: counted once for the file, the run goes on
    docs, stats = read_all(f"{path}#column=question")
    assert docs == [] and stats.dropped == Counter({"missing_column": 1})
    assert "columns: ['Q', 'A', 'label']" in stats.examples["missing_column"][0]
    # a short row has no value for A: missing_field
    docs, stats = read_all(f"{path}#column=A")
    assert stats.dropped["missing_field"] == 1 and "반가워요" in [d.text for d in docs]


# --- Parquet ------------------------------------------------------------------------------------------


def test_parquet_rows_and_bad_files(tmp_path):
    good = tmp_path / "good.parquet"
    pq.write_table(
        pa.table(
            {
                "text": ["한국어 문서입니다", None, f"{NFD_HANGUL} NFD", "  ", "English text here"],
                "score": [1, 2, 3, 4, 5],
                "raw": [b"\xed\x95\x9c", b"\xff", b"ok", b"x", b"y"],
            }
        ),
        good,
        row_group_size=2,
    )
    docs, stats = read_all(str(good))
    assert_accounted(stats)
    assert [d.text for d in docs] == ["한국어 문서입니다", "한글 NFD", "English text here"]
    assert [d.id for d in docs] == [f"{good}#0", f"{good}#2", f"{good}#4"]
    assert docs[0].meta == {"score": 1, "raw": "b'\\xed\\x95\\x9c'"}  # non-JSON values become strings
    assert stats.dropped == Counter({"missing_field": 1, "empty": 1})
    docs, stats = read_all(f"{good}#column=raw")  # a binary column is decoded as UTF-8
    assert [d.text for d in docs] == ["한", "ok", "x", "y"] and stats.dropped == Counter({"invalid_utf8": 1})
    docs, stats = read_all(f"{good}#column=score")
    assert docs == [] and stats.dropped == Counter({"non_string_text": 5})
    docs, stats = read_all(f"{good}#column=nope")
    assert stats.dropped == Counter({"missing_column": 1})

    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not really parquet")
    with pytest.raises(CorpusError, match="bad.parquet is truncated or corrupt"):
        read_all(str(bad))
    docs, stats = read_all(f"{bad}#truncated=keep")
    assert docs == [] and stats.dropped == Counter({"unreadable_file": 1})
    assert_accounted(stats)


# --- folders, describe_sources ------------------------------------------------------------------------


def test_folder_mixes_file_kinds_and_describes_them(tmp_path):
    folder = tmp_path / "mixed"
    (folder / "b").mkdir(parents=True)
    (folder / "a.txt").write_text("텍스트 파일 하나")
    write_jsonl_lines(folder / "b" / "c.jsonl.gz", [json.dumps({"content": "gz 안의 문서"}, ensure_ascii=False).encode()])
    (folder / "b" / "d.csv").write_text("content,x\nCSV 문서,1\n")
    pq.write_table(pa.table({"content": ["파켓 문서"]}), folder / "e.parquet")
    spec = f"{folder}#field=content"  # the option applies to every structured file; .txt ignores it
    docs, stats = read_all(spec)
    assert [d.text for d in docs] == ["텍스트 파일 하나", "gz 안의 문서", "CSV 문서", "파켓 문서"]
    assert {d.lang for d in docs} == {"ko"}
    described = describe_sources(spec)
    assert [(Path(d["source"]).name, d["kind"], d["field"]) for d in described] == [
        ("a.txt", "txt", None),
        ("c.jsonl.gz", "jsonl.gz", "content"),
        ("d.csv", "csv", "content"),
        ("e.parquet", "parquet", "content"),
    ]
    assert all(d["licence"] is None and d["weight"] == 1.0 for d in described)


# --- mixes --------------------------------------------------------------------------------------------


def make_lines(path: Path, prefix: str, n: int, width: int) -> None:
    """n documents of exactly `width` characters each."""
    path.write_text("".join(json.dumps({"text": f"{prefix}{i:05d}".ljust(width, "가")}, ensure_ascii=False) + "\n" for i in range(n)))


def char_share(docs: list[Document], source: str) -> float:
    return sum(len(d.text) for d in docs if d.source == source) / sum(len(d.text) for d in docs)


def test_mix_is_weighted_by_characters_at_every_prefix(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_lines(a, "a", 1000, 10)  # short documents
    make_lines(b, "b", 1000, 40)  # documents four times longer
    docs, stats = read_all(f"{a}:0.7,{b}:0.3")
    for n in (50, 200, len(docs)):
        # within one (longest) document of the requested share, wherever a reader stops
        assert abs(char_share(docs[:n], str(a)) - 0.7) <= 40 / sum(len(d.text) for d in docs[:n])
    # the mix ends when a runs out (1000 docs = 10,000 chars = 70%), so b gave ~4,286 chars = ~107 docs
    assert sum(d.source == str(a) for d in docs) == 1000
    assert 100 <= sum(d.source == str(b) for d in docs) <= 110
    assert len(stats.notes) == 1 and str(a) in stats.notes[0] and "ran out" in stats.notes[0]
    assert_accounted(stats)
    # relative weights: 7:3 is the same mix; and the same spec gives the same order again
    assert [d.id for d in docs] == [d.id for d in iter_documents(f"{a}:7,{b}:3")]
    assert [d.id for d in docs] == [d.id for d in iter_documents(f"{a}:0.7,{b}:0.3")]


def test_mix_seed_only_breaks_ties(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    make_lines(a, "a", 50, 20)
    make_lines(b, "b", 50, 20)
    orders = {}
    for seed in range(8):
        docs = list(iter_documents(f"{a}:1,{b}:1", seed=seed))
        assert abs(char_share(docs, str(a)) - 0.5) <= 20 / sum(len(d.text) for d in docs)
        orders[seed] = [d.source for d in docs]
        assert orders[seed] == [d.source for d in iter_documents(f"{a}:1,{b}:1", seed=seed)]
    assert len({tuple(o) for o in orders.values()}) == 2  # a-first or b-first, alternating either way


def test_mix_with_starter_and_describe(tmp_path):
    path = tmp_path / "ko.txt"
    path.write_text("짧은 한국어 문서")
    described = describe_sources(f"starter:0.8,{path}:0.2")
    assert [d["weight"] for d in described] == [0.8, 0.8, 0.8, 0.2]
    docs = list(itertools.islice(iter_documents(f"starter:0.8,{path}:0.2"), 10))
    assert str(path) in {d.source for d in docs}


# --- hub ----------------------------------------------------------------------------------------------


def test_hf_spec_streams_a_local_dataset_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "local_ds"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["허브 문서 하나", None, f"{NFD_HANGUL} hub"], "body": ["b1", "b2", "b3"]}), folder / "train.parquet")
    docs, stats = read_all(f"hf:{folder}")
    assert [d.text for d in docs] == ["허브 문서 하나", "한글 hub"]
    assert docs[0].source == f"hf:{folder}@train" and docs[0].id == f"hf:{folder}@train#0"
    assert docs[0].meta == {"body": "b1"} and docs[0].lang == "ko"
    assert stats.dropped == Counter({"missing_field": 1})
    docs, _ = read_all(f"hf:{folder}@train#field=body")
    assert [d.text for d in docs] == ["b1", "b2", "b3"]
    with pytest.raises(CorpusError, match="validation"):
        iter_documents(f"hf:{folder}@validation")
    with pytest.raises(CorpusError, match="not found"):
        iter_documents(f"hf:{tmp_path}/nope")
    assert describe_sources(f"hf:{folder}:default@train")[0]["config"] == "default"


# --- spec errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.txt", "corpus path not found: 'missing.txt'"),
        ("hub:some/dataset", "unknown corpus spec kind 'hub:'"),
        ("s3://bucket/x.jsonl", "unknown corpus spec kind 's3:'"),
        ("", "empty corpus spec"),
        ("a.txt:0.5", "a weight needs a mix"),
        ("starter,starter:1", "needs a positive weight"),
        ("starter:1,{tmp}/ok.txt:-1", "needs a positive weight"),
        ("starter:1,starter:2", "lists 'starter' twice"),
        ("{tmp}/ok.txt#colour=red", "bad option"),
        ("{tmp}/ok.txt#field=x", "does not apply to a .txt"),
        ("{tmp}/notes.md", "unsupported corpus file type '.md'"),
        ("{tmp}/empty_dir", "has no supported files"),
        ("starter:1,{tmp}/missing.jsonl:1", "corpus path not found"),
        ("hf:", "bad hub spec"),
    ],
)
def test_bad_specs_fail_fast_with_one_line(tmp_path, spec, message):
    (tmp_path / "ok.txt").write_text("좋아요")
    (tmp_path / "notes.md").write_text("# 메모")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "x.md").write_text("x")
    spec = spec.replace("{tmp}", str(tmp_path))
    with pytest.raises(CorpusError) as info:
        iter_documents(spec)  # raised by the call itself, before any document is requested
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, KFoundryError) and isinstance(info.value, ValueError)  # one line, exit 2


def test_cli_prints_a_corpus_error_as_one_line_with_exit_code_2(monkeypatch, capsys):
    from kfoundry import cli

    def build_parser() -> argparse.ArgumentParser:  # a stand-in stage that takes --corpus like the real ones
        parser = argparse.ArgumentParser(prog="kfoundry")
        stage = parser.add_subparsers().add_parser("probe")
        stage.add_argument("--corpus", required=True)
        stage.set_defaults(func=lambda args: sum(1 for _ in iter_documents(args.corpus)) and 0)
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    monkeypatch.delenv("KFOUNDRY_DEBUG", raising=False)
    assert cli.main(["probe", "--corpus", "missing.txt"]) == 2
    err = capsys.readouterr().err
    assert err == "kfoundry: error: corpus path not found: 'missing.txt'\n"
    assert cli.main(["probe", "--corpus", "starter"]) == 0


def test_bad_max_chars_and_literal_paths(tmp_path):
    with pytest.raises(CorpusError, match="max_chars_per_doc"):
        iter_documents("starter", max_chars_per_doc=0)
    odd = tmp_path / "a,b#c:0.5.txt"  # a real file whose name looks like a mix is taken literally
    odd.write_text("이름이 이상한 파일")
    assert [d.text for d in iter_documents(str(odd))] == ["이름이 이상한 파일"]


# --- stats and language -------------------------------------------------------------------------------


def test_stats_merge_and_language_guess(mixed_texts):
    a, b = CorpusStats(read=3, yielded=2), CorpusStats(read=2, yielded=1)
    a.drop("empty", "x#1")
    b.drop("empty", "y#1")
    b.change("truncated", "y#2")
    merged = a.merge(b).to_dict()
    assert merged["read"] == 5 and merged["dropped"] == {"empty": 2} and merged["changed"] == {"truncated": 1}
    assert merged["examples"]["empty"] == ["x#1", "y#1"]
    assert [guess_lang(t) for t in mixed_texts] == ["ko", "en", "ko", "ko", "ko", None]
    assert guess_lang("12,345 3.14% 😀") is None and guess_lang("Привет, мир") == "other"
    assert guess_lang("Samsung Galaxy S24 출시 가격은 얼마") == "ko"  # 30% Hangul suffices


# --- shared data --------------------------------------------------------------------------------------


def test_shared_nsmc_reviews_first_thousand(shared_data):
    path = shared_data / "ko" / "nsmc" / "reviews.jsonl.gz"
    stats = CorpusStats()
    docs = list(itertools.islice(iter_documents(str(path), stats), 1000))
    assert len(docs) == 1000 and stats.yielded == 1000
    assert_clean(docs)
    assert Counter(d.lang for d in docs)["ko"] > 900
    assert docs[0].meta["id"] == "10275182" and 1 <= docs[0].meta["rating"] <= 10
    assert docs[0].id == "10275182"  # the row's own id names the document (not its file position)


def test_a_rows_own_id_names_the_document_wherever_the_file_lies(tmp_path):
    """The split hashes document ids, so a JSONL row's own string `id` must be the id: a copy of the same file
    under another folder and name (another speedrun --out, another task count) splits the same way. Rows
    without one (or with a non-string or empty id) keep their position PATH#LINE."""
    rows = [{"id": "kr-0001", "text": "안녕하세요 👋"}, {"id": 7, "text": "Hello 123"},
            {"id": "", "text": unicodedata.normalize("NFD", "한국어 문서")}, {"text": "no id"}]
    body = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    a, b = tmp_path / "a" / "x.jsonl", tmp_path / "b" / "00001.jsonl"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text(body, encoding="utf-8")
    da, db = read_all(str(a))[0], read_all(str(b))[0]
    assert [d.id for d in da] == ["kr-0001", f"{a}#2", f"{a}#3", f"{a}#4"]
    assert [d.id for d in db] == ["kr-0001", f"{b}#2", f"{b}#3", f"{b}#4"]
    assert da[2].text == "한국어 문서" and da[0].meta["id"] == "kr-0001"


def test_shared_chatbot_csv_by_column(shared_data):
    path = shared_data / "ko" / "chatbot" / "ChatbotData.csv"
    questions, stats = read_all(f"{path}#column=Q")
    answers, _ = read_all(f"{path}#column=A")
    assert len(questions) == len(answers) == 11823 and stats.dropped == Counter()
    assert questions[0].text == "12시 땡!" and questions[0].meta == {"A": "하루가 또 가네요.", "label": "0"}
    assert answers[0].text == "하루가 또 가네요."
    assert_clean(questions)


def test_split_long_documents_keeps_all_text_in_bounded_pieces(mixed_texts):
    from kfoundry.corpus.chunk import split_long_documents

    paragraphs = [t for t in mixed_texts if t] * 30
    long_doc = Document(text="\n\n".join(paragraphs), id="d1", source="t", lang="ko")
    one_line = Document(text="가" * 250, id="d2", source="t", lang="ko")
    short = Document(text="짧은 문서 😀", id="d3", source="t", lang="ko")
    stats = CorpusStats()
    out = list(split_long_documents([long_doc, one_line, short], 100, stats))
    assert all(len(d.text) <= 100 for d in out)
    pieces = [d for d in out if d.id.startswith("d1~")]
    assert len(pieces) > 10 and [d.meta["piece"] for d in pieces] == list(range(len(pieces)))
    # nothing lost: every paragraph survives intact, in order
    assert "\n\n".join(d.text for d in pieces) == long_doc.text
    assert "".join(d.text for d in out if d.id.startswith("d2~")) == one_line.text
    assert out[-1] is short and stats.changed["split"] == 2
    assert list(split_long_documents([long_doc], 0)) == [long_doc]
