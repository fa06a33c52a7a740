"""The Checkpointer: one object that saves, restores, discovers and prunes a run's checkpoints, whether the run is
one process (local safetensors checkpoints) or many under torchrun (DCP shards).

    ckpt = Checkpointer(out_dir / "ckpt", sharded=info.enabled, keep_last=2)
    path = ckpt.save(step, model, optimizer, tokenizer=tok, model_cfg=cfg, trainer_state={...}, meta={...})
    start = ckpt.resumable(log)            # newest good checkpoint, None when there is none
    state = ckpt.restore_weights(start, model)           # before sharding, for a local checkpoint
    ckpt.restore_optimizer(start, model, optimizer)      # after the optimizer exists (both kinds)

A final save of a sharded run also writes a consolidated `model.safetensors`, so every run ends in a checkpoint
that generate, serve, eval and export can read without touching the pickled DCP metadata.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from kfoundry.checkpoint import dcp as sharded_io
from kfoundry.checkpoint.discovery import find_resumable, list_checkpoints, prune_checkpoints, step_name
from kfoundry.checkpoint.local import (FORMAT_VERSION, WEIGHTS, load_optimizer_state, load_trainer_state,
                                       save_checkpoint, write_weights)
from kfoundry.checkpoint.manifest import verify
from kfoundry.config import ModelConfig, to_dict
from kfoundry.errors import CheckpointError
from kfoundry.fileio import atomic_write_json


class Checkpointer:
    def __init__(self, ckpt_root: str | Path, *, sharded: bool = False, keep_last: int | None = 2,
                 async_save: bool = False, is_main: bool = True,
                 on_saved: Callable[[Path], None] | None = None) -> None:
        """`on_saved(path)` runs on the main rank when a checkpoint is complete (the trainer records it in the
        ledger there)."""
        self.root = Path(ckpt_root)
        self.on_saved = on_saved
        self.sharded, self.keep_last, self.async_save, self.is_main = sharded, keep_last, async_save, is_main
        self.pending: sharded_io.PendingSave | None = None
        self.last_saved: Path | None = None

    # ------------------------------------------------------------------------------------------- discovery

    def existing(self) -> list[Path]:
        return list_checkpoints(self.root)

    def resumable(self, log: Callable[[str], None]) -> Path | None:
        return find_resumable(self.root, log)

    # --------------------------------------------------------------------------------------------- saving

    def save(self, step: int, model, optimizer, *, tokenizer, model_cfg: ModelConfig, trainer_state: dict[str, Any],
             meta: dict[str, Any], final: bool = False) -> Path:
        """Write step-N (every rank calls this under torchrun). Returns its path; with async saving the
        directory appears when the write is done (`wait()`, the next save, or the end of the run)."""
        self.wait()
        path = self.root / step_name(step)
        if not self.sharded:
            save_checkpoint(path, model, tokenizer, optimizer=optimizer, trainer_state=trainer_state, meta=meta,
                            overwrite=True)
            self._after_save(path)
            return path
        full = sharded_io.full_model_state(model) if final else {}  # a collective: every rank takes part

        def write_rest(tmp: Path) -> dict[str, str]:
            atomic_write_json(tmp / "config.json", {"format_version": FORMAT_VERSION, **to_dict(model_cfg)})
            tokenizer.save(tmp / "tokenizer")
            atomic_write_json(tmp / "trainer_state.json", trainer_state)
            atomic_write_json(tmp / "meta.json", {**meta, "format": "dcp"})
            if full:
                write_weights(tmp, full, model_cfg)
            return {}

        self.pending = sharded_io.save_sharded(path, model, optimizer, write_rest,
                                               async_save=self.async_save and not final)
        if self.pending.future is None:
            self.pending = None
            self._after_save(path)
        return path

    def wait(self) -> Path | None:
        """Complete a background save, if one is running; returns its path."""
        if self.pending is None:
            return None
        path = self.pending.finish()
        self.pending = None
        self._after_save(path)
        return path

    def _after_save(self, path: Path) -> None:
        self.last_saved = path
        if self.is_main:
            prune_checkpoints(self.root, self.keep_last, protect=path)
            if self.on_saved is not None:
                self.on_saved(path)

    # ------------------------------------------------------------------------------------------ restoring

    def restore_weights(self, path: Path, model, *, distributed: bool) -> dict[str, Any]:
        """Check `path` and, for a local checkpoint, load its weights into the unsharded `model`; returns the
        trainer state. A sharded checkpoint's weights are loaded with the optimizer (`restore_optimizer`)."""
        path = Path(path)
        if sharded_io.is_sharded(path):
            sharded_io.verify_sharded(path)
        else:
            if distributed:
                raise CheckpointError(f"{path} was written by a single process (no torchrun); resume it without "
                                      "torchrun, or start a distributed run from its weights with --init")
            verify(path)
            state = load_file(str(path / WEIGHTS), device=str(next(model.parameters()).device))
            missing, unexpected = model.load_state_dict(state, strict=False)
            if set(missing) - {"lm_head.weight"} or unexpected:
                raise CheckpointError(f"{path}: weights do not match the model (missing {sorted(missing)}, "
                                      f"unexpected {sorted(unexpected)})")
        return load_trainer_state(path)

    def restore_optimizer(self, path: Path, model, optimizer) -> None:
        path = Path(path)
        if sharded_io.is_sharded(path):
            sharded_io.load_sharded(path, model, optimizer)  # weights and optimizer, after verify_sharded
        else:
            state = load_optimizer_state(path)
            try:
                optimizer.load_state_dict(state)
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"{path}/optimizer.pt does not fit this optimizer ({e})") from None


def latest_weights(ckpt_root: str | Path) -> Path | None:
    """The newest checkpoint with consolidated weights (what inference can read)."""
    for path in reversed(list_checkpoints(ckpt_root)):
        if (path / WEIGHTS).is_file():
            return path
    return None


def rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def set_rng_state(state: dict[str, str]) -> None:
    try:
        raw = base64.b64decode(state["torch"])
        torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"trainer_state.json: unusable RNG state ({e})") from None
