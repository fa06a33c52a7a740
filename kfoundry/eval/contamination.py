"""Did the model read the test? Long n-gram overlap between evaluated documents and the run's training shards.

A benchmark score means little if the questions were in the training data. For each evaluated task we take
the text of every evaluated document (all its string fields, the answer choices included), tokenize it with the
run's tokenizer, and look up each run of `n` consecutive tokens among all n-grams of the training split:

    documents_flagged   documents with at least one shared n-gram (the headline figure)
    ngram_overlap       share of the documents' n-grams found in training

Why tokens and why long n-grams: the shards already hold token ids, so no text is decoded and the whole training
split is scanned with vectorised numpy (a 64-bit polynomial hash per n-gram, sorted task hashes, binary search).
A verbatim copy of a document tokenizes the same way inside it, so its long n-grams match; n = 13 (the GPT-3
decontamination length, here in tokens) is long enough that everyday phrases rarely match by chance. Token ids
of different tokenizers are unrelated, so the shards must come from the checkpoint's tokenizer (checked by hash).
A flagged document is a reason to look, not proof of leakage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import json
import numpy as np

from kfoundry.data.shards import iter_split, read_meta

DEFAULT_N = 13
_MULT = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden ratio); arithmetic wraps mod 2^64


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every n-gram of a 1-D token array (empty when it is shorter than n)."""
    t = np.asarray(tokens).astype(np.uint64)
    if len(t) < n:
        return np.zeros(0, dtype=np.uint64)
    m = len(t) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULT + t[j:j + m] + np.uint64(1)  # +1 so that token 0 still changes the hash
    return h


def document_texts(doc: dict[str, Any]) -> list[str]:
    """The text of an lm-eval document: its string fields and strings inside list fields (answer choices)."""
    out: list[str] = []
    for value in doc.values():
        if isinstance(value, str) and value.strip():
            out.append(value)
        elif isinstance(value, (list, tuple)):
            out.extend(v for v in value if isinstance(v, str) and v.strip())
    return out


def train_ngrams_found(shard_dir: str | Path, wanted: np.ndarray, n: int) -> np.ndarray:
    """The subset of `wanted` hashes that occur somewhere in the training split of `shard_dir`."""
    wanted = np.unique(wanted)
    found = np.zeros(len(wanted), dtype=bool)
    if not len(wanted):
        return wanted
    chunk = 1 << 22  # tokens per step: bounded memory whatever the shard size
    for tokens, _ in iter_split(shard_dir, "train"):
        for start in range(0, len(tokens), chunk):
            window = np.asarray(tokens[start:start + chunk + n - 1])  # overlap so no n-gram is cut in two
            h = ngram_hashes(window, n)
            pos = np.searchsorted(wanted, h)
            pos[pos == len(wanted)] = 0
            found[pos[wanted[pos] == h]] = True
    return wanted[found]


def check(tasks: dict[str, Sequence[dict[str, Any]]], tokenizer, shard_dir: str | Path, *,
          n: int = DEFAULT_N) -> dict[str, dict[str, Any]]:
    """Overlap per task between its documents and the training shards (tokenizer hash must match the shards)."""
    meta = read_meta(shard_dir, expect_tokenizer_hash=tokenizer.hash)
    per_doc: dict[str, list[np.ndarray]] = {}
    for task, docs in tasks.items():
        hashes = []
        for doc in docs:
            parts = [ngram_hashes(np.array(ids), n) for ids in tokenizer.encode_batch(document_texts(doc))]
            hashes.append(np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64))
        per_doc[task] = hashes
    everything = [h for hs in per_doc.values() for h in hs]
    found = train_ngrams_found(shard_dir, np.concatenate(everything) if everything else np.zeros(0, np.uint64), n)
    report = {}
    for task, hashes in per_doc.items():
        hits = [np.isin(h, found) for h in hashes]
        total = sum(len(h) for h in hashes)
        report[task] = {
            "documents": len(hashes),
            "documents_flagged": sum(int(x.any()) for x in hits),
            "ngrams": total,
            "ngrams_in_training": int(sum(int(x.sum()) for x in hits)),
            "ngram_overlap": (sum(int(x.sum()) for x in hits) / total) if total else 0.0,
            "n": n,
            "train_tokens": int(meta["splits"]["train"].get("tokens", 0)),
            "shards": str(shard_dir),
        }
    return report


def find_shards(model_path: str | Path) -> Path | None:
    """The training shards of the run a checkpoint belongs to: RUN/shards beside RUN/ckpt/step-N, or the
    checkpoint a Hugging Face export names in kfoundry_source.json."""
    path = Path(model_path).resolve()
    source = path / "kfoundry_source.json"
    if source.is_file():
        path = Path(json.loads(source.read_text(encoding="utf-8"))["checkpoint"])
    for parent in (path.parent.parent, path.parent):
        if (parent / "shards" / "meta.json").is_file():
            return parent / "shards"
    return None


def iter_docs(samples: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The documents of lm-eval's logged samples."""
    return [s["doc"] for s in samples if isinstance(s.get("doc"), dict)]


def add_groups(report: dict[str, dict[str, Any]], groups: dict[str, list[str]]) -> dict[str, dict[str, Any]]:
    """Group totals (e.g. `kobest`) summed over the subtasks that were checked."""
    out = dict(report)
    for group, subtasks in groups.items():
        parts = [report[t] for t in subtasks if t in report]
        if not parts:
            continue
        ngrams = sum(p["ngrams"] for p in parts)
        hits = sum(p["ngrams_in_training"] for p in parts)
        out[group] = {**parts[0], "documents": sum(p["documents"] for p in parts),
                      "documents_flagged": sum(p["documents_flagged"] for p in parts), "ngrams": ngrams,
                      "ngrams_in_training": hits, "ngram_overlap": hits / ngrams if ngrams else 0.0}
    return out
