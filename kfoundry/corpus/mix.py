"""Weighted mixes: `a.jsonl:0.7,b.txt:0.3`.

Semantics (also in docs/corpus.md):

- Weights are shares of **characters**, not of documents. A Korean movie review is ~35 characters and a
  constitution chapter ~3,000; "70% of the data" means 70% of the text, which is what the model sees.
  Weights are relative: `a:7,b:3` is the same mix as `a:0.7,b:0.3`.
- The next document always comes from the source that is furthest below its share, i.e. with the
  smallest `chars_taken / weight` (deficit scheduling, as in weighted fair queueing). So every prefix of
  the stream holds the requested shares to within one document, wherever a consumer stops reading.
- It is deterministic and needs no random draws. The seed only decides which source goes first when
  sources are equally behind (at the start, for instance); it never changes the shares.
- The mix ends as soon as the source it needs next has run out ("first exhausted", the default of
  `datasets.interleave_datasets`): continuing with the others would silently break the shares. A note
  in the stats says which source ran out and after how many characters.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Iterable, Iterator

from kfoundry.corpus.document import CorpusStats, Document


def weighted_interleave(
    streams: list[tuple[str, float, Iterable[Document]]], stats: CorpusStats, seed: int = 0
) -> Iterator[Document]:
    """Interleave (label, weight, documents) streams by character share; see the module docstring."""
    iters = [iter(docs) for _, _, docs in streams]
    # Exact rational shares (0.7 -> 7/10), so "a:7,b:3" and "a:0.7,b:0.3" schedule identically instead of
    # differing wherever float rounding breaks a tie the other way.
    weights = [Fraction(repr(w)) for _, w, _ in streams]
    weights = [w / sum(weights) for w in weights]
    taken = [0] * len(streams)
    tie_rank = list(range(len(streams)))
    random.Random(seed).shuffle(tie_rank)
    while True:
        i = min(range(len(streams)), key=lambda k: (taken[k] / weights[k], tie_rank[k]))
        doc = next(iters[i], None)
        if doc is None:
            total = sum(taken)
            shares = ", ".join(f"{label}={taken[k] / total:.3f}" for k, (label, _, _) in enumerate(streams)) if total else "-"
            stats.notes.append(f"mix stopped: {streams[i][0]!r} ran out after {taken[i]:,} chars (char shares: {shares})")
            return
        taken[i] += len(doc.text)
        yield doc
