"""Finding checkpoints in a run's `ckpt/` folder, choosing the one to resume from, and pruning old ones.

Only directories named `step-<digits>` are checkpoints; anything else (a `step-final` made by hand, a `.tmp-*`
leftover of a killed write) is passed over, with one line saying so when it looks like a checkpoint.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from kfoundry.checkpoint.local import load_config, load_optimizer_state, load_trainer_state, read_meta
from kfoundry.checkpoint.manifest import verify
from kfoundry.errors import CheckpointError

STEP_DIR = re.compile(r"step-(\d+)")


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(ckpt_root: str | Path, log: Callable[[str], None] | None = None) -> list[Path]:
    """Checkpoint directories, oldest first (by step). Names that are not `step-<digits>` are ignored."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = STEP_DIR.fullmatch(p.name)
        if p.is_dir() and m:
            found.append((int(m.group(1)), p))
        elif p.is_dir() and p.name.startswith("step-") and log is not None:
            log(f"ignoring {p}: not a checkpoint name (step-<number>)")
    return [p for _, p in sorted(found)]


def check_resumable(path: Path, verify_files: bool = True) -> None:
    """Everything a resume reads, checked before anything is loaded: manifest hashes, config, trainer state,
    meta, and that the safe loader accepts optimizer.pt (memory-mapped, so not read twice)."""
    if verify_files:
        verify(path)
    load_config(path)
    load_trainer_state(path)
    read_meta(path)
    if (Path(path) / "optimizer.pt").is_file():
        load_optimizer_state(path, mmap=True)


def find_resumable(ckpt_root: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that passes `check_resumable`; a broken one is named in one line and skipped.

    Returns None when there is no checkpoint at all; raises CheckpointError when there are checkpoints and
    every one of them is broken (starting over silently would throw a run away)."""
    candidates = list_checkpoints(ckpt_root, log)
    for path in reversed(candidates):
        try:
            check_resumable(path)
            return path
        except CheckpointError as e:
            log(f"refusing checkpoint: {e}; trying the previous one")
    if candidates:
        raise CheckpointError(f"every checkpoint under {ckpt_root} is incomplete or corrupt ({len(candidates)} "
                              "tried); nothing to resume from. Move the folder away to start over.")
    return None


def prune_checkpoints(ckpt_root: str | Path, keep: int | None, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints (all when None; never `protect`, the one just written) and remove write
    leftovers."""
    ckpt_root = Path(ckpt_root)
    existing = list_checkpoints(ckpt_root)
    if keep:
        for old in existing[:-keep]:
            if protect is None or old.resolve() != Path(protect).resolve():
                shutil.rmtree(old, ignore_errors=True)
    for tmp in list(ckpt_root.glob(".tmp-*")) + list(ckpt_root.glob(".old-*")):
        shutil.rmtree(tmp, ignore_errors=True)
