"""Errors a user can cause and fix, as one family.

The CLI prints a `KFoundryError` as one line (`kfoundry: error: ...`) and exits 2; any other exception is a bug
and keeps its traceback. Each subclass also derives from `ValueError`, so code that already catches
`ValueError` around a configuration or a file keeps working.
"""

from __future__ import annotations


class KFoundryError(Exception):
    """Something the user can fix: a bad setting, a broken file, missing data or a missing dependency."""


class ConfigError(KFoundryError, ValueError):
    """A configuration value, recipe or command-line option that cannot be used."""


class CheckpointError(KFoundryError, ValueError):
    """A checkpoint that is missing, incomplete, corrupt or not ours to load."""


class DataError(KFoundryError, ValueError):
    """Input data that cannot be used as given."""


class DependencyError(KFoundryError, ImportError):
    """An optional package a command needs is not installed."""


class MissingPathError(KFoundryError, FileNotFoundError):
    """A path the user named does not exist (also a FileNotFoundError, for code that catches that)."""
