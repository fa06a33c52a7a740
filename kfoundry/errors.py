"""Errors a user can cause and fix, as one family.

The CLI prints a `KFoundryError` as one line (`kfoundry: error: ...`) and exits 2; any other exception is a bug
(or a failure inside a library we call) and keeps its traceback. That is the whole rule: the CLI looks at the
class, never at where or how the exception was raised, so every check in kfoundry that a user can trip raises
one of these (tests/test_errors.py fails on a bare builtin ValueError raised anywhere that is not on its list
of internal invariants).

Each subclass also derives from the builtin exception that the check raised before this family existed
(`ValueError`, `FileNotFoundError`, `FileExistsError`, `ImportError`), so code that
catches the builtin keeps working: `except ValueError` around a configuration, `pytest.raises(ValueError)`, and
pydantic validators, which turn a `ValueError` into a validation error (our server answers it with a 400).

Which class to raise:
- `ConfigError`: a setting, option, recipe, preset or argument (including `--out` that already exists);
- `CheckpointError`: a checkpoint, export or other model file (weights, config.json, tokenizer, chat template);
- `DataError`: input data (corpora, shards, chat and preference files, evaluation sets, a request's content);
- `MissingPathError` / `PathExistsError`: a path that is missing, or in the way;
- `DependencyError`: an optional package or program that is not installed.
"""

from __future__ import annotations


class KFoundryError(Exception):
    """Something the user can fix: a bad setting, a broken file, missing data or a missing dependency."""


class ConfigError(KFoundryError, ValueError):
    """A configuration value, recipe or command-line option that cannot be used."""


class CheckpointError(KFoundryError, ValueError):
    """A checkpoint or other model file (weights, config, tokenizer) that is missing, incomplete, corrupt, or
    not one kfoundry can load or write as asked."""


class DataError(KFoundryError, ValueError):
    """Input data that cannot be used as given."""


class DependencyError(KFoundryError, ImportError):
    """An optional package a command needs is not installed."""


class MissingPathError(KFoundryError, FileNotFoundError):
    """A path the user named does not exist, or lacks a file it must hold (also a FileNotFoundError, for code
    that catches that)."""


class PathExistsError(KFoundryError, FileExistsError):
    """A path that must not exist yet already does (also a FileExistsError, for code that catches that)."""

