"""Distributed training on PyTorch's own engine: process group, device mesh, FSDP2 or DDP, from outside the model.

Launch with torchrun (or `kfoundry pretrain --nproc N`, which calls it):

    torchrun --nproc_per_node 8 -m kfoundry pretrain --out runs/1b --config recipes/1b-fsdp.yaml

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them, joins the
process group (NCCL on CUDA, gloo on CPU) and builds a one-dimensional device mesh. `parallelize` then wraps the
model — the model file never changes (torchtitan's rule):

- FSDP2 (`fully_shard`): each transformer block is its own shard group, so its parameters are all-gathered just
  before the block runs and freed after; the root group holds the embeddings, final norm and output head (a tied
  head is the same parameter as the embedding, so it lives in the root once). On GPU a mixed-precision policy
  computes in bf16 and reduces gradients in fp32.
- DDP: every rank holds the whole model; gradients are averaged by all-reduce.

Loss scaling across ranks: each rank sums its loss over its own target tokens and divides by the *global* number
of target tokens of the step (an all-reduce of the counts), times the world size to undo the average that FSDP/DDP
apply to gradients. The result is the gradient of the token-weighted mean over the global batch, not a mean of
per-rank means, which would over-weight ranks holding fewer tokens.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # True under torchrun (even with one process): checkpoints are then DCP
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo."""
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if not launched_by_torchrun():
        dev = torch.device("cuda" if use_cuda else ("cpu" if device_pref == "auto" else device_pref))
        return DistInfo(device=dev)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if use_cuda else None)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=True, device=device, mesh=mesh)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallelize(model: nn.Module, info: DistInfo, *, mode: str = "fsdp", activation_checkpointing: bool = False,
                compile_blocks: bool = False) -> nn.Module:
    """Apply activation checkpointing, per-block compile and FSDP2/DDP to `model` (in that order, as torchtitan
    does). Returns the module to call for the forward pass."""
    layers = model.model.layers
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(layers):  # recompute each block's activations in backward: memory for compute
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile_blocks:
        for i, block in enumerate(layers):  # per block: one compiled graph reused by every layer, fast to build
            layers[i] = torch.compile(block)
    if not info.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode != "fsdp":
        raise ValueError(f"unknown train.parallel={mode!r} (use fsdp or ddp)")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if info.device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kwargs = {"mesh": info.mesh} | ({"mp_policy": mp} if mp else {})
    for i, block in enumerate(layers):
        # the last block's parameters are needed again at once by the backward pass: don't free them after forward
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool):
    """Skip the gradient all-reduce / reduce-scatter for micro-batches before the last one of a step."""
    if not skip:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled and info.world_size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world_size > 1:
        dist.barrier()


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Global gradient-norm clipping that also works on FSDP2's sharded (DTensor) gradients."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):  # a DTensor: the partial norms of all shards, reduced
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
