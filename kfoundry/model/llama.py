"""A Llama-style decoder-only transformer in one file.

Architectural choices (each is the Llama-2/3 default unless noted):
- Pre-norm residual blocks with RMSNorm (Zhang & Sennrich 2019): cheaper than LayerNorm, no mean/bias.
- Rotary position embeddings (Su et al. 2021) in the Hugging Face `rotate_half` layout: the head dimension is
  split into two halves (not interleaved pairs), so our weights load into `LlamaForCausalLM` unchanged.
- Grouped-query attention (Ainslie et al. 2023): `n_kv_heads` key/value heads shared by groups of query heads,
  which shrinks the KV cache at decode time by n_heads / n_kv_heads.
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)).
- No biases anywhere; optional tied input/output embeddings (saves vocab x dim parameters on small models).
- Optional QK-norm (RMSNorm over each head of q and k, as in OLMo-2 / Qwen-3) for training stability at high
  learning rates. Hugging Face Llama has no such weights, so a QK-norm model cannot be exported as Llama.
- Rotary embeddings are computed and applied in fp32 whatever the activations' dtype: in bf16, positions past
  a few hundred lose the low bits of their angle, so the same token pair would rotate differently on one GPU
  (autocast) and under FSDP's bf16 parameters. Only the rotated q and k are cast back.
- Attention through PyTorch's scaled_dot_product_attention with `is_causal` (flash / memory-efficient / cuDNN
  kernels where available). Packed documents (SFT) pass a `masks.DocumentMask`, which keeps fused kernels too
  (FlashAttention's variable-length kernel on a GPU); the dense masks of batched inference also come from masks.py.

One way in: `hidden()` is the backbone (embeddings, blocks, final norm) and `forward` is the output head over it,
so a caller that needs the head on a few positions only (the eval scorer) calls `hidden()` instead of copying
the loop. A key/value cache is any `Cache`: it says where new tokens go and advances itself as the last layer
writes, so the model never keeps count for it (`KVCache` here; the server's per-slot `SlotCache` in serve/).

Parameter names map 1:1 onto Hugging Face `LlamaForCausalLM` (`model.layers.3.self_attn.q_proj.weight`, ...),
so export and import are renames-free. The model knows nothing about parallelism or checkpoints: sharding,
compilation and saving are applied from outside (torchtitan's rule).

Initialisation is explicit: build on the meta device (no memory, no time), move to a real device with
`to_empty`, then call `init_weights()`. Under FSDP the model is sharded while still on the meta device, so each
rank only ever allocates its shard; `init_weights` then draws every parameter whole, one at a time, and keeps its
own slice, so the sharded model starts from exactly the weights one process would have drawn.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from kfoundry.config import ModelConfig
from kfoundry.model import masks


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 (as HF does) so bf16 training keeps its precision here."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def normal_(param: torch.Tensor, std: float, generator: torch.Generator | None) -> None:
    """N(0, std) in place. A sharded parameter (FSDP2's DTensor) draws the whole tensor with the same generator
    and keeps its own slice: the random stream, and so the weights, are those of a single process, whatever the
    number of ranks (the test of a 2-rank run against one process relies on it). Peak memory: one whole
    parameter at a time."""
    if isinstance(param, DTensor):
        local = param.to_local()
        whole = torch.empty(param.shape, dtype=param.dtype, device=local.device).normal_(0.0, std, generator=generator)
        # src_data_rank=None: every rank drew the same tensor, so each takes its slice without communication
        local.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None).to_local())
    else:
        param.normal_(0.0, std, generator=generator)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of shape [B, T, head_dim] for integer positions [B, T] (HF layout: the two halves repeat)."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the fp32 angles cos/sin [B, T, D] (broadcast over heads), in fp32; the result
    has x's dtype."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class Cache(Protocol):
    """What the model asks of a key/value cache. Two implementations: `KVCache` below (every row at the same
    length: generation) and `kfoundry.serve.batch.SlotCache` (every row at its own length: continuous batching).

    The cache owns where new tokens go and advances itself: `update` is called once per layer, and the call for
    the last layer moves the cache past the tokens just written. The model never sets a length.
    """

    def positions(self, batch: int, n_new: int, device) -> torch.Tensor:
        """[batch, n_new] position ids of the next n_new tokens (rotary angles when the caller gives none)."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_heads, n_new, head_dim] for `layer`; return every key/value the new tokens may see."""
        ...


class KVCache:
    """Pre-allocated keys and values for every layer: [B, n_kv_heads, max_len, head_dim] each.

    `length` is how many columns are filled; all rows advance together (left-padded prompts keep them aligned,
    and their position ids, which padding offsets, come from the caller). Writing the last layer advances it.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0
        self.max_len = max_len

    def positions(self, batch: int, n_new: int, device) -> torch.Tensor:
        return torch.arange(self.length, self.length + n_new, device=device).expand(batch, n_new)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:  # every layer has its keys: the next forward pass starts after them
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, cache: Cache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # [B, T, H, D]
        if isinstance(attn_mask, masks.DocumentMask):  # packed documents: attention within each, fused kernels kept
            return self.o_proj(attn_mask.attend(q, k, v).reshape(B, T, -1))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        # GQA: each kv head serves n_heads / n_kv_heads query heads. enable_gqa lets SDPA broadcast the shared
        # heads instead of materialising repeated copies of k and v (a full copy of the cache at every decode step).
        gqa = self.n_kv_heads != self.n_heads
        S = k.shape[2]
        if attn_mask is None and 1 < T < S:
            # Several new tokens after a non-empty cache: SDPA's is_causal aligns the mask top-left, but our
            # queries are the *last* T positions.
            attn_mask = masks.causal(T, S, x.device)
        if attn_mask is None:
            # Causal when queries and keys line up (training, or a prefill into an empty cache);
            # a single decode step may attend to every cached position.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embeddings, blocks and final norm: the part HF calls `model` (hence the attribute name below)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Not a parameter and not saved: it is a pure function of the config, recomputed in init_weights.
        self.register_buffer("inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta), persistent=False)

    # -- initialisation ----------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) for embeddings and projections; residual outputs (o_proj, down_proj) are scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2, §2.3)."""
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.lm_head.weight.device).manual_seed(seed)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        self.inv_freq.copy_(rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, device=self.inv_freq.device))
        if self.cfg.tie_embeddings:  # moving off the meta device can break the tie; restore it
            self.lm_head.weight = self.model.embed_tokens.weight
        normal_(self.model.embed_tokens.weight, std, gen)
        if not self.cfg.tie_embeddings:
            normal_(self.lm_head.weight, std, gen)
        for block in self.model.layers:
            a, m = block.self_attn, block.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                normal_(lin.weight, std, gen)
            for lin in (a.o_proj, m.down_proj):
                normal_(lin.weight, out_std, gen)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()

    @classmethod
    def build(cls, cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> "Transformer":
        """Meta-device construction, then allocation and explicit initialisation."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device)
        model.init_weights(seed=seed)
        return model

    # -- forward -------------------------------------------------------------------------------------------

    def hidden(self, idx: torch.Tensor, *, positions: torch.Tensor | None = None,
               attn_mask: torch.Tensor | masks.DocumentMask | None = None, cache: Cache | None = None) -> torch.Tensor:
        """The backbone: embeddings, every block and the final norm -> hidden states [B, T, dim].

        `forward` is the output head over this. Call `hidden` directly to apply the head to a few positions only
        (the scorer reads one position in hundreds; with a large vocabulary the head costs more than a layer).
        Under FSDP call the sharded model itself (`forward`): its hooks gather the root's parameters.

        positions: [B, T] integer positions (default: the cache's next positions, or 0..T-1 without a cache).
        attn_mask: None (causal), a boolean [B, 1, T, S] tensor from `masks` (True = may attend; padded or
            ragged inference batches), or a `masks.DocumentMask` (documents packed into rows, no cache).
        cache: a `Cache`; it stores this pass's keys and values and advances itself past them.
        """
        B, T = idx.shape
        if cache is not None and isinstance(attn_mask, masks.DocumentMask):
            raise ValueError("packed documents (DocumentMask) are a training layout; they take no KV cache")
        if positions is None:
            if cache is not None:
                positions = cache.positions(B, T, idx.device)
            else:
                positions = torch.arange(T, device=idx.device).expand(B, T)
        x = self.model.embed_tokens(idx)
        cos, sin = rope_cos_sin(positions, self.inv_freq)
        for block in self.model.layers:
            x = block(x, cos, sin, attn_mask, cache)
        return self.model.norm(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, positions: torch.Tensor | None = None,
                attn_mask: torch.Tensor | masks.DocumentMask | None = None, cache: Cache | None = None,
                reduction: str = "mean", z_loss: float = 0.0):
        """Logits [B, T, V] = lm_head(hidden(...)), or the cross-entropy loss when `targets` is given
        (ignore_index = -1). positions, attn_mask and cache are as for `hidden`.

        z_loss: > 0 adds z_loss * logsumexp(logits)^2 per target (PaLM's auxiliary loss: it keeps the softmax
            normaliser near 1, so the logits cannot drift upward), with the same reduction as the cross-entropy."""
        logits = self.lm_head(self.hidden(idx, positions=positions, attn_mask=attn_mask, cache=cache))
        if targets is None:
            return logits
        flat, y = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        loss = F.cross_entropy(flat, y, ignore_index=-1, reduction=reduction)
        if z_loss < 0:
            raise ValueError(f"z_loss must be >= 0, got {z_loss}")
        if z_loss > 0:
            z = torch.logsumexp(flat, dim=-1).square() * (y >= 0)  # ignored positions add nothing
            if reduction == "sum":
                z = z.sum()
            elif reduction == "mean":
                z = z.sum() / (y >= 0).sum().clamp(min=1)
            loss = loss + z_loss * z
        return loss

    # -- accounting ----------------------------------------------------------------------------------------

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied matrix counts once)."""
        n = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward = 3x forward): 6 per weight of every matmul, the output
        head included even when tied (it is still a matmul), plus attention scores and values,
        12 * layers * heads * head_dim * seq_len (PaLM appendix B; nanochat's estimate)."""
        c = self.cfg
        T = seq_len or c.max_seq_len
        per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim
        per_layer += 3 * c.dim * c.ffn_dim
        matmul_params = c.n_layers * per_layer + c.dim * c.vocab_size
        return 6.0 * matmul_params + 12.0 * c.n_layers * c.n_heads * c.head_dim * T
