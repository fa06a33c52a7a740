"""Stage 1, curation: `kfoundry data prepare` on the run's corpus into RUN/data (data card: RUN/data/data_card.md).

The tokenizer and the shards then read the curated corpus, not the raw one, so the whole run sees the same text.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from kfoundry.config import RunConfig
from kfoundry.pipeline import ensure_curated


def run(cfg: RunConfig, out: Path) -> tuple[Path, RunConfig]:
    """Curate into OUT/data; return the curated corpus SPEC and the config whose corpus is that SPEC."""
    curated = ensure_curated(out, cfg)
    return curated, dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=str(curated)))
