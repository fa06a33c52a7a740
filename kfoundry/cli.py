"""The one entry point, `kfoundry`. Each stage registers its own subcommands; this file only wires them.

A stage module exposes `register(subparsers)`, which adds its parser(s) and sets `func=<callable(args)>`
as a default. The callable returns an exit code (or None for 0).

Errors a user can fix (a bad setting, a missing path, a broken checkpoint, a missing optional package) are
`KFoundryError`s (errors.py) and are printed as one line, exit code 2. Anything else is a bug, or a failure
inside a library we call, and keeps its full traceback: a `ValueError` raised inside torch or numpy, or a plain
`ValueError` that guards one of kfoundry's own internal invariants, is not a message meant for the user. The
class alone decides; tests/test_errors.py keeps every user-facing check in the package a `KFoundryError`.
`KFOUNDRY_DEBUG=1` shows the traceback of everything.
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
    "kfoundry.config_cli",
    "kfoundry.doctor",
]


def is_user_error(e: BaseException) -> bool:
    """Printed in one line (True) or with its traceback (False)."""
    return isinstance(e, KFoundryError)


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
    except Exception as e:
        if os.environ.get("KFOUNDRY_DEBUG") or not is_user_error(e):
            raise
        print(f"kfoundry: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kfoundry: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
