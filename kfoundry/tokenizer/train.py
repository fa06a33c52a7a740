"""Training the byte-level BPE vocabulary from a stream of texts, in bounded memory.

BPE starts from the 256 bytes and repeatedly merges the most frequent adjacent pair inside pre-tokens
(words) into a new token, until the vocabulary is full (Sennrich et al. 2016; byte-level: GPT-2, 2019).
The Rust trainer in `tokenizers` keeps one count per distinct pre-token, not the text, so memory grows
with the number of distinct words. We bound it further by capping each document and the total, and by
feeding the trainer from a generator: the corpus is never held in memory at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import tokenizers
from tokenizers import trainers

from kfoundry.errors import ConfigError, DataError
from kfoundry.text import nfc
from kfoundry.tokenizer import pipeline
from kfoundry.tokenizer.ktokenizer import KTokenizer

# Texts handed to the Rust trainer per call; it pre-tokenizes a batch in parallel.
BATCH_DOCS = 1000


@dataclass
class FeedCounts:
    """What the trainer saw: every document read is counted as used, empty, or cut."""

    docs_read: int = 0
    docs_used: int = 0
    docs_empty: int = 0  # empty after NFC; nothing to learn from
    docs_truncated: int = 0  # longer than max_chars_per_doc, or cut by the total budget
    chars_used: int = 0
    stopped_at_max_total_chars: bool = False  # the rest of the corpus was not read


def capped_batches(texts: Iterable[str], counts: FeedCounts, *, max_chars_per_doc: int,
                   max_total_chars: int) -> Iterator[list[str]]:
    """Yield NFC texts in batches, cutting each at `max_chars_per_doc` and stopping at `max_total_chars`.

    The source is read lazily and abandoned as soon as the budget is spent, so a huge corpus costs
    only what is used.
    """
    batch: list[str] = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"train_tokenizer expects str texts, got {type(text).__name__} "
                            f"(document {counts.docs_read})")
        counts.docs_read += 1
        text = nfc(text)
        if not text:
            counts.docs_empty += 1
            continue
        room = min(max_chars_per_doc, max_total_chars - counts.chars_used)
        if len(text) > room:
            text = text[:room]
            counts.docs_truncated += 1
        counts.docs_used += 1
        counts.chars_used += len(text)
        batch.append(text)
        if len(batch) >= BATCH_DOCS:
            yield batch
            batch = []
        if counts.chars_used >= max_total_chars:
            counts.stopped_at_max_total_chars = True
            break
    if batch:
        yield batch


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_chars_per_doc: int = 10_000,
                    max_total_chars: int = 100_000_000, min_frequency: int = 2) -> KTokenizer:
    """Train a byte-level BPE tokenizer with kfoundry's pipeline and special tokens.

    `vocab_size` counts everything: special tokens, the 256 bytes and the merges. A small corpus may run
    out of pairs seen `min_frequency` times before that, giving a smaller vocabulary (recorded as
    `training.vocab_size`). The result is deterministic for the same texts and arguments.
    """
    floor = len(pipeline.SPECIAL_TOKENS) + len(pipeline.BYTE_ALPHABET)
    if vocab_size <= floor:
        raise ConfigError(f"vocab_size must exceed {floor} (special tokens + 256 bytes), got {vocab_size}")
    if max_chars_per_doc < 1 or max_total_chars < 1:
        raise ConfigError("max_chars_per_doc and max_total_chars must be positive")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be at least 1, got {min_frequency}")

    hf = pipeline.new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(pipeline.SPECIAL_TOKENS),
        initial_alphabet=list(pipeline.BYTE_ALPHABET),
        show_progress=False,
    )
    counts = FeedCounts()
    start = time.perf_counter()
    hf.train_from_iterator(
        capped_batches(texts, counts, max_chars_per_doc=max_chars_per_doc, max_total_chars=max_total_chars),
        trainer=trainer,
    )
    seconds = time.perf_counter() - start
    if counts.chars_used == 0:
        raise DataError(f"no text to train on ({counts.docs_read} documents read, {counts.docs_empty} empty)")
    pipeline.add_bos_post_processor(hf, hf.token_to_id(pipeline.BOS))

    training = {
        "vocab_size_requested": vocab_size,
        "vocab_size": hf.get_vocab_size(with_added_tokens=True),
        "min_frequency": min_frequency,
        "max_chars_per_doc": max_chars_per_doc,
        "max_total_chars": max_total_chars,
        **asdict(counts),
        "seconds": round(seconds, 2),
        "tokenizers_version": tokenizers.__version__,
    }
    return KTokenizer(hf, training=training)
