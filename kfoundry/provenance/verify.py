"""`kfoundry provenance verify RUN_OR_CKPT`: is the record intact, do the files still match it, and where did
this model come from?

Three checks, each naming the first thing that is wrong:

1. **The chain** of every ledger on the way (`ledger.check_chain`): an edited, removed, inserted or reordered line,
   and lines cut off the end (against `ledger.head.json`, and against the line each checkpoint carries in
   `ledger_entry.json`).
2. **The files** every entry points at: each shard of a `data` entry, each checkpoint (its manifest against the
   ledger, then every file against the manifest), each exported file. A file that is *present with another hash*
   is a failure. A file that is *gone* is reported but is not a failure: old checkpoints are pruned by design
   (`train.keep_last`), and the ledger still proves what they held. The checkpoint being verified must exist.
   Verifying a run directory also looks at everything *in* it: every ledger below it (the `sft/`, `dpo/`,
   `distill/` runs a speedrun or a user puts there), every checkpoint directory and every export (a Hugging Face
   directory, a `.gguf` file). One that no ledger records is a failure: nothing could show it was not swapped.
3. **The initialisation**, when it is small enough to redo (<= 50M parameters on CPU): the recorded config and
   seed are used to build the starting weights again and their hash is compared with the recorded one. That
   turns "trained from random initialisation" from a claim into something anyone can check.

Then the lineage is walked from the checkpoint back to its origin: random initialisation, external weights (an
import), or an unrecorded origin. Links recorded in a ledger are hash-checked; a parent known only from a
`meta.json` (a checkpoint written before the ledger existed) is shown as such.
"""

from __future__ import annotations

import os
import torch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfoundry import checkpoint as ckpt_io
from kfoundry.checkpoint import model_state, read_meta
from kfoundry.config import model_config_from_dict
from kfoundry.errors import MissingPathError
from kfoundry.fileio import sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.provenance import ledger
from kfoundry.provenance.record import (MANIFEST, MARK, find_checkpoint_entry, parent_paths, read_mark, resolve_in,
                                        run_dir_of, state_digest, weights_digest)

REDERIVE_MAX_PARAMS = 50_000_000
MAX_DEPTH = 10_000  # lineage steps; a cycle in hand-edited metadata must not hang the walk
STAGE_NAMES = {"pretrain": "continued pretraining (--init)", "upscale": "depth up-scaling", "sft": "SFT",
               "dpo": "DPO", "distill": "distillation", "merge": "merge", "import": "import"}


@dataclass
class Node:
    """One step of a lineage, from the checkpoint back to its origin."""

    kind: str  # checkpoint | init | derivation | external | unrecorded | origin-unknown
    label: str  # one line for people
    run_dir: str | None = None
    entry: str | None = None  # ledger entry hash, when recorded
    line: int | None = None  # 1-based ledger line
    info: dict[str, Any] = field(default_factory=dict)
    branches: list[list["Node"]] = field(default_factory=list)  # other parents of a merge

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "run_dir": self.run_dir, "entry": self.entry,
                "line": self.line, "info": self.info, "branches": [[n.to_dict() for n in b] for b in self.branches]}


@dataclass
class Report:
    target: str
    checkpoint: str | None
    problems: list[str] = field(default_factory=list)  # failures, first broken link first
    missing: list[str] = field(default_factory=list)  # files the ledger names that are gone (not a failure)
    notes: list[str] = field(default_factory=list)
    ledgers: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)  # checkpoints and exports found in a run directory, all checked
    lineage: list[Node] = field(default_factory=list)  # the checkpoint first, its origin last

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def origin(self) -> str | None:
        return origin_of(self.lineage)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "checkpoint": self.checkpoint, "ok": self.ok, "origin": self.origin,
                "problems": self.problems, "missing": self.missing, "notes": self.notes, "ledgers": self.ledgers,
                "checked": self.checked, "lineage": [n.to_dict() for n in self.lineage]}


