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

Two implementations of the same arithmetic, chosen by `make_slots`:

- `PreparedSlots` (CPU float32 and int8 models, the case that matters for CPU serving): the decode step runs
  the weights prepared by `kfoundry.model.decode` (q/k/v and gate/up stacked into one matrix each, RMSNorm
  gains and the attention scale folded into the matrices, rotary as one complex multiplication in the
  interleaved layout), batched over rows: about a dozen operators per layer whatever the batch size, where
  the general forward needs about thirty. At the sizes we serve on a CPU (a few million to a few tens of
  millions of parameters) a decode step is a few hundred microseconds to a few milliseconds, so each operator's
  fixed dispatch cost is a large part of it.
- `GenericSlots` (any other device or dtype): the model file's own forward with `SlotCache` as its cache.
  `Transformer.forward(idx, positions=, attn_mask=, cache=)` only calls `cache.update(layer, k, v)` and bumps
  `cache.length`, so `SlotCache` is a drop-in cache object.

Both give the logits of the general forward to float rounding (tests/test_serve.py compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kfoundry.config import ModelConfig
from kfoundry.model.decode import SequenceDecoder
from kfoundry.model.llama import KVCache, Transformer, rope_cos_sin


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


# --------------------------------------------------------------------------------------------------------
# The two slot implementations the scheduler uses: prefill(slot, prompt), step(tokens, positions), move(...)


class GenericSlots:
    """`SlotCache` and the model's own forward: works for every device, dtype and quantization."""

    def __init__(self, model: Transformer, n_slots: int, max_len: int):
        param = next(model.parameters())
        self.model = model
        self.cache = SlotCache(model.cfg, n_slots, max_len, param.device, param.dtype)

    def prefill(self, slot: int, prompt: list[int]) -> torch.Tensor:
        return prefill(self.model, self.cache, slot, prompt)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, self.cache, tokens, positions)

    def move(self, src: int, dst: int, length: int) -> None:
        self.cache.move(src, dst, length)


