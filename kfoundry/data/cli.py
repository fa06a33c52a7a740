"""`kfoundry data ...`: the data stage's commands.

`register` adds the `data` group and one subcommand per job, in pipeline order:

    kfoundry data prepare ...   curation (normalise, filter, dedup, PII, data card); its own module
    kfoundry data shard ...     encode a corpus into token shards (this module)

Each subcommand is a thin call into a library function, so everything the command does can be done from
Python too (`kfoundry.data.shards.write_shards`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kfoundry.config import DataConfig
from kfoundry.corpus import CorpusStats, iter_documents
from kfoundry.data.prepare_cli import parse_options
from kfoundry.data.shards import write_shards
from kfoundry.errors import MissingPathError
from kfoundry.extras import require
from kfoundry.tokenizer import KTokenizer


def register(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="curate a corpus and write token shards",
                                 description="Data stage: curation (prepare) and token shards (shard).")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")

    def show_help(_args: argparse.Namespace) -> int:
        data.print_help()
        return 2

    data.set_defaults(func=show_help)
    _register_prepare(data_sub)
    _register_shard(data_sub)


def _register_prepare(data_sub: Any) -> None:
    """The place for `data prepare`: its module provides `register_prepare(data_sub)`; skipped until it exists."""
    try:
        from kfoundry.data.prepare_cli import register_prepare
    except ModuleNotFoundError as e:
        if e.name == "kfoundry.data.prepare_cli":
            return
        raise
    register_prepare(data_sub)


# ---------------------------------------------------------------------------------------------------------
# data shard


def _register_shard(data_sub: Any) -> None:
    p = data_sub.add_parser(
        "shard", help="encode a corpus into token shards for training",
        description="Encode every document as [BOS] tokens [EOS] into uint16/uint32 shard files with a "
                    "per-document index, split by document into train and val. The output directory "
                    "appears atomically.")
    p.add_argument("--corpus", required=True, help="corpus spec: starter, a file or folder, hf:NAME, or a weighted mix")
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (from `kfoundry tokenizer train`)")
    p.add_argument("--out", required=True, help="shard directory to create")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of documents held out for validation")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split and the corpus reader")
    p.add_argument("--shard-tokens", type=int, default=1 << 24, help="tokens per shard file before a new one starts")
    p.add_argument("--max-chars-per-doc", type=int, default=DataConfig().max_chars_per_doc,
                   help="the corpus reader's cap on document length")
    p.add_argument("--tasks", type=int, default=1,
                   help="encode tasks the corpus is cut into (datatrove tasks; 1 = this process, no executor); the "
                        "shard files are the same whatever the count")
    p.add_argument("--workers", type=int, default=1, help="tasks run at the same time (local: processes)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor for the tasks, as for `data prepare`")
    p.add_argument("--executor-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra argument for the datatrove executor, e.g. partition=cpu time=02:00:00 (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    p.set_defaults(func=run_shard)


def run_shard(args: argparse.Namespace) -> int:
    tok_dir = Path(args.tokenizer)
    if not tok_dir.is_dir():
        raise MissingPathError(f"tokenizer directory not found: {tok_dir}")
    tok = KTokenizer.load(tok_dir)
    stats = CorpusStats()
    # A bad spec raises CorpusError (a DataError: one line, exit 2) here, before anything is written.
    docs = iter_documents(args.corpus, stats, max_chars_per_doc=args.max_chars_per_doc, seed=args.seed)
    config = {"command": "data shard", "tokenizer_hash": tok.hash,
              **{k: v for k, v in vars(args).items() if k not in ("func", "command", "data_command")}}
    if args.tasks == 1 and args.executor == "local":
        meta = write_shards(docs, tok, args.out, val_fraction=args.val_fraction, seed=args.seed,
                            shard_tokens=args.shard_tokens, stats=stats, config=config, overwrite=args.overwrite)
    else:
        require("data", "kfoundry data shard --tasks/--executor")
        from kfoundry.data.shard_tasks import shard_corpus  # the [data] extra (datatrove executors)

        meta = shard_corpus(args.corpus, tok_dir, args.out, tasks=args.tasks, workers=args.workers,
                            executor=args.executor, executor_options=parse_options(args.executor_opt),
                            val_fraction=args.val_fraction, seed=args.seed, shard_tokens=args.shard_tokens,
                            max_chars_per_doc=args.max_chars_per_doc, config=config, overwrite=args.overwrite)
        if meta.get("submitted"):
            print(f"shards: submitted {args.tasks} encode tasks and the merge with {args.executor} -> {args.out}")
            return 0
    print(summary_line(meta, args.out))
    return 0


def summary_line(meta: dict[str, Any], out: str | Path) -> str:
    """One line: totals, each split, and every dropped document by reason (the reader's and ours)."""
    parts = [f"{name} {sp['docs']:,} docs / {sp['tokens']:,} tokens" for name, sp in meta["splits"].items()]
    dropped = dict(_reader_dropped(meta.get("corpus_stats")))
    for reason, n in meta["dropped"].items():
        dropped[reason] = dropped.get(reason, 0) + n
    drops = ", ".join(f"{k}={v:,}" for k, v in sorted(dropped.items()) if v) or "none"
    return (f"shards: {meta['docs']:,} docs, {meta['tokens']:,} tokens ({'; '.join(parts)}); "
            f"dropped: {drops} -> {out}")


def _reader_dropped(stats: Any) -> dict[str, int]:
    """The corpus reader's dropped counts, if its stats carry a `dropped` mapping of reason -> count."""
    if isinstance(stats, dict) and isinstance(stats.get("dropped"), dict):
        return {str(k): int(v) for k, v in stats["dropped"].items()}
    return {}