def origin_of(nodes: list[Node]) -> str | None:
    """Where a lineage starts, over every branch of a merge: "external" if any branch reaches external weights,
    "init" if every branch reaches a recorded random initialisation, else "origin-unknown"."""
    if not nodes:
        return None
    ends: list[str] = []

    def walk(branch: list[Node]) -> None:
        ends.append(branch[-1].kind)
        for n in branch:
            for b in n.branches:
                walk(b)

    walk(nodes)
    if "external" in ends:
        return "external"
    return "init" if all(e == "init" for e in ends) else "origin-unknown"


# ------------------------------------------------------------------------------------------------- file checks


def _short(h: str | None) -> str:
    return h[:12] if isinstance(h, str) else "none"


def check_checkpoint_files(ckpt: Path, recorded: dict[str, Any] | None = None) -> list[str]:
    """Problems with a checkpoint directory: its manifest against the ledger entry, then files against the
    manifest. Each problem names the file."""
    problems = []
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return [f"{ckpt}: {MANIFEST} is missing"]
    where = f" (ledger line {recorded['seq'] + 1})" if recorded else ""
    if recorded is not None and sha256_file(manifest) != recorded.get("manifest_sha256"):
        weights = ckpt / "model.safetensors"
        if weights.is_file() and sha256_file(weights) != recorded.get("weights_sha256"):
            problems.append(f"{weights}: the weights differ from those recorded{where} "
                            f"(sha256 {_short(sha256_file(weights))} != {_short(recorded.get('weights_sha256'))})")
        elif weights_digest(ckpt) != recorded.get("weights_sha256"):
            problems.append(f"{ckpt}: the weights named by its manifest differ from those recorded{where}")
        problems.append(f"{manifest}: differs from the manifest recorded{where}")
    try:
        ckpt_io.verify(ckpt)
    except ckpt_io.CheckpointError as e:
        problems.append(str(e))
    return problems


def check_mark(ckpt: Path, *, recorded: bool = True) -> list[str]:
    """Problems with the ledger line a checkpoint carries (MARK): that line must still be in the ledger, unchanged.

    This is what sees a ledger cut back to before a checkpoint was recorded, even when the head file was
    rewritten to match the cut: the checkpoint, written elsewhere, still names its line. A checkpoint the ledger
    records must carry its mark; one it does not (`recorded=False`) is checked only if it carries one.
    """
    mark = read_mark(ckpt)
    if mark is None:
        return [] if not recorded else [
            f"{ckpt / MARK}: missing or unreadable (kfoundry writes it when it records a checkpoint, so that a "
            "ledger cut before that line is seen)"]
    path = (Path(ckpt) / mark["ledger"]).resolve()
    if path.name != ledger.LEDGER_NAME or not path.is_file():
        return [f"{ckpt}: recorded at line {mark['line']} of {path}, which does not exist (the checkpoint was copied "
                "or moved away from its run, or the ledger was deleted)"]
    lines = ledger.lines_of(path.parent)
    if mark["line"] > len(lines):
        return [f"{path}: {len(lines)} line(s), but {ckpt} was recorded at line {mark['line']}: lines were cut off "
                "the end"]
    if ledger.line_hash(lines[mark["line"] - 1]) != mark["hash"]:
        return [f"{path} line {mark['line']}: not the entry that recorded {ckpt} (hash {_short(mark['hash'])}); the "
                "ledger was rewritten"]
    return []


def _check_files(run_dir: Path, base: str, files: dict[str, str], entry: dict[str, Any], report: Report) -> None:
    for name, digest in files.items():
        path = resolve_in(run_dir, base) / name
        if not path.is_file():
            report.missing.append(f"{path} (ledger line {entry['seq'] + 1})")
        elif sha256_file(path) != digest:
            report.problems.append(f"{path}: changed since it was recorded (ledger line {entry['seq'] + 1}, "
                                   f"{entry['kind']}; sha256 {_short(sha256_file(path))} != {_short(digest)})")


