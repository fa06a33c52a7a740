"""Distributed checkpoints with torch.distributed.checkpoint (DCP), for runs under torchrun.

Every rank writes only its own shards of the weights and optimizer state into `step-N/dcp/`, in parallel; nothing
is gathered onto one rank. DCP records the global shape of every tensor, so a run saved with 2 ranks resumes with
1 or 4: each rank reads the slices it needs. The rest of the directory is a local checkpoint's (config.json,
tokenizer/, trainer_state.json, meta.json, manifest.json); the final checkpoint of a run also gets a consolidated
`model.safetensors`, which is what generate, serve, eval and export read.

Safety: DCP's `.metadata` is a pickle. It is read only by `load_sharded`, to resume a run, and only after the
manifest has checked every file's hash (`verify_sharded`). Inference never reads `dcp/`.

Cost: the expensive parts are spread over the ranks instead of stalling all of them behind rank 0:
- each rank hashes the shard files it wrote itself, and the hashes are gathered for the one manifest;
- on resume each rank checks its share of the files, and the verdicts are combined;
- `async_save=True` copies the state to host memory and writes it in the background (`dcp.async_save`, on a
  separate gloo process group so the background collectives never interleave with training's); the manifest and
  the atomic rename happen when the write is done (`PendingSave.finish`), at the latest before the next save.

Atomicity across ranks: rank 0 makes a temporary sibling `.tmp-step-N`; all ranks write into it; after the write
rank 0 writes the manifest and renames the directory into place. A kill before the rename leaves only the
temporary directory, which discovery ignores and the next prune removes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from kfoundry.checkpoint.manifest import files_of, verify, write_manifest
from kfoundry.errors import CheckpointError
from kfoundry.fileio import sha256_file

DCP_DIR = "dcp"
WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "module.")


def is_sharded(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    rank, world = _rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _barrier() -> None:
    if _rank_world()[1] > 1:
        dist.barrier()


def clean_name(name: str) -> str:
    """A parameter name without the wrappers training adds (compile, activation checkpointing, DDP)."""
    for p in WRAPPER_PREFIXES:
        name = name.replace(p, "")
    return name


def full_model_state(model) -> dict[str, torch.Tensor]:
    """The unsharded weights on rank 0's host memory (a collective: every rank calls it; others get {})."""
    # torch.distributed.checkpoint is imported where it is used: at import it costs ~1 CPU-second, which every
    # kfoundry process would pay, most of which never write a sharded checkpoint.
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {clean_name(k): v for k, v in sd.items()} if _rank_world()[0] == 0 else {}


@dataclass
class PendingSave:
    """A save whose shard files are being written; `finish()` completes the directory (every rank calls it)."""

    tmp: Path
    final: Path
    future: Any
    write_rest: Callable[[Path], dict[str, str]]

    def finish(self) -> Path:
        if self.future is not None:
            result = self.future.result() if hasattr(self.future, "result") else None
            del result
        rank, _ = _rank_world()
        # Each rank hashes the files it wrote (in parallel); rank 0 adds .metadata and the small files.
        own = {name: sha256_file(self.tmp / name) for name in files_of(self.tmp)
               if name.startswith(f"{DCP_DIR}/__{rank}_")}
        hashes: dict[str, str] = {}
        for part in _gather(own):
            hashes.update(part)
        if rank == 0:
            hashes.update(self.write_rest(self.tmp))
            write_manifest(self.tmp, hashes)
            if self.final.exists():  # only possible when re-saving a step explicitly
                old = self.final.with_name(f".old-{self.final.name}")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.final, old)
                os.replace(self.tmp, self.final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(self.tmp, self.final)
        _barrier()
        return self.final


_IO_GROUPS: dict[int, Any] = {}


def _io_group():
    """A gloo group for the background writer: its collectives must not share a queue with training's. One per
    default process group (a process that tears its group down and joins a new one gets a new writer group)."""
    if _rank_world()[1] == 1:
        return None
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _IO_GROUPS:
        _IO_GROUPS.clear()
        _IO_GROUPS[key] = dist.new_group(backend="gloo")
    return _IO_GROUPS[key]


def save_sharded(final: str | Path, model, optimizer, write_rest: Callable[[Path], dict[str, str]], *,
                 async_save: bool = False) -> PendingSave:
    """Start writing a sharded checkpoint; returns the pending save (already finished unless `async_save`).

    `write_rest(tmp)` runs on rank 0 when the shards are written: it writes the small files (config, tokenizer,
    trainer state, meta, a consolidated model.safetensors for a final checkpoint) and returns hashes it already
    knows ({} is fine: the manifest writer hashes the rest)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    rank, _ = _rank_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    import torch.distributed.checkpoint as dcp  # see full_model_state
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    if async_save:
        future = dcp.async_save(state, checkpoint_id=str(tmp / DCP_DIR), process_group=_io_group())
        return PendingSave(tmp, final, future, write_rest)
    dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
    pending = PendingSave(tmp, final, None, write_rest)
    pending.finish()
    return pending


def verify_sharded(path: str | Path) -> None:
    """Check a sharded checkpoint's manifest with every rank hashing its share of the files (in parallel)."""
    path = Path(path)
    rank, world = _rank_world()
    error = None
    try:
        names = sorted(verify(path, files=[]))  # the listing and the manifest's form, no hashing yet
        verify(path, files=names[rank::world])
    except CheckpointError as e:
        error = str(e)
    errors = [e for e in _gather(error) if e]
    if errors:
        raise CheckpointError(errors[0])


def load_sharded(path: str | Path, model, optimizer) -> None:
    """Weights and optimizer state into (possibly sharded) `model`/`optimizer`, at any world size. Call only on
    a directory `verify_sharded` has passed: DCP unpickles its metadata."""
    import torch.distributed.checkpoint as dcp  # see full_model_state
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
