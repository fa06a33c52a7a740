"""KoBEST from local TSV files, shaped exactly like the Hugging Face dataset lm-eval's `kobest_*` tasks read.

lm-eval's KoBEST tasks load `skt/kobest_v1` from the hub. Offline, the same benchmark sits in the TSV files of
SKT-LSL/KoBEST_datarepo (`../shared/data/eval/kobest/{boolq,copa,wic,hellaswag,sentineg}/{train,dev}.tsv`).
This module reads those files into a `datasets.DatasetDict` with the hub dataset's field names and label
encoding, so the task YAMLs in `kfoundry/eval/tasks/kobest/` can use the very same prompts, choices and metrics
as lm-eval's (tests/test_eval_tasks.py renders both and compares them).

    TSV (datarepo v1.0)                                  ->  hub fields (skt/kobest_v1)
    boolq     ID, Text, Question, Answer(True/False)     ->  paragraph, question, label (0 = False, 1 = True)
    copa      ID, sentence, question, 1, 2, Answer(1/2)  ->  premise, question, alternative_1, alternative_2,
                                                             label (0/1)
    wic       ID, Target, SENTENCE1, ..., SENTENCE2, ..., ANSWER  ->  word, context_1, context_2, label
    hellaswag context, choice1..choice4, label(0-3)      ->  context, ending_1..ending_4, label
    sentineg  ID, Label(0/1), Text                       ->  sentence, label

Two quirks of the files, handled here rather than hidden:
- Columns are found by header name, never by position (sentineg's train and dev files order them differently).
- Most fields are written raw, but a few (hellaswag train) are CSV-quoted ("..." with "" inside). A field is
  un-quoted only when it is wrapped in quotes and every inner quote is doubled; a raw field that merely starts
  with a quoted title ('"국제시장"은 ...') keeps its quotes.
The dev split is served as `validation`. Test splits are deliberately absent (report dev figures).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfoundry.errors import ConfigError, DataError, MissingPathError
from kfoundry.text import nfc

SUBSETS = ("boolq", "copa", "wic", "hellaswag", "sentineg")
SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}
ENV_DIR = "KFOUNDRY_KOBEST_DIR"


def default_dir() -> Path:
    """$KFOUNDRY_KOBEST_DIR, else $KFOUNDRY_SHARED_DATA/eval/kobest, else ../shared/data/eval/kobest."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    shared = os.environ.get("KFOUNDRY_SHARED_DATA")
    if shared:
        return Path(shared) / "eval" / "kobest"
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "eval" / "kobest"


# ---------------------------------------------------------------------------------------------------- reading


def unquote_field(field: str) -> str:
    """Undo CSV quoting only where the field really is CSV-quoted (see the module docstring)."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        inner = field[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def read_tsv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header, as dicts; NFC text; a short row is an error, not a skip."""
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"KoBEST file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path} is empty")
    header = [h.strip() for h in lines[0].rstrip("\r").split("\t")]
    rows = []
    for n, line in enumerate(lines[1:], start=2):
        cells = line.rstrip("\r").split("\t")
        if len(cells) != len(header):
            raise DataError(f"{path}:{n}: {len(cells)} columns, header has {len(header)}")
        rows.append({h: nfc(unquote_field(c)) for h, c in zip(header, cells)})
    return rows


def _bool_label(value: str, where: str) -> int:
    v = value.strip().lower()
    if v in ("true", "1"):
        return 1
    if v in ("false", "0"):
        return 0
    raise DataError(f"{where}: expected True/False, got {value!r}")


def _int_label(value: str, allowed: range, where: str, offset: int = 0) -> int:
    try:
        label = int(value.strip()) - offset
    except ValueError:
        raise DataError(f"{where}: expected an integer label, got {value!r}") from None
    if label not in allowed:
        raise DataError(f"{where}: label {value!r} out of range")
    return label


def _col(row: dict[str, str], *names: str) -> str:
    """The first of `names` present in the row (header spellings vary between files)."""
    for name in names:
        if name in row:
            return row[name]
    raise KeyError(f"none of the columns {names} in row with columns {sorted(row)}")


def _boolq(row: dict[str, str], where: str) -> dict[str, Any]:
    return {"paragraph": _col(row, "Text"), "question": _col(row, "Question"),
            "label": _bool_label(_col(row, "Answer"), where)}


def _copa(row: dict[str, str], where: str) -> dict[str, Any]:
    return {"premise": _col(row, "sentence"), "question": _col(row, "question"),
            "alternative_1": _col(row, "1"), "alternative_2": _col(row, "2"),
            "label": _int_label(_col(row, "Answer"), range(2), where, offset=1)}


