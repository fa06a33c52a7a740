"""The one precision policy, for every stage and every parallelism (docs/distributed.md).

Weights, optimizer state and gradient reductions are fp32. On CUDA the forward runs under bf16 autocast: matmuls
in bf16, while the residual stream, RMSNorm and RoPE stay fp32 (autocast leaves elementwise work in the inputs'
dtype, and the model computes RoPE in fp32). FSDP2 is given no parameter dtype of its own, so a sharded run
computes what a single GPU computes. On CPU everything is fp32: bf16 matmuls are slow on most processors, and fp32
keeps runs bit-reproducible.
"""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
