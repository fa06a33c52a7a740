"""Attention masks: who may attend to whom, in one module.

Every mask in kfoundry is a rule over (query position, key position). The model's own rule is plain causal
attention, which needs no mask at all: `scaled_dot_product_attention(is_causal=True)` runs the fused kernels
(flash / memory-efficient / cuDNN on a GPU, the blocked flash kernel on a CPU). Everything else lives here:

- `causal(T, S)`: T new queries after S - T cached keys (a chunked prefill): causal, aligned bottom-right.
- `left_padded_causal(valid)` / `key_padding(valid)`: batched generation with left-padded prompts.
- `up_to_position(positions, S)`: rows at different lengths decoded together (continuous batching): each
  query sees the keys at or before its own position.
- `shared_context(segments)`: the scorer's rows, where several continuations share one context.
- `DocumentMask`: several documents packed into each row (SFT), each attending only to itself.

All but the last are dense boolean tensors ([B, 1, T, S], True = may attend): they serve inference, where T is
small or a single row is scored, and PyTorch's SDPA takes them directly.

Packed documents are the one training case, so they get a representation that keeps the fused kernels: the
boundaries of the documents, not a [B, T, T] matrix. A dense mask is quadratic in the row length (8 rows of
2048 tokens: 32 MiB of booleans to build every step) and an explicit mask rules out flash attention on a GPU;
with grouped-query attention it rules out the memory-efficient kernel too, which leaves the math kernel and its
[B, H, T, T] score matrix per layer. Instead a `DocumentMask` holds the cumulative document offsets of the
flattened batch (`cu_seqlens`, the layout of FlashAttention's variable-length API, Dao 2023), and attention
runs per document:

- on an Ampere-or-newer GPU in bf16/fp16, one `torch.nn.attention.varlen.varlen_attn` call: FlashAttention-2's
  varlen kernel, causal, with native GQA. Its work is the sum of each document's square, not the row's square.
- elsewhere (a CPU, fp32, or an older GPU), the documents are gathered into a few padded batches, one per
  power-of-two length bucket, and each runs plain causal SDPA: a fused kernel (the CPU's flash kernel;
  memory-efficient on a V100), no mask tensor, and at most 4x each document's own square in work. (One SDPA call
  per document would be exact but pays the kernel's fixed cost per document: slower than the dense mask on a CPU.)

The offsets are computed on the host while a batch is collated (the loader knows every document's length), so
no step waits for the device to tell it where the documents are. Padding at the end of a row is one more
"document": its outputs are never read (their targets are -1 and no real token attends to them), and a
segment of padding always has itself to attend to, so softmax never sees an empty row.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ dense (inference)


def causal(T: int, S: int, device=None) -> torch.Tensor:
    """[T, S] boolean: query i (the i-th of the last T positions) may attend keys 0 .. S - T + i.

    SDPA's `is_causal` aligns the triangle top-left, which is wrong once a cache holds S - T earlier keys.
    """
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=S - T)


def left_padded_causal(valid: torch.Tensor) -> torch.Tensor:
    """[B, T] real (non-pad) positions of left-padded prompts -> [B, 1, T, T]: causal, never onto padding.

    A padding query attends to itself only (a query with nothing to attend to would make softmax NaN)."""
    T = valid.shape[1]
    eye = torch.eye(T, dtype=torch.bool, device=valid.device)
    return (causal(T, T, valid.device) & valid[:, None, :] | eye)[:, None]


def key_padding(valid: torch.Tensor) -> torch.Tensor:
    """[B, S] real keys -> [B, 1, 1, S]: every query of a row may attend to that row's real keys."""
    return valid[:, None, None, :]


def up_to_position(positions: torch.Tensor, S: int) -> torch.Tensor:
    """[B, T] query positions -> [B, 1, T, S]: query (b, t) may attend key j iff j <= positions[b, t].

    The rule for slots of a serving cache, where row b's keys sit at their own positions 0..positions[b, t] and
    a longer row makes the key axis S longer than this row's keys (its stale entries stay hidden)."""
    return (torch.arange(S, device=positions.device) <= positions[..., None])[:, None]


def shared_context(segments: torch.Tensor) -> torch.Tensor:
    """[B, T] segment ids (0 = the shared context, 1.. = continuations, -1 = padding) -> [B, 1, T, T]:
    causal, and across segments only towards the context. Padding queries attend to themselves."""
    T = segments.shape[1]
    q, k = segments[:, :, None], segments[:, None, :]
    allowed = causal(T, T, segments.device) & ((k == 0) | (k == q)) & (k >= 0)
    return (allowed | torch.eye(T, dtype=torch.bool, device=segments.device))[:, None]


# ---------------------------------------------------------------------------------- packed documents (training)


