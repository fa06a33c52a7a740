"""`kfoundry config`: every setting, its type, its value in a preset and what it means.

    kfoundry config                       # the default preset (cpu-tiny)
    kfoundry config --preset gpu-124m     # another preset's values
    kfoundry config --stage sft           # what `kfoundry sft` starts from (its stage preset on its base preset)
    kfoundry config --config recipes/1b-fsdp.yaml --set train.lr=1e-3   # a recipe with overrides, validated

The meanings come from the settings' own `help` (config.py), the one place they are written.
"""

from __future__ import annotations

import argparse

from kfoundry.config import PRESETS, STAGE_PRESETS, resolve, settings_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="list every setting: type, value in a preset, meaning (and validate a recipe)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="show this preset's values")
    p.add_argument("--stage", default=None, choices=sorted(STAGE_PRESETS),
                   help="layer this post-training stage's preset on the base preset, as its command does")
    p.add_argument("--config", default=None, help="YAML recipe to resolve and validate")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value (repeatable), as the training commands take it")
    p.set_defaults(func=_config)


def _config(args) -> int:
    if args.preset or args.config or args.overrides or args.stage:
        cfg = resolve(args.preset, args.config, args.overrides, stage=args.stage)
    else:
        cfg = None
    sections = ("train",) if args.stage in ("sft", "dpo") else ("model", "train", "data")
    print(settings_table(cfg, sections, stage=args.stage))
    return 0