def check_entry_files(run_dir: Path, entry: dict[str, Any], report: Report) -> None:
    kind = entry.get("kind")
    if kind == "data":
        shards = entry.get("shards") or {}
        _check_files(run_dir, shards.get("dir", "."), shards.get("files") or {}, entry, report)
    elif kind == "checkpoint" and isinstance(entry.get("path"), str):
        path = resolve_in(run_dir, entry["path"])
        if not path.is_dir():
            report.missing.append(f"{path} (ledger line {entry['seq'] + 1}; pruned or moved)")
            return
        latest = find_checkpoint_entry(run_dir, path)
        if latest is not None and latest.get("hash") != entry.get("hash"):
            return  # superseded: the directory was rewritten later (a resumed run) and the later entry is checked
        report.problems.extend(check_checkpoint_files(path, entry))
        report.problems.extend(check_mark(path))
    elif kind == "export" and isinstance(entry.get("out"), str):
        out = resolve_in(run_dir, entry["out"])
        files = entry.get("files") or {}
        if out.is_file():
            _check_files(run_dir, str(out.parent), files, entry, report)
        else:
            _check_files(run_dir, entry["out"], files, entry, report)
    elif kind == "evaluation" and entry.get("results_file") and entry.get("results_sha256"):
        _check_files(run_dir, ".", {entry["results_file"]: entry["results_sha256"]}, entry, report)


