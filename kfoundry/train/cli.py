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
    p.add_argument("--nproc", type=int, default=None,
                   help="launch N processes on this machine with torchrun (FSDP2 by default; see docs/distributed.md)")
    p.set_defaults(func=_pretrain)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """`kfoundry pretrain --nproc N ...` = `torchrun --standalone --nproc_per_node N -m kfoundry pretrain ...`."""
    import subprocess
    import sys

    if nproc < 1:
        raise ValueError("--nproc must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kfoundry", *_without_nproc(argv)]
    print("launching: " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd)


def _pretrain(args) -> int:
    from kfoundry.pipeline import ensure_shards, ensure_tokenizer
    from kfoundry.train.distributed import barrier, init_distributed
    from kfoundry.train.loop import pretrain

    if args.nproc is not None:
        return launch_torchrun(args.nproc, args.argv)
    cfg = resolve_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = init_distributed(cfg.train.device)  # a no-op outside torchrun
    if not args.tokenizer and args.init:  # continued pretraining keeps the tokenizer of the weights it starts from
        args.tokenizer = str(Path(args.init) / "tokenizer")
    if info.is_main:  # one process builds what the run needs; the others wait for it
        tok_dir = Path(args.tokenizer) if args.tokenizer else ensure_tokenizer(out, cfg)
        if not args.shards:
            ensure_shards(out, cfg, tok_dir)
    barrier(info)
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    shard_dir = Path(args.shards) if args.shards else out / "shards"
    summary = pretrain(cfg, out, shard_dir=shard_dir, tokenizer_dir=tok_dir, resume=args.resume, init=args.init,
                       progress=not args.no_progress)
    if info.is_main:
        print(json.dumps({k: summary[k] for k in ("step", "final_loss", "checkpoint", "tokens_per_sec", "mfu")}))
    return 0
