"""The `starter` corpus: a small Korean + English sample that needs no download.

It is built only from files that our declared dependencies already put on disk, so `kfoundry speedrun`
works on a machine without internet:

- kolaw   the Constitution of the Republic of Korea (konlpy's data/corpus/kolaw/constitution.txt), one
          document for the preamble, one per article (제1조 … 제130조, each headed by its chapter title) and
          one for the addenda (부칙). Articles are short, but there are many of them: with ~130 Korean
          documents instead of a dozen, the document-level train/validation split reliably puts Korean text
          in validation, so per-language bits per byte can be measured even on this small sample.
- kobill  ten National Assembly bills from 2010 (konlpy's data/corpus/kobill/*.txt), one document each.
          They were extracted from PDFs, so form feeds and page numbers ("- 3 -") are removed.
- pydoc   the Python reference topics that ship with CPython (`pydoc_data.topics`, ~465k characters of
          English prose and code), one document per topic.

Korean is about a ninth of the characters (~59k of ~524k). The three parts are interleaved one document
at a time, so any prefix of the stream (a quick tokenizer run, a one-minute speedrun) already holds both
languages. Licences are in `STARTER_PARTS` and docs/corpus.md.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path
from pydoc_data.topics import topics
from typing import Iterator

from kfoundry.corpus.document import CorpusError, Record

STARTER_PARTS = {
    "kolaw": {
        "licence": "Public work, not protected by copyright (Korean Copyright Act art. 7: the Constitution, "
        "statutes, treaties and regulations)",
        "lang": "ko",
        "origin": "konlpy data/corpus/kolaw/constitution.txt",
    },
    "kobill": {
        "licence": "Public work, not protected by copyright (Korean Copyright Act art. 7: legislative "
        "documents of the National Assembly)",
        "lang": "ko",
        "origin": "konlpy data/corpus/kobill/*.txt",
    },
    "pydoc": {
        "licence": "PSF License Version 2 (Python documentation; code examples also 0BSD)",
        "lang": "en",
        "origin": "CPython pydoc_data/topics.py",
    },
}

_CHAPTER = re.compile(r"^제\d+장\s")  # "제1장 총강"
_ARTICLE = re.compile(r"^제\d+조(의\d+)?\s")  # "제1조 ①대한민국은 민주공화국이다."
_ADDENDA = re.compile(r"부칙\s*(<[^>]*>)?")  # the line reads "펼침  부칙 <헌법 제10호, 1987.10.29.>  부칙보기"
_PAGE_NUMBER = re.compile(r"^-\s*\d+\s*-$")


def konlpy_corpus_dir() -> Path:
    # find_spec locates the package without importing it (konlpy's import pulls in its Java bridge).
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the 'starter' corpus needs the konlpy package (pip install konlpy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "corpus"
    if not (path / "kolaw" / "constitution.txt").is_file():
        raise CorpusError(f"konlpy is installed but its corpus files are missing under {path}")
    return path


def pydoc_topics_path() -> Path:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or not spec.origin:
        raise CorpusError("the 'starter' corpus needs Python's pydoc_data module, missing from this Python")
    return Path(spec.origin)


def part_paths() -> dict[str, Path]:
    corpus = konlpy_corpus_dir()
    return {"kolaw": corpus / "kolaw" / "constitution.txt", "kobill": corpus / "kobill", "pydoc": pydoc_topics_path()}


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def constitution_records(path: Path) -> list[Record]:
    """Preamble, articles (with their chapter title) and addenda of the Constitution, each one record."""
    sections: list[tuple[str, list[str]]] = [("preamble", [])]
    chapter, chapter_title, article = 0, "", 0
    for line in _lines(path.read_text(encoding="utf-8")):
        if _CHAPTER.match(line):
            chapter += 1
            chapter_title = line
            continue
        if _ARTICLE.match(line) and sections[-1][0] != "addenda":
            article += 1
            sections.append((f"chapter-{chapter:02d}-article-{article:03d}", [chapter_title]))
        elif line.startswith("펼침") and "부칙" in line:
            match = _ADDENDA.search(line)
            sections.append(("addenda", []))
            line = " ".join(x for x in ("부칙", match.group(1) if match else None) if x)
        sections[-1][1].append(line)
    return [_starter_record("kolaw", key, "\n".join(lines), {"title": lines[0]}) for key, lines in sections]


def bill_records(folder: Path) -> list[Record]:
    records = []
    for path in sorted(folder.glob("*.txt")):
        lines = [x for x in _lines(path.read_text(encoding="utf-8").replace("\f", "\n")) if not _PAGE_NUMBER.match(x)]
        records.append(_starter_record("kobill", path.stem, "\n".join(lines), {"bill": path.stem, "title": lines[0]}))
    return records


def pydoc_records() -> list[Record]:
    return [_starter_record("pydoc", key, topics[key].rstrip(), {"topic": key}) for key in sorted(topics)]


def _starter_record(part: str, key: str, text: str, meta: dict) -> Record:
    return Record(id=f"starter:{part}#{key}", source=f"starter:{part}", text=text, lang=STARTER_PARTS[part]["lang"], meta=meta)


def starter_records() -> Iterator[Record]:
    """All starter records, interleaved one at a time across the three parts (see the module docstring)."""
    paths = part_paths()
    parts = [constitution_records(paths["kolaw"]), bill_records(paths["kobill"]), pydoc_records()]
    for group in itertools.zip_longest(*parts):
        yield from (r for r in group if r is not None)


def describe_starter() -> list[dict]:
    paths = part_paths()
    return [
        {"source": f"starter:{name}", "kind": "starter", "path": str(paths[name]), **info}
        for name, info in STARTER_PARTS.items()
    ]
