"""The one entry point, `kfoundry`. Each stage registers its own subcommands; this file only wires them.

A stage module exposes `register(subparsers)`, which adds its parser(s) and sets `func=<callable(args)>`
as a default. The callable returns an exit code (or None for 0). Errors a user can fix (a missing path,
an unknown spec, a bad override) are raised as `UserError`, `FileNotFoundError` or `ValueError` and
printed as one line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from kfoundry.errors import KFoundryError

# Modules that register subcommands, in the order they appear in `kfoundry --help`.
STAGE_MODULES = [
    "kfoundry.speedrun",
    "kfoundry.data.cli",
    "kfoundry.tokenizer.cli",
    "kfoundry.train.cli",
    "kfoundry.serve.generate_cli",
    "kfoundry.convert.cli",
    "kfoundry.post.cli",
    "kfoundry.export.cli",
    "kfoundry.eval.cli",
    "kfoundry.post.distill_cli",
    "kfoundry.serve_cli",
    "kfoundry.provenance.cli",
    "kfoundry.doctor",
]


class UserError(Exception):
    """An error the user can fix; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfoundry", description="Build Korean-first foundation models from scratch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a stage not built yet (or an optional dependency missing)
            if e.name and (e.name == name or name.startswith(e.name + ".")):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv  # for commands that re-launch themselves (pretrain --nproc N under torchrun)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except (KFoundryError, UserError, FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        if os.environ.get("KFOUNDRY_DEBUG"):
            raise
        print(f"kfoundry: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kfoundry: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
