"""A `kfoundry data prepare` output used as a corpus: only when it is finished, and then only its curated part.

`data prepare --out DIR` writes `DIR/prepare.json` first and, once the curated documents are complete and the
accounting identity holds, `DIR/curated.done.json`: the completion marker, listing every curated file and its
size. Until the marker exists the folder is half-written (a killed run leaves a prefix of each
`curated/*.jsonl.gz` file, which gzip can read without complaint up to the cut), so any corpus spec that points
into it is refused, in one line that says how to finish the run. The marker's sizes are checked too, so a
curated file that was cut or replaced after the run is refused as well.

`--corpus DIR` (the prepare folder itself) means its `curated/` folder: the intermediate `ingest/`, `filtered/`
and `removed/` files are not a training corpus.
"""

from __future__ import annotations

import json
import os

from kfoundry.corpus.document import CorpusError

SETTINGS_FILE = "prepare.json"  # written by data prepare before any work (kfoundry.data.curate.prepare)
DONE_FILE = "curated.done.json"  # the completion marker: {"docs": N, "files": {"curated/00000.jsonl.gz": bytes}}
CURATED_DIR = "curated"
_LEVELS_UP = 2  # DIR, DIR/curated, DIR/curated/00000.jsonl.gz


def prepare_root(path: str) -> str | None:
    """The `data prepare` output folder that `path` is, or lies inside (up to two levels), else None."""
    here = os.path.abspath(path)
    for _ in range(_LEVELS_UP + 1):
        if os.path.isfile(os.path.join(here, SETTINGS_FILE)):
            return here
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    return None


def resolve_prepared(path: str) -> str:
    """`path` unchanged if it is not part of a prepare output; the curated folder for the output itself;
    CorpusError if that output is unfinished or its curated files changed after it finished."""
    root = prepare_root(path)
    if root is None:
        return path
    done = os.path.join(root, DONE_FILE)
    if not os.path.isfile(done):
        raise CorpusError(f"{path} is an unfinished `kfoundry data prepare` output (no {DONE_FILE}); finish it "
                          f"by running the same command again, which resumes: {_command(root)}")
    with open(done, encoding="utf-8") as f:
        marker = json.load(f)
    for rel, size in marker.get("files", {}).items():
        full = os.path.join(root, rel)
        actual = os.path.getsize(full) if os.path.isfile(full) else None
        if actual != size:
            raise CorpusError(f"{full} changed after `data prepare` finished ({actual} bytes, the run wrote "
                              f"{size}); re-run the prepare command with --overwrite: {_command(root)}")
    if os.path.abspath(path) == root:
        return path.rstrip("/\\") + os.sep + CURATED_DIR
    return path


def _command(root: str) -> str:
    try:
        with open(os.path.join(root, SETTINGS_FILE), encoding="utf-8") as f:
            corpus = json.load(f).get("corpus", "SPEC")
    except (OSError, ValueError):
        corpus = "SPEC"
    return f"kfoundry data prepare --corpus {corpus} --out {root} (with the same options)"
