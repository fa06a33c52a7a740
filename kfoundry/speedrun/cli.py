"""The `kfoundry speedrun` subcommand: parse the flags, run `speedrun`, print where the report is."""

from __future__ import annotations

import argparse
from pathlib import Path

from kfoundry.errors import ConfigError
from kfoundry.extras import require
from kfoundry.train.cli import add_config_args, resolve_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("speedrun", help="run the whole pipeline end to end and write a report")
    p.add_argument("--out", required=True, help="run directory")
    add_config_args(p)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for pretraining (minutes)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_speedrun)


def _speedrun(args) -> int:
    # The whole pipeline curates, evaluates and exports: say which extra is missing before any stage runs.
    for extra in ("data", "eval", "export"):
        require(extra, "kfoundry speedrun")
    # lazy: the stages import those extras, and `kfoundry --help` must work without them
    from kfoundry.speedrun.run import speedrun

    cfg = resolve_config(args)
    if args.minutes is not None:
        if args.minutes <= 0:
            raise ConfigError("--minutes must be positive")
        cfg.train.max_minutes = args.minutes
    report = speedrun(cfg, Path(args.out), progress=not args.no_progress)
    print(f"\nspeedrun done in {sum(report['stage_seconds'].values()):.0f} s: "
          f"validation {report.get('val_bpb', float('nan')):.3f} bits/byte")
    print(f"  report:     {Path(args.out) / 'report.md'}")
    print(f"  checkpoint: {report['paths']['checkpoint']}")
    print(f"  try:        kfoundry generate --model {report['paths']['checkpoint']} --prompt '대한민국은'")
    return 0
