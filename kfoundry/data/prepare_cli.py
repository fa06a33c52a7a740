"""`kfoundry data prepare`: curation (normalize, language, quality, decontamination, dedup, PII, data card).

A thin layer over `kfoundry.data.curate.prepare`; docs/curation.md is the guide.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from kfoundry.data.recipe_names import builtin_recipes
from kfoundry.errors import ConfigError
from kfoundry.extras import require


def register_prepare(data_sub: Any) -> None:
    p = data_sub.add_parser(
        "prepare", help="curate a corpus: filter, deduplicate, remove personal data, write a data card",
        description="Curate a corpus with datatrove: normalize, route by language, quality filters "
                    "(FineWeb-2 kor_Hang thresholds for Korean), decontaminate against evaluation sets, exact "
                    "and MinHash dedup, Korean PII placeholders; write curated JSONL, exclusion files, a data "
                    "card and token shards. Re-running on the same --out resumes.")
    p.add_argument("--corpus", required=True, help="corpus spec: starter, a file or folder, hf:NAME, or a weighted mix")
    p.add_argument("--out", required=True, help="output directory (created; an unfinished run there is resumed)")
    p.add_argument("--recipe", default="ko-web",
                   help=f"built-in recipe ({', '.join(builtin_recipes())}) or a recipe .yaml file (default ko-web)")
    p.add_argument("--executor", choices=("local", "slurm", "ray"), default="local",
                   help="datatrove executor: local processes here, or a Slurm / Ray cluster")
    p.add_argument("--workers", type=int, default=1, help="tasks run at the same time (local: processes)")
    p.add_argument("--tasks", type=int, default=None, help="pieces the corpus is cut into (default 2 x workers)")
    p.add_argument("--executor-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="extra argument for the datatrove executor, e.g. partition=cpu time=04:00:00 (repeatable)")
    p.add_argument("--decontam", action="append", default=None, metavar="DIR",
                   help="folder of evaluation files to decontaminate against (repeatable; replaces the recipe's "
                        "sets, which default to the shared KoBEST copy)")
    p.add_argument("--no-decontam", action="store_true", help="skip decontamination")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for the token shards (default: train one)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the tokenizer trained for the shards")
    p.add_argument("--no-shards", action="store_true", help="stop after the curated documents and the data card")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus reader and the train/val split")
    p.add_argument("--overwrite", action="store_true", help="replace an --out that holds another run")
    p.add_argument("--verbose", action="store_true", help="show datatrove's own logs")
    p.set_defaults(func=run_prepare)


def parse_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE strings as a dict; values are read as YAML scalars (4 -> int, true -> bool)."""
    opts: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--executor-opt expects KEY=VALUE, got {item!r}")
        opts[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
    return opts


def run_prepare(args: argparse.Namespace) -> int:
    require("data", "kfoundry data prepare")
    from kfoundry.data.curate import prepare  # the [data] extra: datatrove and the Korean tools

    decontam = [] if args.no_decontam else args.decontam
    card = prepare(args.corpus, Path(args.out), recipe=args.recipe, executor=args.executor, workers=args.workers,
                   tasks=args.tasks, decontam=decontam, tokenizer=args.tokenizer, shards=not args.no_shards,
                   vocab_size=args.vocab_size, seed=args.seed, executor_options=parse_options(args.executor_opt),
                   overwrite=args.overwrite, verbose=args.verbose)
    print(summary_line(card, args.out))
    return 0


def summary_line(card: dict[str, Any], out: str | Path) -> str:
    if card.get("submitted"):
        return f"prepare: submitted {len(card['stages'])} stages -> {out}"
    t = card["totals"]
    share = 100.0 * t["docs_curated"] / t["docs_read"] if t["docs_read"] else 0.0
    reasons = ", ".join(f"{r['step']}/{r['reason']}={r['docs']:,}" for r in card["top_removals"][:4]) or "none"
    ok = "holds" if card["identity"]["ok"] else "BROKEN"
    return (f"prepare: {t['docs_read']:,} documents read -> {t['docs_curated']:,} curated ({share:.1f}%); "
            f"top removals: {reasons}; accounting identity {ok} -> {Path(out) / 'data_card.md'}")
