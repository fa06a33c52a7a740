"""metrics.jsonl (append-only, one JSON object per line) plus TensorBoard, and W&B when asked.

All three are written whether or not a progress bar is shown (`--no-progress` only silences the terminal).
After a resume, the records of the steps that will be replayed are removed first (`truncate_after`), so plots
and reports count every step once; a `{"event": "resume"}` record says how many were dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfoundry.config import RunConfig, to_dict
from kfoundry.errors import DependencyError
from kfoundry.fileio import atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: Path, cfg: RunConfig):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is optional for the library

            self.tb = SummaryWriter(str(Path(out_dir) / "tb"))
        except ImportError:
            pass
        if cfg.train.wandb:
            try:
                import wandb  # optional dependency
            except ImportError:
                raise DependencyError("train.wandb=true needs the wandb package: pip install 'kfoundry[wandb]'") from None
            self.wandb = wandb.init(project="kfoundry", dir=str(out_dir), config=to_dict(cfg))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        step = record.get("step", 0)
        if self.tb and record.get("event") is None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()

    @staticmethod
    def truncate_after(path: Path, step: int) -> int:
        """Drop the step records after `step` (they are about to be trained again); returns how many."""
        if not path.is_file():
            return 0
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1  # a line cut by the kill
                continue
            if rec.get("event") is None and isinstance(rec.get("step"), int) and rec["step"] > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return dropped


def read_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def median_tps(path: Path) -> float | None:
    """Median tokens/s over the logged windows (the first one includes warm-up, so the median is fairer)."""
    values = sorted(r["tokens_per_sec"] for r in read_records(path)
                    if "tokens_per_sec" in r and r.get("event") is None and r["tokens_per_sec"])
    return values[len(values) // 2] if values else None