@dataclass(frozen=True)
class DocumentMask:
    """Documents packed into the rows of a [B, T] batch, each causal within itself and blind to the others.

    The documents (padding runs included) tile the flattened batch in order: document i covers flat positions
    cu_seqlens[i] .. cu_seqlens[i + 1] - 1, and no document crosses a row boundary. `bounds` is the same list
    on the host, for the bucketed CPU path; `cu_seqlens` lives on the compute device, for the varlen kernel.
    """

    bounds: tuple[int, ...]  # host copy of cu_seqlens: 0, end of document 0, ..., B * T
    cu_seqlens: torch.Tensor  # int32 [n_documents + 1]
    row_len: int  # T

    @classmethod
    def from_lengths(cls, rows: Sequence[Sequence[int]], row_len: int) -> DocumentMask:
        """Document lengths per row -> the mask; the rest of each row (padding) becomes one more document."""
        bounds, at = [0], 0
        for lengths in rows:
            if any(n <= 0 for n in lengths) or sum(lengths) > row_len:
                raise ValueError(f"document lengths {list(lengths)} do not fit a row of {row_len}")
            for n in lengths:
                at += n
                bounds.append(at)
            pad = row_len - sum(lengths)
            if pad:
                at += pad
                bounds.append(at)
        return cls(tuple(bounds), torch.tensor(bounds, dtype=torch.int32), row_len)

    @property
    def batch_size(self) -> int:
        return self.bounds[-1] // self.row_len

    def to(self, device) -> DocumentMask:
        return DocumentMask(self.bounds, self.cu_seqlens.to(device, non_blocking=True), self.row_len)

    def segment_ids(self) -> torch.Tensor:
        """[B, T] document index of every position (padding runs count as documents)."""
        lengths = torch.tensor(self.bounds).diff()
        ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        return ids.view(self.batch_size, self.row_len).to(self.cu_seqlens.device)

    def dense(self) -> torch.Tensor:
        """The same rule as a dense [B, 1, T, T] boolean mask: the reference the tests compare against, and what
        SFT built on the host every step before this module existed. Not used in training."""
        seg = self.segment_ids()
        T = self.row_len
        return (causal(T, T, seg.device) & (seg[:, :, None] == seg[:, None, :]))[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Attention of q [B, T, H, D] over k, v [B, T, H_kv, D] within each document -> [B, T, H, D]."""
        B, T, H, D = q.shape
        gqa = k.shape[2] != H
        q, k, v = q.reshape(B * T, H, D), k.reshape(B * T, -1, D), v.reshape(B * T, -1, D)
        if _flash_varlen_runs(q):
            y = _varlen_causal(q, k, v, self.cu_seqlens, T, gqa)
        else:
            gather, shapes, scatter = self._buckets
            parts = [t[gather].split([n * L for n, L in shapes]) for t in (q, k, v)]  # one gather per tensor
            ys = []
            for (n, L), qb, kb, vb in zip(shapes, *parts):  # a few fused causal SDPA calls, one per length bucket
                qb, kb, vb = (t.view(n, L, -1, D).transpose(1, 2) for t in (qb, kb, vb))  # [N, H, L, D]
                yb = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, enable_gqa=gqa)
                ys.append(yb.transpose(1, 2).reshape(n * L, H, D))
            y = torch.cat(ys)[scatter]  # each real position back to its place in the batch
        return y.view(B, T, H, D)

    @functools.cached_property
    def _buckets(self) -> tuple[torch.Tensor, list[tuple[int, int]], torch.Tensor]:
        """The documents as padded batches for plain causal SDPA, built once per mask (not once per layer).

        Documents are grouped by length into power-of-two buckets, so a bucket pads each document to at most twice
        its length and the work stays within 4x of each document's own square (one padded batch would pad every
        chat turn to the longest document). Padding sits after a document's last token, so under a causal rule no
        real query ever sees it; padded positions repeat that last token and their outputs are never read.
        Returns the flat positions to gather (all buckets, each [N, L] row-major), the (N, L) of each bucket, and,
        for every position of the batch, its row in the gathered order.
        """
        device = self.cu_seqlens.device
        starts, lengths = self.bounds[:-1], [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            groups.setdefault((n - 1).bit_length(), []).append(i)  # bucket = ceil(log2(n))
        gathers, valids, shapes = [], [], []
        for _, docs in sorted(groups.items()):
            a = torch.tensor([starts[i] for i in docs])
            n = torch.tensor([lengths[i] for i in docs])
            j = torch.arange(int(n.max()))
            gathers.append((a[:, None] + torch.minimum(j[None], n[:, None] - 1)).flatten())
            valids.append((j[None] < n[:, None]).flatten())
            shapes.append((len(docs), len(j)))
        gather, valid = torch.cat(gathers), torch.cat(valids)
        scatter = torch.empty(self.bounds[-1], dtype=torch.long)
        scatter[gather[valid]] = torch.arange(len(gather))[valid]
        return gather.to(device), shapes, scatter.to(device)


def _flash_varlen_runs(q: torch.Tensor) -> bool:
    """FlashAttention-2 needs a 16-bit input on an Ampere or newer GPU (compute capability 8.0+)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def _varlen_causal(q, k, v, cu_seqlens: torch.Tensor, max_len: int, gqa: bool) -> torch.Tensor:
    """FlashAttention's variable-length kernel over the flattened batch. `max_len` is the row length (an upper
    bound on any document): a constant, so torch.compile never recompiles for a new longest document, and the
    kernel's extra blocks for shorter documents exit at once."""
    # Imported here: the module pulls in torch._dynamo, ~1.7 CPU-seconds at every start of a CPU-only process.
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, window_size=(-1, 0), enable_gqa=gqa)
