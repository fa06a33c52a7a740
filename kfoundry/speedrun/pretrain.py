"""Stage 4, pretraining: `kfoundry pretrain` on the run's shards (resumable: a second speedrun continues it).

Its fields are the headline of the report: how far the loss fell, validation bits per byte, throughput and MFU.
"""

from __future__ import annotations

from pathlib import Path

from kfoundry.config import RunConfig
from kfoundry.speedrun.stage import Section
from kfoundry.train.loop import pretrain
from kfoundry.train.metrics import read_records


def run(cfg: RunConfig, out: Path, shard_dir: Path, tok_dir: Path, *, progress: bool = True) -> tuple[Section, Path]:
    """Pretrain into OUT/ckpt; return the report fields and the final checkpoint."""
    summary = pretrain(cfg, out, shard_dir=shard_dir, tokenizer_dir=tok_dir, resume="auto", progress=progress)
    # the first logged training loss (metrics.jsonl also holds events and validation rows)
    losses = [m["loss"] for m in read_records(out / "metrics.jsonl") if "loss" in m and m.get("event") is None]
    ev = summary.get("eval") or {}
    fields = {
        "steps": summary["step"],
        "tokens_seen": summary["tokens_seen"],
        "params": summary["params"],
        "first_loss": losses[0] if losses else None,
        "final_loss": summary["final_loss"],
        **{k: v for k, v in ev.items() if k.startswith("val_")},
        "tokens_per_sec": summary["tokens_per_sec"],
        "mfu": summary["mfu"],
        "peak_source": summary["peak_source"],
    }
    return Section(fields), Path(summary["checkpoint"])