def rederive_init(entry: dict[str, Any]) -> tuple[bool | None, str]:
    """Rebuild the initial weights from the recorded config and seed; (matches?, note). None = not attempted."""
    device = entry.get("init_device", "cpu")
    if device != "cpu" and not (device == "cuda" and torch.cuda.is_available()):
        return None, f"initialised on {device}, which this machine does not have; not re-derived"
    try:
        cfg = model_config_from_dict(dict(entry["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        return False, f"the recorded model config does not load ({e})"
    with torch.device("meta"):
        n = Transformer(cfg).num_params()
    if n > REDERIVE_MAX_PARAMS:
        return None, f"{n:,} parameters; re-deriving the initialisation is left to `verify` on a bigger machine"
    model = Transformer.build(cfg, device=device, seed=entry.get("seed"))
    ok = state_digest(model_state(model)) == entry.get("init_weights_sha256")
    return ok, "re-derived from the recorded seed and config: " + ("the hash matches" if ok else "the hash DIFFERS")


def check_ledger(run_dir: Path, report: Report, *, rederive: bool = True) -> None:
    """Chain and files of one ledger, into `report`."""
    if str(run_dir) in report.ledgers:
        return
    report.ledgers.append(str(run_dir))
    report.problems.extend(ledger.check_chain(run_dir))
    for entry in ledger.read(run_dir):
        check_entry_files(run_dir, entry, report)
        if rederive and entry.get("kind") == "init":
            ok, note = rederive_init(entry)
            (report.notes if ok is not False else report.problems).append(
                f"{ledger.ledger_path(run_dir)} line {entry['seq'] + 1}: initialisation {note}")


# ------------------------------------------------------------------------------------------------- lineage


def _node_from_entry(run_dir: Path, e: dict[str, Any]) -> Node:
    kind = e.get("kind", "?")
    common = dict(run_dir=str(run_dir), entry=e.get("hash"), line=(e.get("seq") or 0) + 1)
    if kind == "init":
        return Node("init", f"random initialisation (seed {e.get('seed')}, weights "
                            f"{_short(e.get('init_weights_sha256'))}, config {_short(e.get('model_config_sha256'))})",
                    info={"seed": e.get("seed"), "init_weights_sha256": e.get("init_weights_sha256"),
                          "model_config": e.get("model_config"), "code_version": e.get("code_version")}, **common)
    if kind == "checkpoint":
        tokens = f", {e['tokens']:,} tokens" if isinstance(e.get("tokens"), int) else ""
        step = f" step {e['step']}" if e.get("step") is not None else ""
        shown = str(run_dir) if e.get("path") == "." else e.get("path")  # a stand-alone checkpoint is its own run
        return Node("checkpoint", f"{e.get('stage')} checkpoint {shown}{step}{tokens}, weights "
                                  f"{_short(e.get('weights_sha256'))}",
                    info={k: e.get(k) for k in ("stage", "path", "step", "tokens", "weights_sha256", "data")},
                    **common)
    parents = ", ".join(p.get("path", "?") for p in e.get("parents") or []) or "nothing recorded"
    what = STAGE_NAMES.get(e.get("stage"), e.get("stage"))
    label = (f"{what} from {parents}" if e.get("parents") else
             "import, marked derived_from_external" if e.get("derived_from_external") else
             f"{what} (no parent checkpoint)")
    return Node("derivation", label,
                info={"stage": e.get("stage"), "parents": e.get("parents"), "details": e.get("details"),
                      "derived_from_external": e.get("derived_from_external", False)}, **common)


def _external_node(source: dict[str, Any] | None) -> Node:
    source = source or {}
    name = source.get("name_or_path") or source.get("path") or "unnamed source"
    return Node("external", f"external weights: {name} (weights {_short(source.get('weights_sha256'))})",
                info=dict(source))


def _walk_meta(path: Path, seen: set[str], depth: int) -> list[Node]:
    """Lineage from meta.json alone: for checkpoints no ledger recorded (the links are not hash-checked)."""
    nodes: list[Node] = []
    while depth < MAX_DEPTH:
        key = str(path.resolve()) if path.exists() else str(path)
        if key in seen:
            nodes.append(Node("origin-unknown", f"{path}: the recorded parents form a cycle"))
            return nodes
        seen.add(key)
        depth += 1
        # A checkpoint that is in a ledger after all: continue the recorded walk from there.
        if path.is_dir() and (entry := find_checkpoint_entry(run_dir_of(path), path)) is not None:
            return nodes + _walk_entries(run_dir_of(path), entry, seen, depth)
        meta = read_meta(path) if path.is_dir() else {}
        if not path.is_dir():
            nodes.append(Node("origin-unknown", f"{path}: gone; its history cannot be followed further"))
            return nodes
        nodes.append(Node("unrecorded", f"{meta.get('stage', 'unknown')} checkpoint {path} (in no ledger; "
                                        f"parent from meta.json, not hash-checked)",
                          info={"path": str(path), "stage": meta.get("stage"),
                                "weights_sha256": weights_digest(path)}))
        if meta.get("derived_from_external") and meta.get("stage") == "import":
            nodes.append(_external_node(meta.get("external_source")))
            return nodes
        parents = parent_paths(meta)
        if not parents:
            if meta.get("derived_from_external"):
                nodes.append(_external_node(meta.get("external_source")))
            else:
                nodes.append(Node("origin-unknown", f"{path}: meta.json names no parent and no ledger records "
                                                    "its initialisation"))
            return nodes
        if len(parents) > 1:
            nodes[-1].branches = [_walk_meta(Path(p), set(seen), depth) for p in parents[1:]]
        path = Path(parents[0])
    return nodes


def _walk_entries(run_dir: Path, entry: dict[str, Any], seen: set[str], depth: int) -> list[Node]:
    """Follow recorded links from `entry` to the origin, crossing into parents' ledgers."""
    nodes: list[Node] = []
    index = ledger.by_hash(ledger.read(run_dir))
    while entry is not None and depth < MAX_DEPTH:
        depth += 1
        node = _node_from_entry(run_dir, entry)
        nodes.append(node)
        kind = entry.get("kind")
        if kind == "init":
            return nodes
        if kind == "checkpoint":
            parent = index.get(entry.get("parent"))
            if parent is None:
                nodes.append(Node("origin-unknown", f"ledger line {node.line}: its parent entry "
                                                    f"{_short(entry.get('parent'))} is not in {run_dir}"))
                return nodes
            entry = parent
            continue
        # a derivation: external weights end the walk; else continue into the (first) parent
        if entry.get("derived_from_external") and not entry.get("parents"):
            nodes.append(_external_node(entry.get("external_source")))
            return nodes
        refs = entry.get("parents") or []
        if not refs:
            nodes.append(Node("origin-unknown", entry.get("note") or "no parent recorded"))
            return nodes
        walks = [_walk_ref(ref, set(seen), depth) for ref in refs]
        node.branches = walks[1:]
        return nodes + walks[0]
    return nodes


def _walk_ref(ref: dict[str, Any], seen: set[str], depth: int) -> list[Node]:
    if ref.get("entry") and ref.get("run_dir"):
        rd = Path(ref["run_dir"])
        target = ledger.by_hash(ledger.read(rd)).get(ref["entry"])
        if target is not None:
            return _walk_entries(rd, target, seen, depth)
    return _walk_meta(Path(ref["path"]), seen, depth)


def lineage(ckpt: str | Path) -> list[Node]:
    """The chain of steps from checkpoint `ckpt` (first) back to its origin (last)."""
    ckpt = Path(ckpt).resolve()
    run_dir = run_dir_of(ckpt)
    manifest = ckpt / MANIFEST
    entry = find_checkpoint_entry(run_dir, ckpt, sha256_file(manifest) if manifest.is_file() else None) \
        or find_checkpoint_entry(run_dir, ckpt)
    if entry is None:
        return _walk_meta(ckpt, set(), 0)
    return _walk_entries(run_dir, entry, set(), 0)


def _ledgers_in(nodes: list[Node]) -> list[Path]:
    out: list[Path] = []
    for n in nodes:
        if n.run_dir and Path(n.run_dir) not in out:
            out.append(Path(n.run_dir))
        for b in n.branches:
            out += [p for p in _ledgers_in(b) if p not in out]
    return out


# ------------------------------------------------------------------------------------------------- verify


def _latest_checkpoint(run_dir: Path) -> Path | None:
    for e in reversed(ledger.read(run_dir)):
        if e.get("kind") == "checkpoint" and isinstance(e.get("path"), str):
            path = resolve_in(run_dir, e["path"])
            if path.is_dir():
                return path
    return None


def _is_checkpoint(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / MANIFEST).is_file()


def _is_hf_export(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file() and not (d / MANIFEST).is_file()


def artefacts_in(run_dir: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(ledger directories, checkpoint directories, exports) anywhere under RUN_DIR, in path order.

    Hidden entries are skipped: '.tmp-*' / '.old-*' are the halves of an atomic write, never artefacts.
    """
    ledgers, ckpts, exports = [], [], []
    for here, dirs, files in os.walk(run_dir):
        d = Path(here)
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        if ledger.LEDGER_NAME in files:
            ledgers.append(d)
        if d != run_dir and (_is_checkpoint(d) or _is_hf_export(d)):
            (ckpts if _is_checkpoint(d) else exports).append(d)
            dirs[:] = []  # a checkpoint's or export's own files are checked through its manifest or ledger entry
            continue
        exports += [d / f for f in sorted(files) if f.endswith(".gguf") and not f.startswith(".")]
    return ledgers, ckpts, exports


def _recorded_exports(report: Report) -> set[Path]:
    out = set()
    for rd in report.ledgers:
        for e in ledger.read(rd):
            if e.get("kind") == "export" and isinstance(e.get("out"), str):
                out.add(resolve_in(Path(rd), e["out"]).resolve())
    return out


def check_run_contents(run_dir: Path, report: Report, *, rederive: bool = True) -> None:
    """Every ledger, checkpoint and export under RUN_DIR: ledgers are checked like the run's own, and each
    checkpoint or export must be recorded in one (and then matches it, see `check_entry_files`)."""
    ledgers, ckpts, exports = artefacts_in(run_dir)
    for rd in ledgers:
        check_ledger(rd, report, rederive=rederive)
    for ckpt in ckpts:
        rd = run_dir_of(ckpt)
        if ledger.ledger_path(rd).is_file():
            check_ledger(rd, report, rederive=rederive)  # normally found above; not if the ledger is elsewhere
        if find_checkpoint_entry(rd, ckpt) is None:
            report.problems.append(f"{ckpt}: a checkpoint in the run that no ledger records (looked in "
                                   f"{ledger.ledger_path(rd)})")
            report.problems.extend(check_mark(ckpt, recorded=False))
        report.checked.append(str(ckpt))
    recorded = _recorded_exports(report)
    for out in exports:
        if out.resolve() not in recorded:
            report.problems.append(f"{out}: an export in the run that no ledger records, so its bytes cannot be "
                                   "checked")
        report.checked.append(str(out))


def verify(target: str | Path, *, rederive: bool = True) -> Report:
    """Verify a run directory (every ledger, checkpoint and export in it, and the lineage of its newest
    checkpoint) or one checkpoint (its ledger and lineage)."""
    target = Path(target)
    if not target.exists():
        raise MissingPathError(f"no such run or checkpoint: {target}")
    target = target.resolve()
    is_ckpt = (target / "config.json").is_file() and ((target / MANIFEST).is_file()
                                                      or (target / "model.safetensors").is_file())
    if not is_ckpt and not ledger.ledger_path(target).is_file():
        raise MissingPathError(f"{target} is neither a checkpoint directory nor a run directory with a "
                               f"{ledger.LEDGER_NAME}")
    ckpt = target if is_ckpt else _latest_checkpoint(target)
    report = Report(target=str(target), checkpoint=str(ckpt) if ckpt else None)
    if not is_ckpt:
        check_ledger(target, report, rederive=rederive)
        check_run_contents(target, report, rederive=rederive)
    if ckpt is None:
        report.notes.append("the ledger records no checkpoint that still exists; no lineage to show")
        return report
    rd = run_dir_of(ckpt)
    recorded = find_checkpoint_entry(rd, ckpt) if ledger.ledger_path(rd).is_file() else None
    if recorded is None and str(ckpt) not in report.checked:  # (a run's own checkpoints are judged above)
        report.problems.append(f"{ckpt}: not recorded in any ledger (looked in {ledger.ledger_path(rd)})")
        report.problems.extend(check_checkpoint_files(ckpt))
        report.problems.extend(check_mark(ckpt, recorded=False))
    report.lineage = lineage(ckpt)
    for run_dir in [rd] * (recorded is not None) + _ledgers_in(report.lineage):
        check_ledger(run_dir, report, rederive=rederive)
    if report.origin == "external":
        report.notes.append("this model descends from external weights; it is not a from-scratch model")
    return report


def format_lineage(nodes: list[Node], indent: str = "") -> list[str]:
    """Origin first, the checkpoint last, one line per step; a merge's other parents are indented under it."""
    lines: list[str] = []
    for i, node in enumerate(reversed(nodes)):
        mark = "" if i == 0 else "└─ "
        where = f"  [{Path(node.run_dir).name}/ledger.jsonl:{node.line}]" if node.run_dir and node.line else ""
        lines.append(f"{indent}{mark}{node.label}{where}")
        for b in node.branches:
            lines.append(f"{indent}   also from:")
            lines += format_lineage(b, indent + "     ")
    return lines


def format_report(report: Report) -> str:
    lines = [f"provenance of {report.checkpoint or report.target}", ""]
    if report.checked:
        lines.append(f"checked {len(report.checked)} checkpoint(s) and export(s) found in {report.target}")
    if report.ok:
        lines.append(f"OK: {len(report.ledgers)} ledger(s) intact; every recorded file present matches its hash")
    else:
        lines.append(f"BROKEN: {len(report.problems)} problem(s); first broken link:")
        lines += [f"  {p}" for p in report.problems]
    if report.missing:
        lines += ["", f"{len(report.missing)} recorded file(s) no longer present (pruned or moved; not a failure):"]
        lines += [f"  {m}" for m in report.missing[:20]] + (["  ..."] if len(report.missing) > 20 else [])
    if report.notes:
        lines += ["", *[f"note: {n}" for n in report.notes]]
    if report.lineage:
        lines += ["", "lineage (origin first):", *[f"  {x}" for x in format_lineage(report.lineage)]]
    return "\n".join(lines)
