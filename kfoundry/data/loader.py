"""The packed loader: token shards in, `(x, y)` training batches out, resumable to the exact batch.

How a batch is made (one token stream, nothing dropped)
-------------------------------------------------------
Every document in a shard is stored as `[BOS] tokens [EOS]`. The documents of an epoch, in a shuffled order, are
read as one stream of tokens, and the stream is cut into rows: a batch has `batch_size` rows of `seq_len + 1`
tokens; `x` is a row without its last token and `y` is the row without its first, so `y[b, t]` is the token that
follows `x[b, t]` (next-token targets). Consecutive rows overlap by one token: a row ends with the token the next
row starts from, so that token is predicted once (as the last target of its row) and read once (as the first
input of the next). Every token of the split is therefore a target exactly once per epoch (the very first token
of a run has nothing before it), and the stream runs on from one epoch into the next.

A document longer than what is left of a row continues at the start of the next row (its remainder is carried,
not cropped). Rows therefore usually begin inside a document; attention sees the row from its first token, as
in GPT-2 and nanoGPT. The alternative, cropping each row at a document start and throwing the tail away, loses
40% of the tokens at seq_len 1024 when documents average 600 tokens (26% at 2048): data paid for and never
trained on. `token_use(epochs)` reports the share of the split's tokens that training predicts per epoch.

Training batches (`loop=True`) are never padded; a one-pass loader (`loop=False`, for validation) pads only its
very last row, with targets of -1, so a validation pass scores every token of the split once.

Order, ranks and resumption
---------------------------
Epoch `e` visits the documents in the permutation drawn from `(seed, e)`. A step's *global* batch is
`batch_size * world_size` rows cut from that one stream; rank `r` owns rows `r, r + world_size, ...`. Every
rank walks the same stream (for rows it does not own it only advances the position, copying nothing), so ranks
never predict the same tokens, and the whole state between batches, *(epoch, document in the order, token in
the document)*, is the same on every rank and does not depend on the world size. That is what lets a run saved
with 2 ranks resume with 1 (or 4) and see exactly the global batches it would have seen, and why 2 ranks with
`batch_size=4` train on the same data as 1 rank with `batch_size=8`. `state_dict()` is those three numbers plus
what they refer to; `load_state_dict` puts them back, after which the next batches are exactly the ones the saved
loader would have produced next. Batch size, sequence length and world size are not part of the state.

Memory: the shard files are memory-mapped; only the per-document index (start, length) of the selected
documents is held in RAM, about 20 bytes a document.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kfoundry.data.shards import iter_split, read_meta
from kfoundry.errors import CheckpointError, ConfigError, DataError

STATE_VERSION = 2  # 2 adds `offset` (a row may start inside a document); a version-1 state has offset 0


class PackedLoader:
    """Iterate `(x, y)` int64 tensors of shape `[batch_size, seq_len]` from a shard directory.

    Args:
        shard_dir: a directory written by `write_shards` / `kfoundry data shard`.
        split: "train" or "val".
        seed: drives the per-epoch document shuffle (epoch `e` uses `(seed, e)`).
        rank, world_size: this process owns rows `rank::world_size` of each global batch of
            `batch_size * world_size` rows (see "Order, ranks and resumption" above).
        lang: keep only documents of this language ("ko", "en", "other", "unknown"), e.g. for a
            per-language validation loss.
        loop: True (training) runs through epochs forever; every batch is full and nothing is padded.
            False (validation) yields one pass and stops, so that every token is used: the last batch may
            have fewer rows, and the last row, if the documents run out before it is full, is padded with
            `pad_id` in `x` and -1 in `y` (use `cross_entropy(..., ignore_index=-1)`). A rank without
            documents yields nothing. When a pass ends the position rewinds, so iterating again repeats
            the identical pass (stable validation numbers); call `reset()` to start over after stopping early.
        expect_tokenizer_hash: when given, a shard directory written with another tokenizer is a ValueError.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        split: str = "train",
        batch_size: int = 8,
        seq_len: int = 256,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        lang: str | None = None,
        loop: bool = True,
        expect_tokenizer_hash: str | None = None,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ConfigError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.shard_dir = Path(shard_dir)
        self.meta = read_meta(self.shard_dir, expect_tokenizer_hash)
        if split not in self.meta["splits"]:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(self.meta['splits'])}")
        codes: dict[str, int] = self.meta["lang_codes"]
        if lang is not None and lang not in codes:
            raise ConfigError(f"unknown lang {lang!r}; choose one of {', '.join(codes)}")
        self.split, self.lang, self.loop = split, lang, loop
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size

        # The selected documents, as three parallel arrays: which memmap, where in it, how long.
        # Plain ndarray views of the memmaps: same mapped memory, but slicing skips np.memmap's per-slice
        # bookkeeping, which cost as much as the copy itself.
        self._shards: list[np.ndarray] = []
        shard_of, starts, lengths = [], [], []
        for i, (tokens, index) in enumerate(iter_split(self.shard_dir, split)):
            self._shards.append(tokens.view(np.ndarray))
            keep = np.arange(len(index)) if lang is None else np.flatnonzero(index["lang"] == codes[lang])
            shard_of.append(np.full(len(keep), i, dtype=np.int32))
            starts.append(np.asarray(index["start"][keep], dtype=np.int64))
            lengths.append(np.asarray(index["length"][keep], dtype=np.int64))
        self._shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
        self._starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        self.epoch = 0
        self.position = 0  # index into the order for `self.epoch`: the document the stream is in (any rank's row)
        self.offset = 0  # tokens of that document already read into rows
        self._orders: dict[int, np.ndarray] = {}  # this epoch's and its neighbours' (a row may span two epochs)
        pad = self.meta.get("pad_id")
        self._pad_id = int(pad if pad is not None else self.meta["eos_id"])
        if loop and len(self._lengths) == 0:  # a looping loader without documents would spin forever
            what = f"split {split!r}" + (f" (lang={lang})" if lang else "")
            raise DataError(f"{self.shard_dir}: {what} has no documents to train on")

    # -----------------------------------------------------------------------------------------------------

    @property
    def num_docs(self) -> int:
        """Documents in one epoch's order (all ranks together)."""
        return len(self._order(self.epoch))

    def documents(self, epoch: int) -> np.ndarray:
        """The documents of `epoch` in reading order (shared by all ranks), as indices into the selected
        documents of the split (file order). For inspection."""
        return self._order(epoch).copy()

    def _order(self, epoch: int) -> np.ndarray:
        """The document order for an epoch, the same on every rank (cached: one permutation per epoch)."""
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if abs(e - epoch) == 1}
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
        return self._orders[epoch]

    def _read(self, row: np.ndarray | None, at: int, n: int) -> int:
        """Copy the next `n` tokens of the stream into `row[at:]` and advance past them; return how many were
        read, which is less than `n` only when a loop=False pass runs out of documents. With `row=None` the
        tokens belong to another rank's row: the position advances exactly as if they were copied."""
        done = 0
        while done < n:
            order = self._order(self.epoch)
            if self.position >= len(order):
                if not self.loop:
                    return done
                self.epoch, self.position, self.offset = self.epoch + 1, 0, 0
                continue
            d = order[self.position]
            take = min(int(self._lengths[d]) - self.offset, n - done)
            if row is not None:
                start = int(self._starts[d]) + self.offset
                row[at + done : at + done + take] = self._shards[self._shard_of[d]][start : start + take]
            done += take
            self.offset += take
            if self.offset == self._lengths[d]:  # this document is finished; the next one continues the stream
                self.position, self.offset = self.position + 1, 0
        return done

    def _fill_row(self, row: np.ndarray | None) -> int:
        """The next row: `seq_len` tokens that the cursor moves past, then one more that it does not (the next
        row starts with it). Returns the tokens placed: seq_len + 1, or fewer at the end of a loop=False pass."""
        filled = self._read(row, 0, self.seq_len)
        if filled < self.seq_len:
            return filled
        cursor = (self.epoch, self.position, self.offset)
        filled += self._read(row, filled, 1)
        self.epoch, self.position, self.offset = cursor
        return filled

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        row_len = self.seq_len + 1
        while True:
            rows = np.full((self.batch_size, row_len), -1, dtype=np.int64)
            n = 0
            # The global batch has batch_size * world_size rows; this rank owns rows rank, rank + world_size, ...
            for j in range(self.batch_size * self.world_size):
                mine = j % self.world_size == self.rank
                filled = self._fill_row(rows[n] if mine else None)
                if mine and filled > 1:  # a row of one token has nothing to predict
                    n += 1
                if filled < row_len:  # only with loop=False: the pass is over
                    break
            else:
                yield self._to_tensors(rows)
                continue
            self.position, self.offset = 0, 0  # rewind, so the next pass repeats this one
            if n:
                yield self._to_tensors(rows[:n])
            return

    def _to_tensors(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = rows[:, :-1].copy()  # a copy (never a view) since the padding below must not reach y
        x[x < 0] = self._pad_id  # padding of a pass's last row: any valid id; its targets are -1
        return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))

    def reset(self) -> None:
        """Go back to the first batch of epoch 0."""
        self.epoch, self.position, self.offset = 0, 0, 0

    @property
    def split_tokens(self) -> int:
        """Tokens of the selected documents: one epoch's stream."""
        return int(self._lengths.sum())

    def token_use(self, epochs: int = 1) -> float:
        """The share of the split's tokens that training predicts per epoch, over the first `epochs` epochs.

        Computed from the stream rule, not assumed: the rows of `epochs` epochs cover epochs * split_tokens
        tokens, overlap by one, and each row predicts all of its tokens but the first. Only the first token of
        the run is never predicted, so this is 1 - 1 / (epochs * split_tokens). (Cropping each row at a document
        start, as this loader once did, predicted far fewer: see the module docstring.)"""
        total = epochs * self.split_tokens
        return (total - 1) / total if total else 0.0

    # -----------------------------------------------------------------------------------------------------
    # Resumption

    def _identity(self) -> dict[str, Any]:
        """What a saved position refers to: a state is only valid for the same documents in the same order."""
        return {
            "tokenizer_hash": self.meta["tokenizer_hash"],
            "split": self.split,
            "lang": self.lang,
            "seed": self.seed,
            "split_docs": len(self._lengths),
            "split_tokens": int(self._lengths.sum()),
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the batches yielded so far."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, "offset": self.offset,
                **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped (same shards, seed, rank layout)."""
        if state.get("version") not in (1, STATE_VERSION):
            raise CheckpointError(f"unsupported loader state version {state.get('version')!r}")
        mine = self._identity()
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in wrong.items())
            raise CheckpointError(f"loader state does not match this loader ({detail})")
        epoch, position, offset = int(state["epoch"]), int(state["position"]), int(state.get("offset", 0))
        order = self._order(epoch) if epoch >= 0 else []
        in_doc = position < len(order) and 0 <= offset < self._lengths[order[position]]
        if epoch < 0 or not (in_doc or (position == len(order) and offset == 0)) or position < 0:
            raise CheckpointError(f"loader state out of range: epoch={epoch} position={position} offset={offset}")
        self.epoch, self.position, self.offset = epoch, position, offset
