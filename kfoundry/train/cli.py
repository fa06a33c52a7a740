"""`kfoundry pretrain`: train from random initialisation (or `--init CKPT`), resumable with `--resume auto`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help="named preset (cpu-tiny, test-micro, gpu-124m); default cpu-tiny")
    p.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--corpus", default=None, help="corpus spec (shortcut for --set data.corpus=SPEC)")


def resolve_config(args):
    from kfoundry.config import resolve

    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"data.corpus={args.corpus}")
    return resolve(args.preset, args.config, overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (single process; torchrun for many)")
    p.add_argument("--out", required=True, help="run directory")
    add_config_args(p)
    p.add_argument("--resume", default=None, help="'auto' = newest complete checkpoint under OUT/ckpt, or a path")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights (continued pretraining)")
    p.add_argument("--shards", default=None, help="token shard directory (default: OUT/shards, built if missing)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: OUT/tokenizer, trained if missing)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or TensorBoard")
    p.set_defaults(func=_pretrain)


def _pretrain(args) -> int:
    from kfoundry.pipeline import ensure_shards, ensure_tokenizer
    from kfoundry.train.loop import pretrain

    cfg = resolve_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer) if args.tokenizer else ensure_tokenizer(out, cfg)
    shard_dir = Path(args.shards) if args.shards else ensure_shards(out, cfg, tok_dir)
    summary = pretrain(cfg, out, shard_dir=shard_dir, tokenizer_dir=tok_dir, resume=args.resume, init=args.init,
                       progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("step", "final_loss", "checkpoint", "tokens_per_sec", "mfu")}))
    return 0
