"""What SFT, DPO and distillation share before they hand a stage to the one training engine (train/trainer.py):
join torchrun's process group when launched by it, decide between a new run and a resume, and take the settings
the run continues with (a resume keeps the recorded ones unless a change is explicitly allowed).

    info, run, cfg, options = open_post_run("sft", out_dir, cfg, {"epochs": 3.0}, resume="auto", data_sha256=...)

Each stage then builds its model, batch source and loss from `cfg`/`options` and calls `Trainer(...).fit()`: the
same step, accumulation, clipping, schedule, logging, evaluation cadence, checkpoints and exact resume as
pretraining, in one process or under torchrun with FSDP2/DDP.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfoundry.config import RunConfig
from kfoundry.train.distributed import DistInfo, init_distributed
from kfoundry.train.trainer import RunStart, accumulation_steps, config_of, open_run, settings_of


def open_post_run(stage: str, out_dir: str | Path, cfg: RunConfig, options: dict[str, Any], *, resume: str | None,
                  data_sha256: str, explicit: bool = True, allow_change: bool = False,
                  log: Callable[[str], None] = print) -> tuple[DistInfo, RunStart, RunConfig, dict[str, Any]]:
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    run = open_run(Path(out_dir), settings_of(cfg, **options), resume=resume, info=info, explicit=explicit,
                   allow_change=allow_change, stage=stage, data_sha256=data_sha256,
                   log=log if info.is_main else (lambda m: None))
    cfg, options = config_of(run.settings)
    return info, run, cfg, options


def derived_max_steps(run: RunStart, requested: int | None, derive: Callable[[], int]) -> int:
    """`train.max_steps`, or when it is None the length derived from the data (epochs): a resumed run keeps the
    length it was started with, even if it now runs on another number of processes."""
    if requested is not None:
        return requested
    if run.state is not None and isinstance(run.state.get("max_steps"), int):
        return run.state["max_steps"]
    return derive()


def batches_per_step(tc, world_size: int) -> int:
    """Micro-batches one optimizer step consumes over all ranks (the Trainer's accumulation x world size)."""
    return world_size * accumulation_steps(tc, world_size)
