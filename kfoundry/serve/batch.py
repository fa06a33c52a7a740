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
  `SlotCache` is a `kfoundry.model.llama.Cache` like the generator's `KVCache`: it says where the next tokens
  go (`positions`), stores each layer's keys and values (`update`) and advances itself once the last layer has
  written, except that every row has its own length.

Both own the length of every slot: a prefill sets it, each step advances it, `move` carries it along, so the
scheduler only says which tokens to feed.

Both give the logits of the general forward to float rounding (tests/test_serve.py compares them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kfoundry.config import ModelConfig
from kfoundry.model import masks
from kfoundry.model.decode import SequenceDecoder, prefill_keys
from kfoundry.model.llama import Transformer, rope_cos_sin


class SlotCache:
    """Keys and values for `n_slots` sequences, [n_slots, n_kv_heads, max_len, head_dim] per layer, and the
    length of each: a `kfoundry.model.llama.Cache` whose rows sit at different positions.

    Before each forward pass, `bind(rows, n_new)` says which slots the batch rows are and how many tokens each
    row brings; they go at each slot's own next positions. `update` (called by every attention layer) writes
    there and returns the keys and values the rows may attend to, up to the longest row; the last layer's
    call advances the bound slots. Rows shorter than the longest see stale or zero entries past their end,
    which the caller's attention mask (`masks.up_to_position`) hides.
    """

    def __init__(self, cfg: ModelConfig, n_slots: int, max_len: int, device, dtype):
        shape = (n_slots, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.n_slots = n_slots
        self.max_len = max_len
        self.lengths = [0] * n_slots  # filled positions per slot, on the host: no device sync to read them
        self._rows = slice(0, 0)
        self._pos: torch.Tensor | None = None
        self._batch_idx: torch.Tensor | None = None
        self._kv_len = 0

    @property
    def kv_len(self) -> int:
        """Keys visible to the bound forward pass: one past the largest bound position."""
        return self._kv_len

    def bind(self, rows: slice, n_new: int) -> torch.Tensor:
        """The next forward pass's batch rows are slots `rows`, each bringing `n_new` tokens; returns their
        positions [B, n_new] (each slot's length onwards)."""
        if rows.start < 0 or rows.stop > self.n_slots or rows.start >= rows.stop:
            raise ValueError(f"slots {rows.start}..{rows.stop} outside the cache's {self.n_slots}")
        lengths = self.lengths[rows]
        kv_len = max(lengths) + n_new
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: position {kv_len - 1} >= max_len {self.max_len}")
        device = self.k[0].device
        pos = torch.tensor(lengths, device=device)[:, None] + torch.arange(n_new, device=device)
        self._rows, self._pos, self._kv_len = rows, pos, kv_len
        self._batch_idx = torch.arange(len(lengths), device=device)[:, None]
        return pos

    def positions(self, batch: int, n_new: int, device) -> torch.Tensor:
        if self._pos is None or tuple(self._pos.shape) != (batch, n_new):
            raise ValueError(f"bind() the slots of a {batch} x {n_new} batch before the forward pass")
        return self._pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, H, T, D] at each row's positions; return [B, H, kv_len, D] views of the rows' caches."""
        if self._pos is None:
            raise ValueError("bind() the slots before each forward pass through a SlotCache")
        ck, cv = self.k[layer][self._rows], self.v[layer][self._rows]  # views: writes land in the cache
        # Advanced indices on dims 0 and 2 (split by a slice) put their broadcast shape [B, T] first: [B, T, H, D].
        ck[self._batch_idx, :, self._pos] = k.transpose(1, 2)
        cv[self._batch_idx, :, self._pos] = v.transpose(1, 2)
        if layer == len(self.k) - 1:  # every layer has written: the bound slots move past the new tokens
            n_new = self._pos.shape[1]
            for slot in range(self._rows.start, self._rows.stop):
                self.lengths[slot] += n_new
            self._pos = None  # a position is written once: the next pass binds again
        return ck[:, :, : self._kv_len], cv[:, :, : self._kv_len]

    def reset(self, slot: int) -> None:
        """Slot `slot` starts a new sequence (its old entries are overwritten as the new one grows)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (compaction, or forking n choices)."""
        if src == dst:
            return
        for ck, cv in zip(self.k, self.v):
            ck[dst, :, :length] = ck[src, :, :length]
            cv[dst, :, :length] = cv[src, :, :length]
        self.lengths[dst] = length


@torch.inference_mode()
def prefill(model: Transformer, cache: SlotCache, slot: int, prompt: list[int]) -> torch.Tensor:
    """Start `slot` over with `prompt` (positions 0..T-1); return the logits [V] for the token after it."""
    idx = torch.tensor([prompt], dtype=torch.long, device=cache.k[0].device)
    cache.reset(slot)
    cache.bind(slice(slot, slot + 1), len(prompt))
    # No mask: queries and keys are the same T positions, so the model's own causal attention is right.
    return model(idx, cache=cache)[0, -1]


@torch.inference_mode()
def decode_step(model: Transformer, cache: SlotCache, tokens: torch.Tensor) -> torch.Tensor:
    """One token for each of slots 0..n-1, each at its slot's next position; returns logits [n, V].

    Row i attends to its own keys 0..length_i and nothing past them (another row may be longer).
    """
    pos = cache.bind(slice(0, tokens.shape[0]), 1)
    mask = masks.up_to_position(pos, cache.kv_len)  # [n, 1, 1, kv_len]: True = may attend
    return model(tokens[:, None], attn_mask=mask, cache=cache)[:, -1]


# --------------------------------------------------------------------------------------------------------
# The two slot implementations the scheduler uses: prefill(slot, prompt), step(tokens), move(src, dst, length)


class GenericSlots:
    """`SlotCache` and the model's own forward: works for every device, dtype and quantization."""

    def __init__(self, model: Transformer, n_slots: int, max_len: int):
        param = next(model.parameters())
        self.model = model
        self.cache = SlotCache(model.cfg, n_slots, max_len, param.device, param.dtype)

    def prefill(self, slot: int, prompt: list[int]) -> torch.Tensor:
        return prefill(self.model, self.cache, slot, prompt)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        return decode_step(self.model, self.cache, tokens)

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
        self.lengths = [0] * n_slots  # filled positions per slot, as in SlotCache

    @torch.inference_mode()
    def prefill(self, slot: int, prompt: list[int]) -> torch.Tensor:
        """The general forward over the prompt, its keys and values moved into the slot."""
        logits, layers = prefill_keys(self.model, prompt, self.order, self.max_len)
        for kv, (k, v) in zip(self.kv, layers):
            kv[slot, 0, :, :len(prompt)], kv[slot, 1, :, :len(prompt)] = k, v
        self.lengths[slot] = len(prompt)
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One token for each of slots 0..n-1 at its slot's next position; logits [n, vocab]."""
        cfg, n = self.cfg, tokens.shape[0]
        H, KH, D, FF = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
        kv_len = max(self.lengths[:n]) + 1
        if kv_len > self.max_len:
            raise ValueError(f"KV cache full: position {kv_len - 1} >= max_len {self.max_len}")
        positions = torch.tensor(self.lengths[:n])
        rows = torch.arange(n)
        rot = self.rot[positions][:, None]  # [n, 1, D/2]: one rotation per row, broadcast over heads
        # Row i may attend to its keys 0..positions[i]; the query heads of a kv head ride along as SDPA's query
        # length (G of them), so grouped-query attention needs no copies of keys or values.
        mask = masks.up_to_position(positions[:, None], kv_len)  # [n, 1, 1, kv_len]
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
        for i in range(n):
            self.lengths[i] += 1
        return self.model.lm_head(h) if self.head is None else _linear(self.head, h)

    def move(self, src: int, dst: int, length: int) -> None:
        if src == dst:
            return
        for kv in self.kv:
            kv[dst, :, :, :length] = kv[src, :, :, :length]
        self.lengths[dst] = length


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
