"""The checkpoint format, in one package: what a checkpoint directory holds and how it is written and read.

    manifest.py      manifest.json: the sha256 of every file, written last, checked before any load
    local.py         one-process checkpoints: safetensors weights, JSON state, optimizer.pt (safe loader)
    dcp.py           sharded checkpoints of torchrun runs (torch.distributed.checkpoint), read only to resume
    discovery.py     step-N directories: list, choose the newest good one to resume, prune
    checkpointer.py  `Checkpointer`: save / restore / discover / prune for the training engine, either kind

Writes are atomic (a temporary sibling renamed into place), so a crash leaves either the previous state or a
complete checkpoint. Loading never unpickles a file the manifest has not vouched for, and inference reads only
safetensors. Guide: docs/pretrain.md ("Checkpoints").
"""

from kfoundry.checkpoint.checkpointer import Checkpointer, latest_weights, rng_state, set_rng_state
from kfoundry.checkpoint.discovery import check_resumable, find_resumable, list_checkpoints, prune_checkpoints
from kfoundry.checkpoint.local import (FORMAT_VERSION, load_config, load_model, load_optimizer_state,
                                       load_tokenizer, load_trainer_state, model_state, read_meta, save_checkpoint,
                                       write_weights)
from kfoundry.checkpoint.manifest import MANIFEST, verify, write_manifest
from kfoundry.errors import CheckpointError

__all__ = ["CheckpointError", "Checkpointer", "FORMAT_VERSION", "MANIFEST", "check_resumable", "find_resumable",
           "latest_weights", "list_checkpoints", "load_config", "load_model", "load_optimizer_state",
           "load_tokenizer", "load_trainer_state", "model_state", "prune_checkpoints", "read_meta", "rng_state",
           "save_checkpoint", "set_rng_state", "verify", "write_manifest", "write_weights"]
