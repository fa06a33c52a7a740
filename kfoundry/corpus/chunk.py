"""Split long documents into paragraph-sized pieces before sharding.

The packed loader starts every row at a document's BOS and discards what does not fit (see
kfoundry/data/loader.py), so a document much longer than the training context is mostly never seen. For corpora
of long documents at short contexts (the `starter` corpus at seq_len 256 trains on ~14% of its tokens), splitting
documents at paragraph boundaries first keeps nearly all of the text. Each piece becomes its own document with
the id `<id>~<k>`; the train/validation split then happens per piece, which is fine for pretraining text but
means pieces of one source document can land on both sides (say so when reporting validation loss).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

from kfoundry.corpus.document import CorpusStats, Document


def _pieces(text: str, max_chars: int) -> list[str]:
    """Greedy packing of paragraphs (then lines, then words) into pieces of at most max_chars characters."""
    if len(text) <= max_chars:
        return [text]
    for sep in ("\n\n", "\n", " "):
        parts = text.split(sep)
        if len(parts) > 1:
            break
    else:
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    out: list[str] = []
    current = ""
    for part in parts:
        candidate = f"{current}{sep}{part}" if current else part
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            out.append(current)
        if len(part) > max_chars:
            out.extend(_pieces(part, max_chars))  # a single over-long paragraph: split it at a finer level
            current = ""
        else:
            current = part
    if current:
        out.append(current)
    return [p for p in (x.strip() for x in out) if p]


def split_long_documents(docs: Iterable[Document], max_chars: int | None, stats: CorpusStats | None = None) -> Iterator[Document]:
    """Yield documents unchanged when short enough, else their pieces (counted as changed["split"]). None: never
    split."""
    if not max_chars:
        yield from docs
        return
    for doc in docs:
        pieces = _pieces(doc.text, max_chars)
        if len(pieces) == 1:
            yield doc
            continue
        if stats is not None:
            stats.change("split", doc.id)
        for k, piece in enumerate(pieces):
            yield dataclasses.replace(doc, text=piece, id=f"{doc.id}~{k}", meta={**doc.meta, "piece": k})
