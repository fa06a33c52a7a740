"""Step 4, decontamination: drop training documents that share a long word n-gram with an evaluation set.

A benchmark item that is also in the training data measures memory, not ability, so every registered
evaluation file is turned into an index of hashed n-grams (`build_index`) and each document that contains
one of them is dropped as `contaminated` (`Decontaminate`), with the matching task and n-gram kept in the
exclusion file.

What is ours and what is datatrove's. The filter is datatrove's `NGramsDecontFilter` (the same text
simplification, hashing and index file format); datatrove builds its index only from lighteval tasks on
the Hugging Face hub, so the index builder here reads local files instead, and the filter is extended in
one way: items shorter than n words are indexed whole (see below).

- **Sources**: a folder of `.tsv`/`.csv` (every cell of every data row), `.jsonl` (every string value)
  or `.txt` (every line) files, e.g. the local KoBEST copy in `shared/data/eval/kobest`. The task name is the
  folder name plus the file's path inside it: `kobest_boolq_dev`.
- **lm-eval tasks**: `lm-eval:NAME[,NAME...][@TASK_DIR]` reads the documents lm-eval itself evaluates (the
  test split, else validation) of each named task or group, every string field of each document (question,
  passage, choices) being an item; the task name is lm-eval's (`kobest_boolq`). kfoundry's offline KoBEST
  pack (`kfoundry/eval/tasks`, the same YAMLs `kfoundry eval --task-dir` uses) is always on lm-eval's path, with
  its data read from TASK_DIR (default: the shared KoBEST copy). Hub tasks (`kmmlu`, `haerae`, `click`, ...)
  work when their datasets are in the Hugging Face cache; offline and uncached they fail in one line.
- **Words**: datatrove's `simplify_text` (lower case, no punctuation, digits as 0; NFC kept), then a
  whitespace split.
  For Korean a space-separated word is an eojeol, the unit closest to an English word, so the default
  n = 13 means what it means for English (GPT-3's 13-gram rule). Morphemes would make 13-grams about
  five eojeols long and match common phrases.
- **Short items**: an item with fewer than `n_grams` words but at least `min_item_words` is indexed as one
  whole-item n-gram of its own length, and documents are checked for those lengths too; shorter items
  (a three-word review in SentiNeg, a COPA premise) are too generic to decontaminate by text overlap and
  are counted as `items_too_short` in the index report.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import struct
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import logging
import numpy as np
from datatrove.pipeline.decont import NGramsDecontConfig, NGramsDecontFilter
from datatrove.utils.hashing import HashConfig, create_hash_func
from datatrove.utils.text import TextNormConfig, simplify_text

from kfoundry.data.curate.lean import LeanFilter
from kfoundry.data.curate.recipe import shared_data_dir
from kfoundry.data.curate.words import JoinedWords, SpaceWords
from kfoundry.errors import ConfigError, MissingPathError
from kfoundry.fileio import atomic_write_json, read_json
from kfoundry.text import nfc

# sha1, not datatrove's default xxhash: datatrove's xxhash helper needs xxhash<4, and our environment has 4.x.
HASH = HashConfig(precision=64, hash_fc="sha1")
INDEX_FILE = "index.json"
SUFFIXES = (".tsv", ".csv", ".jsonl", ".txt")
LM_EVAL_PREFIX = "lm-eval:"
# The offline task pack's YAML files (kfoundry/eval/tasks): a path handed to lm-eval, not an import, so the
# data layer stays below the eval layer.
PACK_DIR = Path(__file__).resolve().parents[2] / "eval" / "tasks"
_PACK_NAME = re.compile(r"^(?:task|group):[ \t]*([\w\-]+)[ \t]*$", re.M)


def decont_config(n_grams: int) -> NGramsDecontConfig:
    # No diacritics stripping: datatrove does it through NFD, which decomposes Hangul syllables into jamo and
    # costs a Python call per character; lower-casing, digits -> 0 and punctuation removal stay.
    return NGramsDecontConfig(n_grams=n_grams, hash_config=HASH,
                              norm_config=TextNormConfig(norm_unicode_diacritics=False))


def item_words(text: str, cfg: NGramsDecontConfig) -> list[str]:
    return simplify_text(nfc(text), cfg.norm_config).split()


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def iter_items(path: Path) -> Iterator[str]:
    """The candidate texts of one evaluation file (see the module docstring for what each kind yields)."""
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        csv.field_size_limit(sys.maxsize)
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = (csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                      else csv.reader(f))
            next(reader, None)  # header
            for row in reader:
                yield from (cell for cell in row if cell)
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield from _strings(json.loads(line))
                    except json.JSONDecodeError:
                        continue
    elif suffix == ".txt":
        with open(path, encoding="utf-8") as f:
            yield from (line for line in f if line.strip())


def task_files(root: Path) -> list[tuple[str, Path]]:
    """(task name, file) for every evaluation file under `root`, in sorted order."""
    if not root.is_dir():
        raise MissingPathError(f"decontamination set not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    out = []
    for p in files:
        rel = p.relative_to(root).with_suffix("")
        name = "_".join([root.name, *rel.parts])
        out.append((re.sub(r"[^0-9A-Za-z_\-]+", "_", name), p))
    return out


def parse_lm_eval(source: str) -> tuple[list[str], Path]:
    """`lm-eval:a,b@DIR` -> (["a", "b"], DIR); DIR defaults to the shared KoBEST copy."""
    body = source[len(LM_EVAL_PREFIX):]
    names_text, at, task_dir = body.partition("@")
    names = [n.strip() for n in names_text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"decontamination source {source!r} names no lm-eval task; e.g. 'lm-eval:kobest'")
    return names, Path(task_dir).expanduser() if at else shared_data_dir() / "eval" / "kobest"


def _doc_strings(doc) -> Iterator[str]:
    """The text of an lm-eval document: its string fields and the strings in list fields (answer choices)."""
    for value in (doc.values() if isinstance(doc, dict) else [doc]):
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, str))


def lm_eval_tasks(source: str) -> list[tuple[str, Iterator[str]]]:
    """(lm-eval task name, its evaluated documents' strings) for every task an `lm-eval:` source names."""
    from lm_eval.tasks import TaskManager

    names, task_dir = parse_lm_eval(source)
    pack_names = {m for p in PACK_DIR.rglob("*.yaml") for m in _PACK_NAME.findall(p.read_text(encoding="utf-8"))}
    if set(names) & pack_names and not task_dir.is_dir():
        raise MissingPathError(f"{source}: the offline KoBEST data folder is missing: {task_dir}")
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)  # the pack shadows lm-eval's kobest
    manager = TaskManager(include_path=str(PACK_DIR), include_defaults=not set(names) <= pack_names,
                          metadata={"task_dir": str(task_dir.resolve())})
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{source}: lm-eval has no task or group {', '.join(map(repr, unknown))}")
    out: list[tuple[str, Iterator[str]]] = []
    for name in names:
        try:
            tasks = manager.load([name])["tasks"]  # flat {task name: Task}: groups expand to their tasks
        except Exception as e:  # datasets raises many kinds when offline and uncached
            first = str(e).splitlines()[0] if str(e) else ""
            raise MissingPathError(f"{source}: could not load the data of lm-eval task {name!r} "
                                   f"({type(e).__name__}: {first}); hub tasks need their dataset in the "
                                   "Hugging Face cache") from None
        for task_name, task in sorted(tasks.items()):
            out.append((task_name, (text for doc in task.eval_docs for text in _doc_strings(doc))))
    return out


