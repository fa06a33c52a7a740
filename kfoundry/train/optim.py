"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

Weight decay pulls weights towards zero; on gains (RMSNorm weights, initialised at 1) it would fight the
normalisation, so only parameters with two or more dimensions (projections, embeddings) are decayed, as in
nanoGPT and torchtitan. AdamW's decay is "decoupled" (Loshchilov & Hutter 2019): applied to the weights directly,
not through the gradient, so it does not get rescaled by Adam's second moment.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kfoundry.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.AdamW:
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # a tied matrix once
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates each parameter in one pass over its memory (one launch on CUDA); the default
    # "foreach" path makes a pass per elementwise operation (~8), which on a CPU costs as much as a tenth of a
    # training step (bench/train_throughput.py). Both are deterministic.
    fused = device_type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine: linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps.
    wsd:    linear warmup, a long stable phase at lr, then a linear decay over the last `decay_frac` of the
            steps (Hu et al. 2024, MiniCPM). The stable phase can be extended or branched from at any point,
            which is what continued pretraining wants.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(round(cfg.decay_frac * cfg.max_steps)))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return peak
        progress = min(1.0, (step - decay_start) / decay_steps)
        return peak + (floor - peak) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r} (use cosine or wsd)")
