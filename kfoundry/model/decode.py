"""Decoding one sequence on the CPU at matrix-vector speed.

At batch 1 a decode step is a chain of matrix-vector products over weights that are each read once, plus a few
dozen tiny vector operations. Two costs dominate on a CPU, and neither is arithmetic:

1. `F.linear` on a single row runs as a matrix-*matrix* product with one row (sgemm, M = 1). The BLAS
   matrix-*vector* kernel (sgemv, `torch.mv`) does the same work faster on the same weights (the decoding figures
   are in docs/benchmarks.md, from bench/decode_speed.py).
2. Every PyTorch operator costs a few microseconds of dispatch however small its tensor. The general forward
   (llama.py) spends about 25 of them per layer on shapes it needs for batches and training: [B, T] views,
   position tensors, cos/sin recomputed each step, separate q/k/v and gate/up products, RMSNorm as several ops.

`SequenceDecoder` runs the *same* weights with about a dozen operators per layer, by preparing them once:

- q, k and v are one matrix, and gate and up are one matrix: one product each instead of three and two;
- each RMSNorm gain is folded into the columns of the matrix that reads the normalised vector
  (W @ (g * x) = (W * g) @ x), and the 1 / rms(x) scalar is passed to the product as its `alpha`;
- the attention scale 1 / sqrt(head_dim) is folded into the rows of W_q;
- the rows of W_q and W_k are reordered within each head from the Hugging Face half-split rotary layout
  (pairs (i, i + D/2)) to interleaved pairs (2i, 2i + 1). Dot products q . k are unchanged when q and k are
  permuted alike, and in the interleaved layout rotary embedding is one in-place complex multiplication;
- the residual additions ride on the output products: x + W_o @ y is one `addmv`.

The prepared matrices are copies (about two thirds of the non-embedding weights); they are kept on the model
and rebuilt only when its parameters change. The prompt is prefilled by the general forward (matrix-matrix
products are the fast path for many rows), and its keys are then moved into this decoder's cache layout.

Int8 models (quantize.py) go the same way, with their int8 rows stacked instead of float rows, and the RMSNorm
gain applied to the activation (folding it into quantized columns would need re-quantizing).

Results equal the general forward to float rounding (tests/test_decode.py compares logits and greedy tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kfoundry.model.llama import KVCache, Transformer, rope_cos_sin
from kfoundry.model.quantize import KERNEL_DTYPE, Int8Linear


def interleave_order(head_dim: int) -> torch.Tensor:
    """Row order within a head that turns the half-split rotary layout into interleaved pairs: 0, D/2, 1, ..."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().reshape(-1)


class MatVec:
    """One (possibly stacked) weight matrix applied to a single vector: y = alpha * W @ (in_scale * x) [+ add].

    Float weights absorb in_scale into their columns; int8 weights apply it to the activation instead.
    """

    def __init__(self, parts: list[tuple[nn.Module, torch.Tensor | None, float]], in_scale: torch.Tensor | None):
        """parts: (linear layer, row order or None, row factor) stacked top to bottom."""
        if all(isinstance(lin, nn.Linear) for lin, _, _ in parts):
            rows = [(lin.weight.detach() if order is None else lin.weight.detach()[order]) * factor
                    for lin, order, factor in parts]
            w = torch.cat(rows) if len(rows) > 1 else rows[0]
            self.weight = (w * in_scale[None, :] if in_scale is not None else w).contiguous()
            self.int8, self.in_scale = None, None
            self.zero = torch.zeros(self.weight.shape[0], dtype=self.weight.dtype)
        elif all(isinstance(lin, Int8Linear) for lin, _, _ in parts):
            q = torch.cat([lin.q if order is None else lin.q[order] for lin, order, _ in parts])
            s = torch.cat([(lin.scale if order is None else lin.scale[order]) * factor for lin, order, factor in parts])
            self.int8, self.weight = Int8Linear(q.contiguous(), s.contiguous(), fused=parts[0][0].fused), None
            self.in_scale = in_scale
            self.zero = torch.zeros(q.shape[0])
        else:
            raise TypeError(f"cannot decode through {[type(lin).__name__ for lin, _, _ in parts]}")

    def __call__(self, x: torch.Tensor, alpha: float = 1.0, add: torch.Tensor | None = None) -> torch.Tensor:
        if self.weight is not None:
            if add is not None:
                return torch.addmv(add, self.weight, x, alpha=alpha)
            return torch.addmv(self.zero, self.weight, x, beta=0, alpha=alpha)
        if self.in_scale is not None:
            x = x * self.in_scale
        lin = self.int8
        if lin.fused:  # the int8 kernel directly: bfloat16 in, bfloat16 out (see quantize.py)
            y = torch._weight_int8pack_mm(x.to(KERNEL_DTYPE).view(1, -1), lin.q, lin.scale_kernel).view(-1)
        else:
            y = lin(x.view(1, -1)).view(-1)
        # add + alpha * y in float32, one operator, with or without a residual to add to
        return torch.add(self.zero if add is None else add, y, alpha=alpha)