def _source_items(source: str | Path) -> list[tuple[str, str, Iterator[str]]]:
    """(task name, where it came from, its item texts) for one decontamination source."""
    if str(source).startswith(LM_EVAL_PREFIX):
        return [(re.sub(r"[^0-9A-Za-z_\-]+", "_", t), f"{source} ({t})", items)
                for t, items in lm_eval_tasks(str(source))]
    return [(task, str(path), iter_items(path)) for task, path in task_files(Path(source))]


def source_label(source: str | Path) -> str:
    """How a source is recorded in the index settings: folders resolved, lm-eval sources as written."""
    return str(source) if str(source).startswith(LM_EVAL_PREFIX) else str(Path(source).resolve())


def build_index(sources: list[str | Path], out_dir: str | Path, *, n_grams: int = 13,
                min_item_words: int = 8) -> dict:
    """Write `<task>.index.hashes` files and `index.json` (the report) into `out_dir`; return the report.

    Skips the work when `out_dir/index.json` already describes the same sources and settings.
    """
    if not 1 <= min_item_words <= n_grams:
        raise ConfigError(f"decontamination: need 1 <= min_item_words <= n_grams, got {min_item_words}, {n_grams}")
    out_dir = Path(out_dir)
    settings = {"sources": [source_label(s) for s in sources], "n_grams": n_grams,
                "min_item_words": min_item_words, "tokenizer": "simplify_text + whitespace", "hash": str(HASH)}
    if (out_dir / INDEX_FILE).is_file():
        old = read_json(out_dir / INDEX_FILE)
        if old.get("settings") == settings:
            return old
    cfg = decont_config(n_grams)
    hash_fn = create_hash_func(cfg.hash_config)
    hashes: dict[str, set[int]] = defaultdict(set)
    tasks: dict[str, dict] = {}
    sizes: set[int] = set()
    for source in sources:
        for task, where, items in _source_items(source):
            stat = tasks.setdefault(task, {"file": where, "items": 0, "items_indexed": 0,
                                           "items_too_short": 0})
            for text in items:
                if not any(c.isalpha() for c in text):
                    continue  # ids, numbers and scores are not text items
                stat["items"] += 1
                words = item_words(text, cfg)
                if len(words) < min_item_words:
                    stat["items_too_short"] += 1
                    continue
                n = min(n_grams, len(words))
                sizes.add(n)
                stat["items_indexed"] += 1
                hashes[task].update(hash_fn(" ".join(words[i:i + n])) for i in range(len(words) - n + 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.index.hashes"):
        old.unlink()
    for task, hs in hashes.items():
        np.array(sorted(hs), dtype=cfg.hash_config.np_dtype).tofile(out_dir / f"{task}.index.hashes")
        tasks[task]["hashes"] = len(hs)
    report = {"settings": settings, "sizes": sorted(sizes), "tasks": tasks,
              "items": sum(t["items"] for t in tasks.values()),
              "items_indexed": sum(t["items_indexed"] for t in tasks.values()),
              "items_too_short": sum(t["items_too_short"] for t in tasks.values())}
    atomic_write_json(out_dir / INDEX_FILE, report)
    return report


class Decontaminate(LeanFilter, NGramsDecontFilter):
    """datatrove's n-gram decontamination filter, also checking the whole-item lengths of short items; its
    filter loop is `LeanFilter`'s (no per-document timing), its hashes computed without datatrove's wrapper."""

    name = "🦠 Decontaminate (n-grams)"

    def __init__(self, index_dir: str | Path, n_grams: int = 13, exclusion_writer=None):
        super().__init__(str(index_dir), config=decont_config(n_grams), exclusion_writer=exclusion_writer,
                         language=SpaceWords())
        self.index_dir = str(index_dir)
        self._sizes: list[int] | None = None
        # our index is SHA-1/64 (HASH); any other hash config keeps datatrove's function
        self._hash_of = _sha1_64 if self.config.hash_config == HASH else self.hash_func

    def filter(self, doc) -> bool | tuple[bool, str]:
        if self._index_hashes is None:
            self.load_index_hashes()
            report = read_json(Path(self.index_dir) / INDEX_FILE)
            self._sizes = sorted(set(report.get("sizes") or []), reverse=True)
        if not self._index_hashes:
            return True
        words = JoinedWords(self.tokenizer.word_tokenize(simplify_text(doc.text, self.config.norm_config)), " ")
        index, hash_of = self._index_hashes, self._hash_of
        for n in self._sizes:
            # the same n-grams in the same order as datatrove's loop, each a slice of one joined string
            for gram in words.grams(n):
                task = index.get(hash_of(gram))
                if task is not None:
                    doc.metadata["contaminated_ngram"] = nfc(gram)
                    doc.metadata["contaminated_task"] = task
                    self.stat_update(f"contaminated_{task}")
                    return False, "contaminated"
        return True


_SHA1_64 = struct.Struct("<Q").unpack_from


def _sha1_64(text: str) -> int:
    """datatrove's `sha1_hash64` (the first 8 bytes of SHA-1, little-endian) without the slice and tuple."""
    return _SHA1_64(hashlib.sha1(text.encode("utf-8")).digest())[0]
