"""`ledger.jsonl`: an append-only, hash-chained record of how a run's artefacts came to be.

One JSON object per line. Every entry carries four fields of its own plus whatever the stage recorded:

    {"seq": 3, "kind": "checkpoint", "time": "2026-...Z", "prev": "<hash of line 2>", ...fields..., "hash": "..."}

- `hash` is the sha256 of the entry's canonical JSON (sorted keys, no spaces, UTF-8) *without* the `hash` field,
  so editing any value of a line changes what its hash should be;
- `prev` is the `hash` of the line before (null for the first line), so removing, inserting or reordering lines
  breaks the link after them;
- `seq` counts lines from 0, so a truncated head is visible too.

What a hash chain proves, and what it does not: it proves that no line was changed after a later line was
written. It cannot stop someone from rewriting the *whole tail* (recomputing every hash after the line they
edit), because nothing here is secret. That is why the model card publishes the ledger's head hash: once the
head is written somewhere else (a model card on the hub, a commit, a report), the history before it is fixed.

A chain cannot see its own end either: cutting the last lines off leaves a shorter chain whose every link holds.
So the end is written down outside the ledger, twice:

- `ledger.head.json` beside the ledger holds the number of lines and the hash of the last one, rewritten after
  every append (`check_chain` compares the ledger with it; `record` refuses to append to a ledger shorter than it);
- every checkpoint carries the line that recorded it (`ledger_entry.json`, written by `record.record_checkpoint`),
  so cutting a checkpoint's line is seen from the checkpoint as well, even by someone who rewrote the head file.

Appends take an exclusive `flock` on the file and write the line with one `write` call on an O_APPEND
descriptor, so two stages recording into the same run at once cannot interleave or fork the chain.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from kfoundry.errors import DataError
from kfoundry.fileio import atomic_write_json

LEDGER_NAME = "ledger.jsonl"
HEAD_NAME = "ledger.head.json"  # {"lines": N, "hash": hash of line N}: where the ledger ended when last written
RESERVED = ("seq", "kind", "time", "prev", "hash")


class LedgerError(DataError):
    """A ledger that cannot be read or appended to (a broken last line, a reserved field name, ...)."""


def ledger_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / LEDGER_NAME


def head_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / HEAD_NAME


def read_head(run_dir: str | Path) -> dict[str, Any] | None:
    """What `ledger.head.json` says (None when there is none, or it does not hold a line count and a hash)."""
    try:
        head = json.loads(head_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or not isinstance(head.get("lines"), int) or not isinstance(head.get("hash"), str):
        return None
    return head


def line_hash(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return entry.get("hash") if isinstance(entry, dict) else None


def check_head(run_dir: str | Path, lines: list[str]) -> list[str]:
    """Problems with the ledger's end against `ledger.head.json`, given the ledger's lines.

    A ledger longer than its head is not a problem (a process was stopped between writing a line and its head);
    a shorter one lost lines at the end, and a different line where the head points means the tail was rewritten.
    """
    path, head = ledger_path(run_dir), read_head(run_dir)
    if not lines:
        return [] if head is None else [f"{path}: empty, but {HEAD_NAME} says it had {head['lines']} line(s) "
                                        "(the ledger was cut or replaced)"]
    if head is None:
        return [f"{head_path(run_dir)}: missing or unreadable, so lines cut off the end of {path} cannot be "
                "detected (every kfoundry ledger writes it beside the ledger)"]
    n = head["lines"]
    if n > len(lines):
        cut = f"line {n} was" if n == len(lines) + 1 else f"lines {len(lines) + 1}-{n} were"
        return [f"{path}: {len(lines)} line(s), but {HEAD_NAME} says it had {n}: {cut} cut off the end"]
    if n < 1 or line_hash(lines[n - 1]) != head["hash"]:
        return [f"{path} line {n}: not the line {HEAD_NAME} recorded as the end (hash "
                f"{str(head['hash'])[:12]}); the end of the ledger was rewritten"]
    return []


def canonical(obj: Any) -> bytes:
    """The bytes an entry's hash is taken over: one fixed spelling of the same JSON value."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _jsonable(value: Any) -> Any:
    """Paths become strings and tuples lists, so an entry hashes the same before and after a JSON round trip."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON; a missing number is null
        return None
    return value


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """An O_APPEND descriptor holding an exclusive lock (advisory; every kfoundry writer takes it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # no flock on this platform: appends are still single writes
            pass
        yield fd
    finally:
        os.close(fd)  # closing releases the lock


def _complete_lines(path: Path) -> list[str]:
    """The ledger's lines; raises on a torn final line."""
    data = path.read_bytes() if path.is_file() else b""
    if not data:
        return []
    if not data.endswith(b"\n"):
        raise LedgerError(f"{path}: the last line is incomplete (a write was interrupted); run "
                          f"`kfoundry provenance verify {path.parent}` and repair the file before recording more")
    return data.decode("utf-8").splitlines()


def record(run_dir: str | Path, kind: str, **fields: Any) -> dict[str, Any]:
    """Append one entry to RUN_DIR/ledger.jsonl and return it (with its `hash`, which later entries point at).

    Refuses to append after a last line that does not parse or whose hash is wrong, or to a ledger shorter than
    its head file says: chaining onto a damaged or cut ledger would bless it.
    """
    if not kind or not isinstance(kind, str):
        raise LedgerError("a ledger entry needs a kind")
    clash = [k for k in fields if k in RESERVED]
    if clash:
        raise LedgerError(f"fields {clash} are reserved for the ledger itself")
    path = ledger_path(run_dir)
    with _locked(path) as fd:
        lines = _complete_lines(path)
        n = len(lines)
        prev = None
        if lines:
            try:
                tail = json.loads(lines[-1])
            except json.JSONDecodeError as e:
                raise LedgerError(f"{path} line {n}: not valid JSON ({e}); refusing to append") from None
            if not isinstance(tail, dict) or tail.get("hash") != entry_hash(tail):
                raise LedgerError(f"{path} line {n}: its content does not match its hash; refusing to append")
            prev = tail["hash"]
        # A ledger from before head files has none yet: it gets one below. One that is shorter than its head, or
        # ends differently, was cut or rewritten.
        cut = check_head(run_dir, lines) if read_head(run_dir) is not None else []
        if cut:
            raise LedgerError(f"{cut[0]}; refusing to append")
        entry: dict[str, Any] = {"seq": n, "kind": kind,
                                 "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                                 "prev": prev, **_jsonable(fields)}
        entry["hash"] = entry_hash(entry)
        os.write(fd, json.dumps(entry, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n")
        os.fsync(fd)
        # Still under the lock, so heads follow appends in order. A crash right here leaves the head one line
        # behind, which `check_head` accepts.
        atomic_write_json(head_path(run_dir), {"lines": n + 1, "hash": entry["hash"]})
    return entry


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every entry, in order. Lines that do not parse are skipped here (`check_chain` names them)."""
    path = ledger_path(run_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            obj = json.loads(line)
            if isinstance(obj, dict):
                out.append(obj)
    return out


def check_chain(run_dir: str | Path) -> list[str]:
    """Problems with the chain itself, first broken link first, then its end against `ledger.head.json`; an empty
    list means every link holds and nothing was cut off the end.

    Each message names the line (1-based, as an editor shows it) and what is wrong with it.
    """
    path = ledger_path(run_dir)
    if not path.is_file():
        return [f"{path}: no ledger"]
    problems: list[str] = []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        problems.append(f"{path}: the last line is incomplete (an interrupted write or a truncated file)")
    prev_hash = None
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            prev_hash = None
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where}: not a JSON object")
            prev_hash = None
            continue
        if entry.get("seq") != number - 1:
            problems.append(f"{where}: seq is {entry.get('seq')!r}, expected {number - 1} "
                            "(lines were removed or inserted before it)")
        if entry.get("hash") != entry_hash(entry):
            problems.append(f"{where}: its content does not match its hash (the line was edited)")
        if entry.get("prev") != prev_hash and not (number == 1 and entry.get("prev") is None):
            problems.append(f"{where}: 'prev' does not point at line {number - 1} "
                            "(a line before it was removed, inserted, reordered or edited)")
        prev_hash = entry.get("hash")
    complete = data.decode("utf-8", errors="replace").splitlines()
    if data and not data.endswith(b"\n"):
        complete = complete[:-1]  # a torn last line is reported above, and is not what the head counted
    return problems + check_head(run_dir, complete)


def lines_of(run_dir: str | Path) -> list[str]:
    """The ledger's lines as stored (for checks that point at a line by number)."""
    path = ledger_path(run_dir)
    return path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []


def head(run_dir: str | Path) -> str | None:
    """The hash of the last entry: publish it and the whole history before it is pinned."""
    entries = read(run_dir)
    return entries[-1].get("hash") if entries else None


def by_hash(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["hash"]: e for e in entries if isinstance(e.get("hash"), str)}
