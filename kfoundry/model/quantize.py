"""Int8 weight-only quantization for our own CPU generator.

Decoding one token at batch 1 is a chain of matrix-vector products: every weight is read once per token and
used for a single multiply-add, so the speed is set by how many bytes of weights cross the memory bus, not by
arithmetic. Storing the matrices as int8 instead of float32 reads 4x fewer bytes per token.

Scheme (symmetric, per output channel; as in LLM.int8's weight path and gpt-fast's int8 mode):

    scale[n] = max_k |W[n, k]| / 127        q[n, k] = round(W[n, k] / scale[n])  in [-127, 127]
    y = x @ W.T  ~=  (x @ q.T) * scale

One scale per output row keeps a row with large weights from crushing the resolution of the others. The
activations stay in float32 ("weight-only"), so there is no calibration data and nothing to tune.
The matmul runs in PyTorch's `_weight_int8pack_mm` CPU kernel, which reads the int8 weights directly. Its fast
path takes bfloat16 activations (with float32 ones it falls back to a scalar loop several times slower than a
float32 matmul), so activations are rounded to bfloat16 for the product and the result is returned in float32;
the rounding (8 significant bits) is of the same order as the int8 weights' own. Where the kernel is missing we
dequantize per call (correct, but without the speed-up).

Every matrix is quantized: the attention and MLP projections, the output head, and the embedding table
(a lookup dequantizes only the rows it reads). With tied embeddings the head and the table share one int8
copy, as they share one float copy before. RMSNorm gains stay float32: they are tiny and sensitive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kfoundry.errors import ConfigError
from kfoundry.model.llama import Transformer

KERNEL_DTYPE = torch.bfloat16  # the activation dtype of _weight_int8pack_mm's vectorized CPU path


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values [N, K] and float32 scales [N] for a float matrix [N, K] (one scale per row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # an all-zero row keeps a harmless non-zero scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _has_int8pack_kernel() -> bool:
    try:
        x = torch.zeros(1, 32, dtype=KERNEL_DTYPE)
        torch._weight_int8pack_mm(x, torch.zeros(32, 32, dtype=torch.int8), torch.ones(32, dtype=KERNEL_DTYPE))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class Int8Linear(nn.Module):
    """A bias-free linear layer whose weight is stored as int8 with one float scale per output channel."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, fused: bool = True):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        # The kernel wants the scales in the activations' dtype; a derived copy, not saved.
        self.register_buffer("scale_kernel", scale.to(KERNEL_DTYPE), persistent=False)
        self.fused = fused
        self.in_features, self.out_features = q.shape[1], q.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.fused and x2.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(KERNEL_DTYPE).contiguous(), self.q, self.scale_kernel).to(x.dtype)
        else:
            y = F.linear(x2, self.q.to(x2.dtype)) * self.scale.to(x2.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 rows with one scale per row; a lookup dequantizes only what it reads."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.q[idx].float() * self.scale[idx, None]


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Replace every matrix of `model` by its int8 weight-only form, in place; returns the model (in eval mode).

    Generation code needs no change: the modules keep their names and call signatures. Training a quantized
    model is not supported (int8 buffers have no gradients).
    """
    if getattr(model, "quantization", None):
        raise ConfigError(f"model is already quantized ({model.quantization})")
    fused = _has_int8pack_kernel()
    q_embed, s_embed = quantize_weight(model.model.embed_tokens.weight)
    for block in model.model.layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(*quantize_weight(child.weight), fused=fused))
    if model.cfg.tie_embeddings:
        model.lm_head = Int8Linear(q_embed, s_embed, fused=fused)  # the same tensors: stored once
    else:
        model.lm_head = Int8Linear(*quantize_weight(model.lm_head.weight), fused=fused)
    model.model.embed_tokens = Int8Embedding(q_embed, s_embed)
    model.quantization = "int8"
    return model.eval()


def model_bytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (a tensor shared by two modules counts once)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())