def _wic(row: dict[str, str], where: str) -> dict[str, Any]:
    return {"word": _col(row, "Target"), "context_1": _col(row, "SENTENCE1"), "context_2": _col(row, "SENTENCE2"),
            "label": _bool_label(_col(row, "ANSWER"), where)}


def _hellaswag(row: dict[str, str], where: str) -> dict[str, Any]:
    doc: dict[str, Any] = {"context": _col(row, "context")}
    for i in range(1, 5):
        doc[f"ending_{i}"] = _col(row, f"choice{i}")
    doc["label"] = _int_label(_col(row, "label"), range(4), where)
    return doc


def _sentineg(row: dict[str, str], where: str) -> dict[str, Any]:
    return {"sentence": _col(row, "Text"), "label": _int_label(_col(row, "Label"), range(2), where)}


CONVERTERS: dict[str, Callable[[dict[str, str], str], dict[str, Any]]] = {
    "boolq": _boolq, "copa": _copa, "wic": _wic, "hellaswag": _hellaswag, "sentineg": _sentineg}


def read_subset(task_dir: str | Path, subset: str, split: str) -> list[dict[str, Any]]:
    """Documents of one KoBEST subset and split ('train' or 'validation') in the hub's schema."""
    if subset not in CONVERTERS:
        raise ConfigError(f"unknown KoBEST subset {subset!r}; choose one of {', '.join(SUBSETS)}")
    if split not in SPLIT_FILES:
        raise ConfigError(f"unknown split {split!r}; the offline pack has {', '.join(SPLIT_FILES)}")
    path = Path(task_dir) / subset / SPLIT_FILES[split]
    convert = CONVERTERS[subset]
    return [convert(row, f"{path}:{n}") for n, row in enumerate(read_tsv(path), start=2)]


def load_dataset(subset: str | None = None, task_dir: str | None = None, kobest_dir: str | None = None,
                 **_ignored: Any):
    """lm-eval `custom_dataset` hook: a DatasetDict {train, validation} for one subset.

    lm-eval calls this with the task's `dataset_kwargs` (which name the subset) merged with its run metadata
    (where `task_dir` / `kobest_dir` arrive from `kfoundry eval --task-dir` or `lm_eval --metadata`), plus
    whatever else the run put in metadata, which is ignored.
    """
    import datasets

    if subset is None:
        raise ConfigError("the KoBEST task YAML must set dataset_kwargs.subset")
    root = Path(task_dir or kobest_dir or default_dir())
    if not root.is_dir():
        raise MissingPathError(f"KoBEST directory not found: {root} (pass --task-dir DIR, or set ${ENV_DIR})")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(read_subset(root, subset, split))
                                 for split in SPLIT_FILES})


# ------------------------------------------------------------------------------------------ prompt functions
# The prompts of lm-eval's kobest tasks (lm_eval/tasks/kobest/*.yaml), restated; the test suite renders both.


def copa_doc_to_text(doc: dict) -> str:
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
    return f"{doc['premise']} {connector}"


def copa_doc_to_target(doc: dict) -> str:
    return doc["alternative_1"] if doc["label"] == 0 else doc["alternative_2"]


def copa_doc_to_choice(doc: dict) -> list[str]:
    return [doc["alternative_1"], doc["alternative_2"]]


def sentineg_doc_to_text(doc: dict) -> str:
    return f"문장: {doc['sentence']} 긍부정:"


def wic_doc_to_text(doc: dict) -> str:
    return f"문장1: {doc['context_1']} 문장2: {doc['context_2']} 두 문장에서 {doc['word']}가 같은 뜻으로 쓰였나?"


def hellaswag_process_docs(dataset):
    """Adds `query`, `choices` and `gold` to each hellaswag document."""
    def add_fields(doc: dict) -> dict:
        return {"query": f"문장: {doc['context']}",
                "choices": [doc[f"ending_{i}"] for i in range(1, 5)],
                "gold": int(doc["label"])}

    return dataset.map(add_fields)


# ------------------------------------------------------------------------------------------------ metric


def macro_f1(items: list[tuple[int, int]]) -> float:
    """Macro-averaged F1 over (gold, prediction) pairs, as lm-eval's kobest `f1` aggregation computes it.

    Classes are those seen among golds or predictions; a class never predicted (or never gold) gets F1 = 0,
    which is what scikit-learn's f1_score(average="macro") does (the tests compare the two).
    """
    if not items:
        raise ValueError("macro_f1 of no items")
    golds = [int(g) for g, _ in items]
    preds = [int(p) for _, p in items]
    scores = []
    for c in sorted(set(golds) | set(preds)):
        tp = sum(1 for g, p in zip(golds, preds) if g == c and p == c)
        fp = sum(1 for g, p in zip(golds, preds) if g != c and p == c)
        fn = sum(1 for g, p in zip(golds, preds) if g == c and p != c)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)
