"""Run under torchrun by tests/test_gpu_collectives.py (no test_ prefix: not collected).

Emulates NCCL's device restriction on a CPU-only machine. NCCL serves CUDA tensors only: a collective on a host
tensor dies with "No backend type associated with device type cpu". On a CPU-only machine the training device *is*
the host, so the emulation marks what would be a host tensor on a GPU machine: every tensor that kfoundry's own code
creates without naming a device (`torch.tensor(n)`, `torch.zeros(3)`: on a GPU run these land on the CPU). Any
collective that is handed such a tensor fails, as NCCL would fail. Tensors created with `device=...` (the training
device) and everything torch creates internally pass.

It runs the real pretraining stage (steps with accumulation, evaluation, a sharded checkpoint, a resume) and the
real DPO stage (reference log-probabilities dealt out to ranks, evaluation) with 2 processes.

    torchrun --nproc_per_node 2 tests/dist_worker_devices.py pretrain|resume|dpo TOK_DIR SHARD_DIR CKPT PREFS OUT_DIR
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor",
               "reduce", "all_to_all_single")


class MarkHostTensors(TorchFunctionMode):
    """Tag tensors that kfoundry code creates without a device (they would be host tensors on a GPU machine)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _device_constructors() and kwargs.get("device") is None and isinstance(out, torch.Tensor):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("kfoundry"):
                out._host_made = True
        return out


def device_checked(name: str):
    real = getattr(dist, name)

    def collective(tensor, *args, **kwargs):
        for t in [tensor, *args] if not isinstance(tensor, list) else [*tensor, *args]:
            if isinstance(t, torch.Tensor) and getattr(t, "_host_made", False):
                raise RuntimeError(f"No backend type associated with device type cpu ({name} on a host tensor)")
        return real(tensor, *args, **kwargs)

    return collective


def main(stage: str, tok: str, shards: str, ckpt: str, prefs: str, out: str) -> None:
    """One stage per process, as the CLI runs them (a process group is joined once per process)."""
    for name in COLLECTIVES:
        setattr(dist, name, device_checked(name))
    MarkHostTensors().__enter__()
    from kfoundry.config import resolve
    from kfoundry.post.dpo import dpo, dpo_train_config
    from kfoundry.train.loop import pretrain

    sets = ["train.max_steps=6", "train.ckpt_every=3", "train.eval_every=3", "train.log_every=1",
            "train.eval_batches=2", "train.tokens_per_step=512", "train.device=cpu", "train.micro_batch_size=2"]
    if stage == "pretrain":
        cfg = resolve("test-micro", overrides=sets)
        summary = pretrain(cfg, Path(out) / "pre", shard_dir=shards, tokenizer_dir=tok, progress=False,
                           log=lambda m: None)
    elif stage == "resume":  # a sharded checkpoint read back, then 3 more steps
        cfg = resolve("test-micro", overrides=[*sets[:1], "train.max_steps=9", *sets[1:]])
        summary = pretrain(cfg, Path(out) / "pre", shard_dir=shards, tokenizer_dir=tok, resume="auto",
                           allow_change=True, progress=False, log=lambda m: None)
    else:
        tc = dpo_train_config("test-micro", ["train.max_steps=2", "train.eval_every=2", "train.micro_batch_size=2",
                                             "train.device=cpu", "train.seq_len=64"])
        summary = dpo(ckpt, [prefs], Path(out) / "dpo", tc, val_fraction=0.25, progress=False, log=lambda m: None)
    if os.environ.get("RANK") == "0":
        (Path(out) / f"{stage}.done").write_text(str(summary["step"]))


if __name__ == "__main__":
    main(*sys.argv[1:7])