class _Layer:
    def __init__(self, block, cfg, order: torch.Tensor):
        a, m = block.self_attn, block.mlp
        scale = 1.0 / math.sqrt(cfg.head_dim)
        q_order = torch.cat([h * cfg.head_dim + order for h in range(cfg.n_heads)])
        k_order = torch.cat([h * cfg.head_dim + order for h in range(cfg.n_kv_heads)])
        self.qk_norm = None
        if cfg.qk_norm:  # rms-normalising q undoes any factor in W_q: the scale goes into q_norm's gain instead
            self.qk_norm = (a.q_norm.weight.detach()[order] * scale, a.k_norm.weight.detach()[order], cfg.norm_eps)
            scale = 1.0
        self.qkv = MatVec([(a.q_proj, q_order, scale), (a.k_proj, k_order, 1.0), (a.v_proj, None, 1.0)],
                          block.input_layernorm.weight.detach())
        self.o = MatVec([(a.o_proj, None, 1.0)], None)
        self.gate_up = MatVec([(m.gate_proj, None, 1.0), (m.up_proj, None, 1.0)],
                              block.post_attention_layernorm.weight.detach())
        self.down = MatVec([(m.down_proj, None, 1.0)], None)


def _signature(model: Transformer) -> tuple:
    """Changes whenever any parameter or buffer is replaced or updated in place (optimizer steps included)."""
    return tuple((t.data_ptr(), t._version) for t in [*model.parameters(), *model.buffers()])


@torch.inference_mode()
def prefill_keys(model: Transformer, ids: list[int], order: torch.Tensor,
                 max_len: int) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """A prompt through the general forward (matrix-matrix products are the fast path for many rows): the last
    position's logits [vocab], and each layer's keys (rows reordered by `order` into the interleaved rotary
    layout) and values, [n_kv_heads, T, head_dim] each. `SequenceDecoder` and the server's prepared slots
    (`kfoundry.serve.batch.PreparedSlots`) start every sequence from this."""
    T = len(ids)
    if T == 0 or T > max_len:
        raise ValueError(f"prompt of {T} tokens does not fit the decoder's {max_len} positions")
    cache = KVCache(model.cfg, 1, T, device="cpu", dtype=torch.float32)
    logits = model(torch.tensor([ids]), cache=cache)[0, -1]
    return logits, [(k[0][..., order], v[0]) for k, v in zip(cache.k, cache.v)]


