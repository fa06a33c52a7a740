"""Stage 2, the tokenizer: a byte-level BPE trained on the curated corpus into RUN/tokenizer (kept when it exists)."""

from __future__ import annotations

from pathlib import Path

from kfoundry.config import RunConfig
from kfoundry.pipeline import ensure_tokenizer


def run(data_cfg: RunConfig, out: Path) -> Path:
    return ensure_tokenizer(out, data_cfg)
