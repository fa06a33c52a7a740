"""Depth up-scaling: grow a trained model by stacking copies of its own layers (SOLAR, Kim et al. 2023).

The recipe from the SOLAR-10.7B paper (arXiv:2312.15166, §2): take an n-layer model, make two copies, drop the
last m layers of the first copy and the first m layers of the second, and stack them:

    parent  (n = 4, m = 1):   0 1 2 3
    copy A  (drop last m):    0 1 2
    copy B  (drop first m):       1 2 3
    child   (2(n - m) = 6):   0 1 2 1 2 3      <- child layer k is parent layer plan[k]

Dropping the middle m layers on each side of the seam matters: copy A's last layer and copy B's first layer
would otherwise be the parent's layers n-1 and 0 back to back, the largest discontinuity the stack could have.
The stacked model scores worse than its parent at first (the seam is a shock) and then recovers quickly with
continued pretraining (`kfoundry pretrain --init CHILD --set train.warmup_steps=N`), because every layer
already computes something useful.

Everything outside the blocks is kept as it is: token embeddings, the final norm, the output head (tied or
not) and the tokenizer. Each block is copied whole, attention and MLP with both of its RMSNorms, so a child
layer is bit-for-bit its parent layer. The child therefore stays a from-scratch model whenever its parent was:
no outside weights enter.

This module is pure functions over plans, configs and state dicts, plus `upscale_checkpoint`, which reads one
checkpoint directory and writes another (with the parent and the plan recorded in `meta.json`).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch

from kfoundry.config import ModelConfig
from kfoundry.errors import CheckpointError, ConfigError

LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

# Meta fields that say where outside weights came from (written by `kfoundry import hf`). They are copied into
# every descendant, so the mark survives even when the parent directory is deleted.
EXTERNAL_FIELDS = ("derived_from_external", "external_source")


def dus_plan(n_layers: int, drop: int) -> list[int]:
    """SOLAR's plan: parent layers 0..n-m-1, then m..n-1, for 2(n - m) layers in all.

    `drop=0` is plain duplication (each layer twice, in order). A `drop` that leaves nothing is refused.
    """
    if n_layers < 1:
        raise ConfigError(f"the parent has {n_layers} layers; nothing to up-scale")
    if drop < 0:
        raise ConfigError(f"--drop must be >= 0, got {drop}")
    if drop >= n_layers:
        raise ConfigError(f"--drop {drop} leaves no layers: the parent has {n_layers}, and each copy keeps n - m; "
                          f"use --drop between 0 and {n_layers - 1}")
    return list(range(0, n_layers - drop)) + list(range(drop, n_layers))


def parse_layer_plan(text: str, n_layers: int) -> list[int]:
    """Parse an explicit plan such as "0-23,8-31" (inclusive ranges and single indices, comma-separated).

    The result lists, for each child layer in order, the parent layer it copies. A layer may appear more than
    once (that is the point). Indices must exist in the parent (0..n_layers-1).
    """
    if n_layers < 1:
        raise ConfigError(f"the parent has {n_layers} layers; nothing to up-scale")
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise ConfigError(f"--layers {text!r} is empty or has an empty item; write ranges like 0-23,8-31")
    plan: list[int] = []
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ConfigError(f"--layers item {part!r} is not an index or a range a-b (e.g. 0-23,8-31)")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"--layers range {part!r} runs backwards; write {hi}-{lo}")
        if hi >= n_layers:
            raise ConfigError(f"--layers item {part!r} exceeds the parent, which has {n_layers} layers "
                              f"(0-{n_layers - 1})")
        plan.extend(range(lo, hi + 1))
    return plan


def check_plan(plan: list[int], n_layers: int) -> None:
    """Refuse a plan with no layers or with an index the parent does not have."""
    if not plan:
        raise ConfigError("the layer plan is empty: the up-scaled model would have no layers")
    bad = sorted({i for i in plan if not 0 <= i < n_layers})
    if bad:
        raise ConfigError(f"the layer plan names parent layers {bad}, but the parent has {n_layers} layers "
                          f"(0-{n_layers - 1})")


def format_plan(plan: list[int]) -> str:
    """The shortest range text for a plan: [0,1,2,1,2,3] -> "0-2,1-3" (round-trips through parse_layer_plan)."""
    runs: list[list[int]] = []
    for i in plan:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


def upscale_config(cfg: ModelConfig, plan: list[int]) -> ModelConfig:
    """The child's config: the parent's, with the new depth. Width, heads, vocabulary and RoPE are unchanged."""
    check_plan(plan, cfg.n_layers)
    return dataclasses.replace(cfg, n_layers=len(plan))


def upscale_state_dict(state: dict[str, torch.Tensor], plan: list[int]) -> dict[str, torch.Tensor]:
    """Map a parent state dict onto the child's layers: child `model.layers.k.*` = parent `model.layers.plan[k].*`.

    Keys outside the blocks (embeddings, final norm, head) are kept. Every tensor is cloned, so the child's
    copies of a repeated layer are independent tensors that continued training can move apart (safetensors
    also refuses to save tensors that share memory).
    """
    layers: dict[int, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        m = LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
        else:
            other[key] = value
    n_layers = max(layers) + 1 if layers else 0
    if sorted(layers) != list(range(n_layers)):
        raise CheckpointError(f"the parent's layers are not numbered 0..{n_layers - 1}: found {sorted(layers)}")
    check_plan(plan, n_layers)
    out = {key: value.clone() for key, value in other.items()}
    for k, src in enumerate(plan):
        for suffix, value in layers[src].items():
            out[f"model.layers.{k}.{suffix}"] = value.clone()
    return out
