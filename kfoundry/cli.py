"""The one entry point, `kfoundry`. Each stage registers its own subcommands; this file only wires them.

A stage module exposes `register(subparsers)`, which adds its parser(s) and sets `func=<callable(args)>`
as a default. The callable returns an exit code (or None for 0).

Errors a user can fix (a bad setting, a missing path, a broken checkpoint, a missing optional package) are
`KFoundryError`s (errors.py) and are printed as one line, exit code 2. Anything else is a bug, or a failure
inside a library we call, and keeps its full traceback: a `ValueError` raised inside torch or numpy is not a
message meant for the user. Until every check in the package raises a `KFoundryError`, a plain `ValueError` /
`FileNotFoundError` that kfoundry's own code raised on purpose (a `raise ...(...)` statement in a kfoundry module)
is still printed in one line (`_raised_by_kfoundry`). `KFOUNDRY_DEBUG=1` shows the traceback of everything.
"""

from __future__ import annotations

import argparse
import importlib
import linecache
import os
import re
import sys
from pathlib import Path

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


PACKAGE_DIR = Path(__file__).resolve().parent
_RAISE = re.compile(r"raise\s+[A-Za-z_][\w.]*\(")
# Exceptions kfoundry's own checks raised before the KFoundryError family existed (see _raised_by_kfoundry).
LEGACY_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _raised_by_kfoundry(e: BaseException) -> bool:
    """True when the innermost frame of `e` is a `raise Name(...)` statement in a kfoundry module: a message we
    wrote for the user. False when it came from inside another library (torch, numpy, the standard library) or
    from a failing call in our code (`int("x")`), which are bugs and keep their traceback."""
    tb = e.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    try:
        ours = Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except OSError:
        return False
    return ours and bool(_RAISE.match(linecache.getline(filename, tb.tb_lineno).strip()))


def is_user_error(e: BaseException) -> bool:
    """Printed in one line (True) or with its traceback (False)."""
    return isinstance(e, KFoundryError) or (isinstance(e, LEGACY_USER_ERRORS) and _raised_by_kfoundry(e))


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
