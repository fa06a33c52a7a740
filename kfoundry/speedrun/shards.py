"""Stage 3, the shards: the curated corpus as token shards in RUN/shards, recorded in the run's ledger."""

from __future__ import annotations

from pathlib import Path

from kfoundry.config import RunConfig
from kfoundry.pipeline import ensure_shards


def run(data_cfg: RunConfig, out: Path, tok_dir: Path) -> Path:
    return ensure_shards(out, data_cfg, tok_dir)
