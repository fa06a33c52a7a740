"""Distributed checkpoints with torch.distributed.checkpoint (DCP).

Under torchrun every rank writes only its own shards of the weights and optimizer state into `ckpt/step-N/dcp/`
in parallel; nothing is gathered onto one rank. DCP records the global shape of every tensor, so the checkpoint
can be loaded at a different world size (2 ranks -> 1, 1 -> 4, ...): each loader reads the slices it needs.
The rest of the directory is the same as a single-process checkpoint (kfoundry/checkpoint.py): config.json,
tokenizer/, trainer_state.json, meta.json, manifest.json, plus one loader-rank<R>.json per rank.

Atomicity across ranks: rank 0 makes a temporary sibling `.tmp-step-N`; all ranks write into it; after a barrier
rank 0 writes the manifest and renames it into place. A kill of any rank before the rename leaves only the
temporary directory, which `--resume auto` ignores and the next save removes.

`kfoundry.checkpoint.load_model` reads a DCP checkpoint in a single process (no process group needed), which is
how `export hf`, `generate` and `eval` get one consolidated model out of a sharded run.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from kfoundry.checkpoint import FORMAT_VERSION, MANIFEST
from kfoundry.config import to_dict
from kfoundry.fileio import atomic_write_json, read_json, sha256_file
from kfoundry.train.distributed import DistInfo, barrier

DCP_DIR = "dcp"


def is_dcp_checkpoint(path: str | Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def save_distributed(path: str | Path, model, optimizer, tok, info: DistInfo, *, model_cfg, trainer_state: dict,
                     loader_state: dict, meta: dict) -> Path:
    final = Path(path)
    tmp = final.parent / f".tmp-{final.name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
    atomic_write_json(tmp / f"loader-rank{info.rank}.json", loader_state)
    barrier(info)
    if info.is_main:
        atomic_write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **to_dict(model_cfg)})
        tok.save(tmp / "tokenizer")
        atomic_write_json(tmp / "trainer_state.json", {**trainer_state, "world_size": info.world_size})
        atomic_write_json(tmp / "meta.json", {**meta, "format": "dcp"})
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        atomic_write_json(tmp / MANIFEST, {"files": {str(p.relative_to(tmp)): sha256_file(p) for p in files}})
        if final.exists():
            old = final.with_name(f".old-{final.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    barrier(info)
    return final


def load_distributed(path: str | Path, model, optimizer) -> None:
    """Load weights and optimizer state into (possibly sharded) `model`/`optimizer`, at any world size."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def load_model_weights(path: str | Path, model) -> None:
    """Weights only, into a plain (unsharded) model: works in a single process without a process group."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model)}
    with warnings.catch_warnings():  # DCP warns that no process group exists: loading in one process is the point
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=str(Path(path) / DCP_DIR))
    set_model_state_dict(model, state["model"])


def loader_state_for(path: str | Path, rank: int) -> dict[str, Any]:
    """This rank's saved loader state; the loader's position is global, so any rank's file serves a new rank."""
    path = Path(path)
    own = path / f"loader-rank{rank}.json"
    return read_json(own if own.is_file() else path / "loader-rank0.json")
