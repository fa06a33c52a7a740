"""`kfoundry distill --teacher CKPT --student-preset nano --out DIR`: distil a teacher into a small student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("distill", help="train a small student on a teacher's soft predictions")
    p.add_argument("--teacher", required=True, help="teacher checkpoint directory")
    p.add_argument("--student-preset", default="nano", help="preset for the student's shape and schedule (default nano)")
    p.add_argument("--out", required=True, help="run directory for the student")
    p.add_argument("--config", default=None, help="YAML recipe for the student")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a student config value, e.g. --set train.max_steps=200 (repeatable)")
    p.add_argument("--corpus", default=None, help="corpus spec for the shards (default: the preset's)")
    p.add_argument("--shards", default=None,
                   help="token shards written with the teacher's tokenizer (default: OUT/shards, built if missing)")
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term; 0 = no teacher (baseline)")
    p.add_argument("--temperature", type=float, default=1.0, help="softening temperature T (> 0)")
    p.add_argument("--resume", default=None, help="'auto' = newest complete checkpoint under OUT/ckpt, or a path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or TensorBoard")
    p.set_defaults(func=_distill)


def _distill(args) -> int:
    from kfoundry.checkpoint import load_config
    from kfoundry.config import resolve
    from kfoundry.pipeline import ensure_shards
    from kfoundry.post.distill import check_settings, distill

    check_settings(args.alpha, args.temperature)
    teacher = Path(args.teacher)
    vocab = load_config(teacher).vocab_size  # a missing teacher fails here, before anything is written
    if not (teacher / "tokenizer").is_dir():
        raise FileNotFoundError(f"teacher {teacher} has no tokenizer/ directory")
    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"data.corpus={args.corpus}")
    # Same tokenizer as the teacher, hence the same vocabulary size.
    overrides += [f"model.vocab_size={vocab}", f"data.vocab_size={vocab}"]
    cfg = resolve(args.student_preset, args.config, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shard_dir = Path(args.shards) if args.shards else ensure_shards(out, cfg, teacher / "tokenizer")
    summary = distill(teacher, cfg, out, shard_dir=shard_dir, alpha=args.alpha, temperature=args.temperature,
                      resume=args.resume, progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("checkpoint", "step", "eval", "teacher_eval", "params",
                                              "teacher_params")}, ensure_ascii=False))
    return 0
