"""Batched decoding where every row is at its own position: the arithmetic under continuous batching.

`kfoundry.model.generate` decodes a fixed batch whose rows all start together (left padding keeps their next
tokens in one column). A server cannot wait for a full batch: requests arrive and finish at any time. So
here each running sequence owns one *slot* (a row of a pre-allocated KV cache) and carries its own length.
A decode step feeds one token for every occupied slot, writes each row's new key/value at that row's own
position, and masks every row's attention to the keys it really has. That is the idea behind Orca's
iteration-level scheduling (Yu et al., OSDI 2022) and vLLM's continuous batching, without paged memory.

Occupied slots are kept contiguous (slots 0..n-1): when a sequence leaves, the last one moves into its slot
(`SlotCache.move`). A decode step is then a plain slice of the cache, not a gather, so no step copies the
cache.

The model file is used unchanged: `Transformer.forward(idx, positions=, attn_mask=, cache=)` only calls
`cache.update(layer, k, v)` and bumps `cache.length`, so `SlotCache` is a drop-in cache object.
"""

from __future__ import annotations

import torch

from kfoundry.config import ModelConfig
from kfoundry.model.llama import Transformer


class SlotCache:
    """Keys and values for `n_slots` sequences, [n_slots, n_kv_heads, max_len, head_dim] per layer.

    Before each forward pass, `bind(rows, positions)` says which slots the batch rows are and at which
    positions their tokens go; `update` (called by every attention layer) writes there and returns the keys
    and values the rows may attend to, up to the longest row. Rows shorter than that see stale or zero
    entries past their end, which the caller's attention mask hides.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype):
        shape = (n_slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.n_slots = n_slots
        self.max_len = max_len
        self._rows = slice(0, 0)
        self._pos: torch.Tensor | None = None
        self._batch_idx: torch.Tensor | None = None
        self._kv_len = 0

    # The model adds T to `cache.length` after each forward and reads it only when no positions are given.
    # Lengths here are per row and owned by the caller, so this shared counter is accepted and ignored.
    @property
    def length(self) -> int:
        return 0

    @length.setter
    def length(self, value: int) -> None:
        pass

    @property
    def kv_len(self) -> int:
        """Keys visible to the bound forward pass: one past the largest bound position."""
        return self._kv_len

    def bind(self, rows: slice, positions: torch.Tensor) -> None:
        """The next forward pass's batch rows are slots `rows`; its tokens go at `positions` [B, T]."""
        B = rows.stop - rows.start
        if positions.shape[0] != B:
            raise ValueError(f"{B} slots bound but positions has {positions.shape[0]} rows")
        if rows.start < 0 or rows.stop > self.n_slots:
            raise ValueError(f"slots {rows.start}..{rows.stop} outside the cache's {self.n_slots}")
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: position {kv_len - 1} >= max_len {self.max_len}")
        self._rows, self._pos, self._kv_len = rows, positions, kv_len
        self._batch_idx = torch.arange(B, device=positions.device)[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, T, D] at each row's positions; return [B, H, kv_len, D] views of the rows' caches."""
        ck, cv = self.k[layer][self._rows], self.v[layer][self._rows]  # views: writes land in the cache
        # Advanced indices on dims 0 and 2 (split by a slice) put their broadcast shape [B, T] first: [B, T, H, D].
        ck[self._batch_idx, :, self._pos] = k.transpose(1, 2)
        cv[self._batch_idx, :, self._pos] = v.transpose(1, 2)
        return ck[:, :, : self._kv_len], cv[:, :, : self._kv_len]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction, or forking n choices)."""
        if src == dst or length == 0:
            return
        for ck, cv in zip(self.k, self.v):
            ck[dst, :, :length] = ck[src, :, :length]
            cv[dst, :, :length] = cv[src, :, :length]


@torch.inference_mode()
def prefill(model: Transformer, cache: SlotCache, slot: int, prompt: list[int]) -> torch.Tensor:
    """Run `prompt` into `slot` (positions 0..T-1); return the logits [V] for the token after it."""
    device = cache.k[0].device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    positions = torch.arange(len(prompt), device=device)[None]
    cache.bind(slice(slot, slot + 1), positions)
    # No mask: queries and keys are the same T positions, so the model's own causal attention is right.
    return model(idx, positions=positions, cache=cache)[0, -1]


@torch.inference_mode()
def decode_step(model: Transformer, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One token for each of slots 0..n-1: `tokens` [n] placed at `positions` [n]; returns logits [n, V].

    Row i attends to its own keys 0..positions[i] and nothing past them (another row may be longer).
    """
    n = tokens.shape[0]
    pos = positions[:, None]
    cache.bind(slice(0, n), pos)
    keys = torch.arange(cache.kv_len, device=tokens.device)
    mask = (keys[None, :] <= pos)[:, None, None, :]  # [n, 1, 1, kv_len]: True = may attend
    return model(tokens[:, None], positions=pos, attn_mask=mask, cache=cache)[:, -1]
