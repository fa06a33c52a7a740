"""`kfoundry pretrain`: train from random initialisation (or `--init CKPT`), resumable with `--resume auto`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from kfoundry.config import PRESETS, resolve, settings_table
from kfoundry.errors import ConfigError
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.train.distributed import env_rank, wait_for_files
from kfoundry.train.loop import pretrain

# The --help epilog of the training commands: every setting with its value in the default preset and its meaning,
# printed from the settings' own `help` (config.py), so the meaning is written once.
SETTINGS_EPILOG = """settings (--set KEY=VALUE; null = off; values shown are the default preset's; `kfoundry config --preset P`
shows another preset's):
{table}"""


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, help=f"named preset ({', '.join(PRESETS)}); default cpu-tiny")
    p.add_argument("--config", default=None, help="YAML recipe (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable; every key is listed below)")
    p.add_argument("--corpus", default=None, help="corpus spec (shortcut for --set data.corpus=SPEC)")


def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None,
                   help="'auto' = newest good checkpoint under OUT/ckpt (a new run if there is none), or a checkpoint "
                        "path. Without it, an OUT that already holds checkpoints is refused")
    p.add_argument("--allow-change", action="store_true",
                   help="on --resume, let the settings given on this command line replace the run's recorded ones "
                        "(recorded in the ledger and metrics.jsonl); without it a differing setting is refused")


def explicit_settings(args) -> bool:
    """Did the command line name any setting? If not, a resumed run keeps its recorded settings."""
    return bool(args.preset or args.config or args.overrides or getattr(args, "corpus", None))


def prepare_on_rank0(out: Path, needed: list[Path], prepare) -> None:
    """Run `prepare()` on rank 0 before any process group exists, while the other ranks wait for the files it
    writes: data preparation may take hours, far past a collective's timeout."""
    failed = out / ".prepare-failed"
    if env_rank() == 0:
        failed.unlink(missing_ok=True)
        try:
            prepare()
        except BaseException as e:
            failed.write_text(f"{type(e).__name__}: {e}", encoding="utf-8")
            raise
    else:
        wait_for_files(needed, failed)


def resolve_config(args):
    overrides = list(args.overrides)
    if args.corpus:
        overrides.append(f"data.corpus={args.corpus}")
    return resolve(args.preset, args.config, overrides)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="pretrain a model (single process; torchrun for many)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=SETTINGS_EPILOG.format(table=settings_table()))
    p.add_argument("--out", required=True, help="run directory")
    add_config_args(p)
    add_resume_args(p)
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
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "kfoundry", *_without_nproc(argv)]
    print("launching: " + " ".join(cmd[2:]), file=sys.stderr)
    return subprocess.call(cmd)


def _pretrain(args) -> int:
    if args.nproc is not None:
        return launch_torchrun(args.nproc, args.argv)
    cfg = resolve_config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.tokenizer and args.init:  # continued pretraining keeps the tokenizer of the weights it starts from
        args.tokenizer = str(Path(args.init) / "tokenizer")
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    shard_dir = Path(args.shards) if args.shards else out / "shards"

    def prepare() -> None:
        if not args.tokenizer:
            ensure_tokenizer(out, cfg)
        if not args.shards:
            ensure_shards(out, cfg, tok_dir)

    prepare_on_rank0(out, [tok_dir / "tokenizer.json", shard_dir / "meta.json"], prepare)
    summary = pretrain(cfg, out, shard_dir=shard_dir, tokenizer_dir=tok_dir, resume=args.resume, init=args.init,
                       progress=not args.no_progress, explicit=explicit_settings(args),
                       allow_change=args.allow_change)
    if env_rank() == 0:
        print(json.dumps({k: summary[k] for k in ("step", "final_loss", "checkpoint", "tokens_per_sec", "mfu")}))
    return 0
