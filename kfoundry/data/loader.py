"""The packed loader: token shards in, `(x, y)` training batches out, resumable to the exact batch.

How a batch is made (BOS-aligned packing)
-----------------------------------------
Every document in a shard is stored as `[BOS] tokens [EOS]`. A batch has `batch_size` rows of `seq_len + 1`
tokens; `x` is a row without its last token and `y` is the row without its first, so `y[b, t]` is the
token that follows `x[b, t]` (next-token targets). Training batches (`loop=True`) are never padded; a
one-pass loader (`loop=False`, for validation) pads only its very last row, with targets of -1.

A row is filled with whole documents, one after another, in a shuffled order. The document that does not
fit is cropped at the end of the row and **the cropped tail is discarded**: the next row starts with the
next document's BOS. So every row begins at a document start, the model never sees a row that begins in
the middle of a sentence, and each row's attention covers only text that follows from its own beginning.
The cost is the discarded tails; long documents lose everything past `seq_len + 1` tokens, and
`meta.json`'s token counts are an upper bound on what training sees.

Order, ranks and resumption
---------------------------
Epoch `e` visits the documents in the permutation drawn from `(seed, e)`. A step's *global* batch is
`batch_size * world_size` rows filled from that one order; rank `r` owns rows `r, r + world_size, ...`. Every
rank walks the same order (for rows it does not own it only advances the position, copying nothing), so ranks
never read the same document, and the whole state between batches, *(epoch, position in the order)*, is the
same on every rank and does not depend on the world size. That is what lets a run saved with 2 ranks resume
with 1 (or 4) and see exactly the global batches it would have seen, and why 2 ranks with `batch_size=4`
train on the same data as 1 rank with `batch_size=8`. `state_dict()` is those two numbers plus what they
refer to; `load_state_dict` puts them back, after which the next batches are exactly the ones the saved loader
would have produced next. Batch size, sequence length and world size are not part of the state.

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

STATE_VERSION = 1


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
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        self.shard_dir = Path(shard_dir)
        self.meta = read_meta(self.shard_dir, expect_tokenizer_hash)
        if split not in self.meta["splits"]:
            raise ValueError(f"unknown split {split!r}; choose one of {', '.join(self.meta['splits'])}")
        codes: dict[str, int] = self.meta["lang_codes"]
        if lang is not None and lang not in codes:
            raise ValueError(f"unknown lang {lang!r}; choose one of {', '.join(codes)}")
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
        self.position = 0  # index into the order for `self.epoch`: the next document to read (any rank's row)
        self._order_cache: tuple[int, np.ndarray] | None = None
        pad = self.meta.get("pad_id")
        self._pad_id = int(pad if pad is not None else self.meta["eos_id"])
        if loop and len(self._lengths) == 0:  # a looping loader without documents would spin forever
            what = f"split {split!r}" + (f" (lang={lang})" if lang else "")
            raise ValueError(f"{self.shard_dir}: {what} has no documents to train on")

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
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def _fill_row(self, row: np.ndarray | None, row_len: int) -> int:
        """Fill `row` with documents from the current position; return how many tokens were placed, which
        is less than the row only when a loop=False pass runs out of documents. With `row=None` the row belongs
        to another rank: the position advances exactly as if it were filled, but nothing is copied."""
        filled = 0
        while filled < row_len:
            order = self._order(self.epoch)
            if self.position >= len(order):
                if not self.loop:
                    return filled
                self.epoch += 1
                self.position = 0
                continue
            d = order[self.position]
            self.position += 1
            take = min(int(self._lengths[d]), row_len - filled)  # the rest of this document is discarded
            if row is not None:
                start = int(self._starts[d])
                row[filled : filled + take] = self._shards[self._shard_of[d]][start : start + take]
            filled += take
        return filled

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        row_len = self.seq_len + 1
        while True:
            rows = np.full((self.batch_size, row_len), -1, dtype=np.int64)
            n = 0
            # The global batch has batch_size * world_size rows; this rank owns rows rank, rank + world_size, ...
            for j in range(self.batch_size * self.world_size):
                mine = j % self.world_size == self.rank
                filled = self._fill_row(rows[n] if mine else None, row_len)
                if mine and filled:
                    n += 1
                if filled < row_len:  # only with loop=False: the pass is over
                    break
            else:
                yield self._to_tensors(rows)
                continue
            self.position = 0  # rewind, so the next pass repeats this one
            if n:
                yield self._to_tensors(rows[:n])
            return

    def _to_tensors(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = rows[:, :-1].copy()  # a copy (never a view) since the padding below must not reach y
        x[x < 0] = self._pad_id  # padding of a pass's last row: any valid id; its targets are -1
        return torch.from_numpy(x), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))

    def reset(self) -> None:
        """Go back to the first batch of epoch 0."""
        self.epoch, self.position = 0, 0

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
        return {"version": STATE_VERSION, "epoch": self.epoch, "position": self.position, **self._identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the loader that saved `state` stopped (same shards, seed, rank layout)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r}")
        mine = self._identity()
        wrong = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in wrong.items())
            raise ValueError(f"loader state does not match this loader ({detail})")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self._order(epoch)):
            raise ValueError(f"loader state out of range: epoch={epoch} position={position}")
        self.epoch, self.position = epoch, position