class PreparedSlots:
    """Slots decoded with `kfoundry.model.decode`'s prepared weights, batched over rows (see the module docstring).

    The cache of a layer is one tensor [n_slots, 2, n_kv_heads, max_len, head_dim] (keys, then values), keys
    in the interleaved rotary layout the prepared q/k rows produce, so one indexed write stores a step's keys
    and values for every row.
    """

    @staticmethod
    def supports(model: Transformer) -> bool:
        return SequenceDecoder.supports(model)

    def __init__(self, model: Transformer, n_slots: int, max_len: int):
        if not self.supports(model):
            raise ValueError("PreparedSlots runs float32 or int8 models on the CPU")
        cfg = self.cfg = model.cfg
        self.model, self.max_len = model, max_len
        # SequenceDecoder's prepared weights (folded gains, stacked q/k/v and gate/up), each float matrix then
        # stored transposed ([in, out], contiguous): for a few rows MKL multiplied by a contiguous [in, out]
        # matrix 1.0-2.2x faster than by the [out, in] one F.linear takes (the 26M shape's products at 1 and 8
        # rows; equal at 16; docs/benchmarks.md). Our own copy, so a served model holds no second prepared set.
        layers, self.order = SequenceDecoder._prepare(model)
        self.layers = [_RowsLayer(layer) for layer in layers]
        head = model.lm_head
        self.head = _Rows(head.weight.detach().t().contiguous()) if isinstance(head, torch.nn.Linear) else None
        self.kv = [torch.zeros(n_slots, 2, cfg.n_kv_heads, max_len, cfg.head_dim) for _ in range(cfg.n_layers)]
        cos, sin = rope_cos_sin(torch.arange(max_len)[None], model.inv_freq)  # fp32
        half = cfg.head_dim // 2
        self.rot = torch.complex(cos[0, :, :half], sin[0, :, :half])  # [max_len, head_dim / 2]
        self.key_pos = torch.arange(max_len)

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> torch.Tensor:
        """The general forward over the prompt (matrix-matrix products are its fast path), keys moved in."""
        T = len(prompt)
        if T == 0 or T > self.max_len:
            raise ValueError(f"prompt of {T} tokens does not fit a slot of {self.max_len} positions")
        cache = KVCache(self.cfg, 1, T, device="cpu", dtype=torch.float32)
        logits = self.model(torch.tensor([prompt]), cache=cache)[0, -1]
        for layer, kv in enumerate(self.kv):
            kv[slot, 0, :, :T] = cache.k[layer][0][..., self.order]
            kv[slot, 1, :, :T] = cache.v[layer][0]
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of slots 0..n-1 at its own position; logits [n, vocab]."""
        cfg, n = self.cfg, tokens.shape[0]
        H, KH, D, FF = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        kv_len = int(positions.max()) + 1
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: position {kv_len - 1} >= max_len {self.max_len}")
        rows = torch.arange(n)
        rot = self.rot[positions][:, None]  # [n, 1, D/2]: one rotation per row, broadcast over heads
        # Row i may attend to its keys 0..positions[i]; the query heads of a kv head ride along as SDPA's query
        # length (G of them), so grouped-query attention needs no copies of keys or values.
        mask = (self.key_pos[:kv_len][None, :] <= positions[:, None])[:, None, None, :]  # [n, 1, 1, kv_len]
        x = self.model.model.embed_tokens(tokens)
        for layer, kv in zip(self.layers, self.kv):
            qkv = _linear(layer.qkv, F.rms_norm(x, (cfg.dim,), eps=cfg.norm_eps))
            qk = qkv[:, : (H + KH) * D].view(n, H + KH, D)
            if layer.qk_norm is not None:
                gq, gk, eps = layer.qk_norm
                qk[:, :H] = F.rms_norm(qk[:, :H], (D,), gq, eps)
                qk[:, H:] = F.rms_norm(qk[:, H:], (D,), gk, eps)
            torch.view_as_complex(qk.view(n, H + KH, D // 2, 2)).mul_(rot)  # rotary on q and k, in place
            kv[rows, :, :, positions] = qkv[:, H * D:].view(n, 2, KH, D)  # this step's keys and values
            block = kv[:n, :, :, :kv_len]
            q = qkv[:, : H * D].view(n, KH, H // KH, D)
            y = F.scaled_dot_product_attention(q, block[:, 0], block[:, 1], attn_mask=mask, scale=1.0)
            x = _linear(layer.o, y.reshape(n, H * D), add=x)
            gu = _linear(layer.gate_up, F.rms_norm(x, (cfg.dim,), eps=cfg.norm_eps))
            x = _linear(layer.down, F.silu(gu[:, :FF]).mul_(gu[:, FF:]), add=x)
        h = F.rms_norm(x, (cfg.dim,), self.model.model.norm.weight, cfg.norm_eps)
        return self.model.lm_head(h) if self.head is None else _linear(self.head, h)

    def move(self, src: int, dst: int, length: int) -> None:
        if src == dst or length == 0:
            return
        for kv in self.kv:
            kv[dst, :, :, :length] = kv[src, :, :, :length]


class _Rows:
    """One prepared matrix applied to a batch of rows: float weights transposed ([in, out]), or an int8 MatVec."""

    def __init__(self, weight_t: torch.Tensor | None, mv=None):
        self.weight_t, self.mv = weight_t, mv

    @classmethod
    def of(cls, mv) -> _Rows:
        return cls(mv.weight.t().contiguous()) if mv.weight is not None else cls(None, mv)


class _RowsLayer:
    """A `kfoundry.model.decode` layer with its matrices as `_Rows` (the float copies in [in, out] order)."""

    def __init__(self, layer):
        self.qk_norm = layer.qk_norm
        self.qkv, self.o = _Rows.of(layer.qkv), _Rows.of(layer.o)
        self.gate_up, self.down = _Rows.of(layer.gate_up), _Rows.of(layer.down)


def _linear(m: _Rows, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W.T (+ add) for rows x [n, in]: float weights in one BLAS call on the transposed copy."""
    if m.weight_t is not None:
        return torch.mm(x, m.weight_t) if add is None else torch.addmm(add, x, m.weight_t)
    mv = m.mv
    if mv.in_scale is not None:  # int8 rows keep the RMSNorm gain out of the weights: apply it to x
        x = x * mv.in_scale
    y = mv.int8(x)
    return y if add is None else y.add_(add)


def make_slots(model: Transformer, n_slots: int, max_len: int) -> GenericSlots | PreparedSlots:
    """The fast prepared path where it applies (CPU float32 / int8), the model's own forward elsewhere."""
    if PreparedSlots.supports(model):
        return PreparedSlots(model, n_slots, max_len)
    return GenericSlots(model, n_slots, max_len)
