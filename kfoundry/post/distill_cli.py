"""`kfoundry distill --teacher CKPT --student-preset nano --out DIR`: distil a teacher into a small student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kfoundry.checkpoint import load_config
from kfoundry.config import STAGE_PRESETS, resolve, settings_table, stage_options
from kfoundry.errors import ConfigError, MissingPathError
from kfoundry.post.distill import check_settings, distill, teacher_shards
from kfoundry.train.cli import SETTINGS_EPILOG, add_resume_args, launch_torchrun
from kfoundry.train.distributed import env_rank


def register(sub: argparse._SubParsersAction) -> None:
    defaults = stage_options("distill")
    p = sub.add_parser("distill", help="train a small student on a teacher's soft predictions",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=SETTINGS_EPILOG.format(table=settings_table(stage="distill")))
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    p.add_argument("--student-preset", default=None, help="preset for the student's shape and schedule (default "
                                                          f"{STAGE_PRESETS['distill']['base']})")
    p.add_argument("--out", required=True, help="run directory for the student")
    p.add_argument("--config", default=None, help="YAML recipe for the student")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a student config value, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--shards", default=None,
                   help="token shards of the teacher's tokenizer (default: the shards of the teacher's own run, "
                        "RUN/shards, so both models are scored on the validation split the teacher never trained on)")
    p.add_argument("--alpha", type=float, default=None, help=f"weight of the KL term; 0 = no teacher (default {defaults['alpha']})")
    p.add_argument("--temperature", type=float, default=None, help=f"softening temperature T > 0 (default {defaults['temperature']})")
    add_resume_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or TensorBoard")
    p.add_argument("--nproc", type=int, default=None,
                   help="launch N processes on this machine with torchrun (FSDP2 by default; see docs/distributed.md)")
    p.set_defaults(func=_distill)


def _distill(args) -> int:
    if args.nproc is not None:
        return launch_torchrun(args.nproc, args.argv)
    defaults = stage_options("distill")
    alpha = defaults["alpha"] if args.alpha is None else args.alpha
    temperature = defaults["temperature"] if args.temperature is None else args.temperature
    check_settings(alpha, temperature)
    teacher = Path(args.teacher)
    vocab = load_config(teacher).vocab_size  # a missing teacher fails here, before anything is written
    if not (teacher / "tokenizer").is_dir():
        raise MissingPathError(f"teacher {teacher} has no tokenizer/ directory")
    shard_dir = Path(args.shards) if args.shards else teacher_shards(teacher)
    if shard_dir is None:
        raise ConfigError(f"no --shards given and the teacher's run has none ({teacher.resolve().parent.parent}/shards):"
                          " pass the shards the teacher was trained on, so that both models are evaluated on the "
                          "validation split the teacher never saw")
    overrides = list(args.overrides)
    # Same tokenizer as the teacher, hence the same vocabulary size.
    overrides += [f"model.vocab_size={vocab}", f"data.vocab_size={vocab}"]
    cfg = resolve(args.student_preset, args.config, overrides, stage="distill")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    explicit = bool(args.config or args.overrides or args.alpha is not None or args.temperature is not None
                    or args.student_preset)
    summary = distill(teacher, cfg, out, shard_dir=shard_dir, alpha=alpha, temperature=temperature,
                      resume=args.resume, progress=not args.no_progress, explicit=explicit,
                      allow_change=args.allow_change)
    if env_rank() == 0:
        print(json.dumps({k: summary[k] for k in ("checkpoint", "step", "eval", "teacher_eval", "params",
                                                  "teacher_params")}, ensure_ascii=False))
    return 0