class SequenceDecoder:
    """Prefill a prompt, then decode one token at a time; `step(token)` returns the next logits [vocab]."""

    @staticmethod
    def supports(model: Transformer) -> bool:
        p = model.lm_head.weight if isinstance(model.lm_head, nn.Linear) else model.lm_head.q
        return p.device.type == "cpu" and (p.dtype == torch.float32 or p.dtype == torch.int8)

    def __init__(self, model: Transformer, max_len: int):
        self.model, self.cfg = model, model.cfg
        cfg = self.cfg
        if not self.supports(model):
            raise ValueError("SequenceDecoder runs float32 or int8 models on the CPU")
        signature, cached = _signature(model), model.__dict__.get("_sequence_decoder_weights")
        if cached is None or cached[0] != signature:
            cached = (signature, self._prepare(model))
            model.__dict__["_sequence_decoder_weights"] = cached
        self.layers, self.order = cached[1]
        self.dim_eps = cfg.dim * cfg.norm_eps
        self.max_len, self.length = max_len, 0
        # Keys and values of a layer in one tensor [2, n_kv_heads, max_len, head_dim]: one copy writes both.
        self.kv = [torch.zeros(2, cfg.n_kv_heads, max_len, cfg.head_dim) for _ in range(cfg.n_layers)]
        # Rotary factors as unit complex numbers per position, from the same cos/sin the general forward uses.
        cos, sin = rope_cos_sin(torch.arange(max_len)[None], model.inv_freq)
        half = cfg.head_dim // 2
        self.rot = torch.complex(cos[0, :, :half], sin[0, :, :half])  # [max_len, head_dim / 2]

    @staticmethod
    def _prepare(model: Transformer):
        cfg = model.cfg
        order = interleave_order(cfg.head_dim)
        return [_Layer(block, cfg, order) for block in model.model.layers], order

    def _inv_rms(self, x: torch.Tensor) -> float:
        """1 / sqrt(mean(x^2) + eps) as a Python float: the RMSNorm scale, to hand to the next product."""
        return 1.0 / math.sqrt((float(torch.dot(x, x)) + self.dim_eps) / self.cfg.dim)

    @torch.inference_mode()
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Run the prompt through the general forward, keep its keys/values, return the last position's logits."""
        logits, layers = prefill_keys(self.model, ids, self.order, self.max_len)
        for kv, (k, v) in zip(self.kv, layers):
            kv[0, :, :len(ids)], kv[1, :, :len(ids)] = k, v
        self.length = len(ids)
        return logits

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token at the next position; returns logits [vocab] for the position after it."""
        cfg, pos = self.cfg, self.length
        if pos >= self.max_len:
            raise ValueError(f"decoder full: {self.max_len} positions")
        H, KH, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        emb = self.model.model.embed_tokens
        x = emb.weight[token] if isinstance(emb, nn.Embedding) else emb(torch.tensor([token]))[0]
        rot = self.rot[pos]
        for layer, kv in zip(self.layers, self.kv):
            qkv = layer.qkv(x, alpha=self._inv_rms(x))
            qk = qkv[: (H + KH) * D].view(H + KH, D)
            if layer.qk_norm is not None:
                gq, gk, eps = layer.qk_norm
                qk[:H] = F.rms_norm(qk[:H], (D,), gq, eps)
                qk[H:] = F.rms_norm(qk[H:], (D,), gk, eps)
            torch.view_as_complex(qk.view(H + KH, D // 2, 2)).mul_(rot)  # rotary, in place on q and k
            kv[:, :, pos] = qkv[H * D:].view(2, KH, D)
            keys, values = kv[0, :, : pos + 1], kv[1, :, : pos + 1]  # [KH, S, D]
            # Grouped-query attention without copies: the G query heads sharing a kv head form one small matrix.
            scores = torch.bmm(qk[:H].view(KH, H // KH, D), keys.transpose(1, 2))
            y = torch.bmm(scores.softmax(dim=-1), values)  # [KH, G, D] = heads in order
            x = layer.o(y.view(-1), add=x)
            gu = layer.gate_up(x, alpha=self._inv_rms(x))
            x = layer.down(F.silu(gu[: cfg.ffn_dim]).mul_(gu[cfg.ffn_dim:]), add=x)
        self.length = pos + 1
        h = x * self.model.model.norm.weight
        head = self.model.lm_head
        if isinstance(head, nn.Linear):  # the head is not copied: with tied embeddings it is the largest matrix
            return torch.mv(head.weight, h).mul_(self._inv_rms(x))
        if head.fused:
            y = torch._weight_int8pack_mm(h.to(KERNEL_DTYPE).view(1, -1), head.q, head.scale_kernel).view(-1)
            return y.float().mul_(self._inv_rms(x))
        return head(h.view(1, -1)).view(-1) * self._inv_rms(x)
