"""manifest.json: the sha256 of every file of a checkpoint directory, written last, checked before any load.

The manifest is what makes a directory a checkpoint. It is strict on purpose, because what a checkpoint holds
is later unpickled (DCP's `.metadata`, `optimizer.pt` through the safe loader) or executed as weights:

- no manifest, or one that is not a UTF-8 JSON object with a non-empty `files` mapping: not a checkpoint;
- every file in the directory must be listed (a file planted next to a valid manifest is refused), and every
  listed file must exist and hash to its recorded sha256.

Hashing is the cost of a load. `verify(path, files=...)` checks a subset, so that under torchrun each rank can
check its share of a large sharded checkpoint in parallel (`checkpoint/dcp.py`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from kfoundry.errors import CheckpointError, MissingPathError
from kfoundry.fileio import atomic_write_json, sha256_file

MANIFEST = "manifest.json"
# Written beside the manifest, after it, by the provenance layer: the ledger line that records this checkpoint
# (ledger_entry.json), and for a checkpoint that is its own run (a merge, an upscale, an import) the ledger itself
# and its head. They cannot be in the manifest, whose hash the ledger holds; they are JSON, never executed.
SIDE_FILES = frozenset({"ledger_entry.json", "ledger.jsonl", "ledger.head.json"})


def files_of(directory: Path) -> list[str]:
    """Every file under `directory` except the manifest and the top-level side files, as sorted relative paths."""
    names = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(n for n in names if n != MANIFEST and n not in SIDE_FILES)


def write_manifest(directory: str | Path, hashes: dict[str, str] | None = None) -> dict[str, str]:
    """Hash every file of `directory` (or take precomputed `hashes`, which must cover every file) and write
    the manifest. The one writer of manifests: local and distributed checkpoints both come here."""
    directory = Path(directory)
    names = files_of(directory)
    hashes = dict(hashes or {})
    missing = [n for n in names if n not in hashes]
    for name in missing:
        hashes[name] = sha256_file(directory / name)
    extra = sorted(set(hashes) - set(names))
    if extra:
        raise CheckpointError(f"{directory}: hashes given for files that are not there: {extra[:3]}")
    atomic_write_json(directory / MANIFEST, {"files": {n: hashes[n] for n in names}})
    return hashes


def read_manifest(directory: str | Path) -> dict[str, str]:
    """The `files` mapping of a manifest that is well formed and lists exactly the files of the directory."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.exists():
        raise MissingPathError(f"no such checkpoint directory: {directory}")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {MANIFEST} (incomplete, or not a kfoundry checkpoint)")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in files.items()):
        raise CheckpointError(f"{path}: expected a JSON object with a non-empty 'files' mapping of name -> sha256")
    present = set(files_of(directory))
    unlisted = sorted(present - set(files))
    if unlisted:
        raise CheckpointError(f"{directory}: {unlisted[0]} is not listed in {MANIFEST}"
                              + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""))
    for name in files:
        if name not in present:
            raise CheckpointError(f"{directory}: {name} is missing")
    return files


def verify(directory: str | Path, files: Iterable[str] | None = None) -> dict[str, str]:
    """Raise CheckpointError naming the first file that is unlisted, missing or whose hash differs; return the
    manifest's mapping. `files` restricts the hashing to those names (the listing is always checked whole)."""
    directory = Path(directory)
    recorded = read_manifest(directory)
    for name in (recorded if files is None else files):
        if sha256_file(directory / name) != recorded[name]:
            raise CheckpointError(f"{directory}: {name} does not match its recorded sha256 (corrupt checkpoint)")
    return recorded
