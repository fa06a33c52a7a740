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
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from kfoundry.errors import ConfigError
from kfoundry.model.device import pick_device


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


def init_distributed(device_pref: str = "auto", timeout_minutes: float = 10.0) -> DistInfo:
    """Join the process group when launched by torchrun; otherwise a single-process DistInfo.

    `timeout_minutes` bounds how long a collective may wait (NCCL's watchdog kills the job after it). Data
    preparation is done before this is called (`wait_for_files`), so the timeout only has to cover training."""
    picked = pick_device(device_pref)
    if not launched_by_torchrun():
        return DistInfo(device=picked)
    use_cuda = picked.type == "cuda"  # one GPU per process (cuda:LOCAL_RANK); any other choice runs on the CPU
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if use_cuda else None,
                                timeout=timedelta(minutes=timeout_minutes))

    mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
    return DistInfo(rank=rank, world_size=world, local_rank=local, enabled=True, device=device, mesh=mesh)


def env_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), readable before any process group exists."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def wait_for_files(paths: list[Path], failed_marker: Path, poll_s: float = 2.0, limit_minutes: float = 24 * 60) -> None:
    """Ranks other than 0 wait here, without a process group (so no collective timeout applies), while rank 0
    prepares data that may take hours (a tokenizer, shards). Rank 0 writes `failed_marker` if it fails."""
    deadline = time.monotonic() + limit_minutes * 60
    while not all(p.exists() for p in paths):
        if failed_marker.exists():
            raise RuntimeError(f"rank 0 failed to prepare the run's data: {failed_marker.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {limit_minutes} min for rank 0 to write {', '.join(map(str, paths))}")
        time.sleep(poll_s)


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
        for i, block in enumerate(layers):  # recompute each block's activations in backward: memory for compute
            layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    if compile_blocks:
        for i, block in enumerate(layers):  # per block: one compiled graph reused by every layer, fast to build
            layers[i] = torch.compile(block)
    if not info.enabled:
        return model
    if mode == "ddp":
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if mode != "fsdp":
        raise ConfigError(f"unknown train.parallel={mode!r} (use fsdp or ddp)")

    # One precision policy everywhere (docs/distributed.md): fp32 weights, bf16 autocast for the matmuls on CUDA
    # (`trainer.autocast`), fp32 gradient reductions. FSDP therefore gathers fp32 parameters (twice the bytes of
    # a bf16 gather), and in exchange a sharded run computes exactly what one GPU computes: the residual stream,
    # norms and RoPE stay fp32 in both.
    kwargs = {"mesh": info.mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)}
    for i, block in enumerate(layers):
        # the last block's parameters are needed again at once by the backward pass: don't free them after forward
        fully_shard(block, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


@contextlib.contextmanager
def no_grad_sync(module: nn.Module, skip: bool):
    """DDP only: skip the gradient all-reduce for micro-batches before the last one of a step (DDP holds whole
    gradients anyway). FSDP2 reduce-scatters after every micro-batch instead, as torchtitan does: skipping it
    would keep an unsharded fp32 gradient of the whole model on every rank (+3.5 GiB per GPU at 1B parameters)."""
    if skip and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum across ranks, in place. `value` must live on the training device: NCCL serves CUDA tensors only."""
    if info.enabled and info.world_size > 1:
        if value.device.type != info.device.type:
            raise ValueError(f"collective on a {value.device.type} tensor in a {info.device.type} process group")
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled or info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=info.device)
    return box[0]


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    if not info.enabled or info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world_size > 1:
        dist.barrier(device_ids=[info.device.index] if info.device.type == "cuda" else None)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The global L2 norm of all gradients, on the device, without a host sync; for FSDP2's sharded (DTensor)
    gradients the partial norms of all shards are reduced (a collective)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), device=next(model.parameters()).device)
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()
    return total


def scale_grads(model: nn.Module, factor: float) -> None:
    """Multiply every gradient by `factor` (token normalisation and clipping in one pass)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


def prepare_frozen(model: nn.Module, info: DistInfo, mode: str) -> nn.Module:
    """A frozen model that only runs forward passes (a DPO reference, a distillation teacher): no gradients, eval
    mode; under torchrun with FSDP it is sharded like the trained model (each block's weights gathered for its
    forward and freed after), so a teacher larger than one GPU fits; with DDP it is replicated."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if info.enabled and mode == "fsdp":
        for block in model.model.layers:
            fully_shard(block, mesh=info.mesh)
        fully_shard(model, mesh=info.mesh)
    return model
