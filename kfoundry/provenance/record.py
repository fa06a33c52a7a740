"""What the stages call to write the ledger: one line each, right where the artefact is made.

    record_init(run_dir, model, seed=...)         random initialisation: seed, config hash, code version, weights hash
    record_data(run_dir, shard_dir, corpus=...)   every shard's sha256, the sources with licences, the curation recipe
    record_checkpoint(ckpt_dir)                   weights hash, step, tokens, and the entry it descends from
    record_evaluation(ckpt_dir, payload)          what `kfoundry eval` measured, tied to the weights it measured
    record_export(ckpt_dir, out)                  the files an export wrote, tied to the checkpoint they came from

`record_checkpoint` reads the checkpoint's own `meta.json` (`stage`, `parent` / `parents`, and the
`derived_from_external` mark an import writes) and finds what the checkpoint descends from:

- the previous checkpoint of the same stage in the same run (largest step below this one: right after a resume too);
- else the run's root entry for that stage: `init` for pretraining from scratch, or a `derivation` entry naming
  the parent checkpoint(s) — up-scale, merge, SFT, DPO, distill, continued pretraining — or the external weights
  of an import. The derivation entry is written the first time it is needed.

Where a checkpoint's ledger lives: a checkpoint inside a run (`RUN/ckpt/step-N`) records into `RUN/ledger.jsonl`;
a stand-alone checkpoint directory (an up-scaled, merged or imported model) records into its own `ledger.jsonl`.
A derivation's parent is referenced by path, weights hash and, when the parent's ledger has it, by the hash of
the parent's ledger entry, so lineage can be followed from ledger to ledger.

Each recorded checkpoint also carries the line that recorded it, in `ledger_entry.json` (a file of the provenance
layer, written after the checkpoint is complete and therefore not in its manifest):

    {"ledger": "../../ledger.jsonl", "line": 4, "hash": "<that line's hash>"}

A hash chain cannot see lines cut off its end; the checkpoint can (`verify.check_mark`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import torch

import kfoundry
from kfoundry.checkpoint import model_state, read_meta
from kfoundry.checkpoint.dcp import clean_name
from kfoundry.config import to_dict
from kfoundry.corpus import describe_sources
from kfoundry.errors import MissingPathError
from kfoundry.fileio import atomic_write_json, read_json, sha256_bytes, sha256_file
from kfoundry.provenance import ledger

MANIFEST = "manifest.json"
MARK = "ledger_entry.json"  # in a checkpoint directory: the ledger line that recorded it
ROOT_KINDS = ("init", "derivation")
# meta.json keys that say *how* a checkpoint relates to its parents; everything else is kept as details.
_LINK_KEYS = ("stage", "parent", "parents", "final", "format", "derived_from_external", "external_source")


# ------------------------------------------------------------------------------------------------- identities


def run_dir_of(ckpt: str | Path) -> Path:
    """RUN for RUN/ckpt/step-N; the directory itself for a stand-alone checkpoint."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "ckpt" else ckpt


def rel(run_dir: Path, path: str | Path) -> str:
    """A path as the ledger stores it: relative (POSIX) inside the run, so a moved run still verifies."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path(run_dir).resolve()).as_posix() or "."
    except ValueError:
        return str(p)


def resolve_in(run_dir: str | Path, stored: str) -> Path:
    p = Path(stored)
    return p if p.is_absolute() else Path(run_dir) / p


def json_sha256(obj: Any) -> str:
    return sha256_bytes(ledger.canonical(obj))


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over a state dict: each tensor's name, dtype, shape and raw bytes, in name order.

    Independent of file format, so the initial weights can be hashed without writing them anywhere, and anyone
    can rebuild them from the seed and check (see verify.py).
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        if hasattr(t, "full_tensor"):  # a shard of a DTensor (FSDP2): gather the whole tensor (a collective)
            t = t.full_tensor()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def manifest_files(ckpt: str | Path) -> dict[str, str]:
    path = Path(ckpt) / MANIFEST
    return read_json(path)["files"] if path.is_file() else {}


def weights_digest(ckpt: str | Path) -> str | None:
    """The hash that names a checkpoint's weights: sha256 of model.safetensors, or, for a sharded (DCP)
    checkpoint, sha256 of the sorted "name sha256" lines of its dcp/ files (from the manifest)."""
    ckpt = Path(ckpt)
    files = manifest_files(ckpt)
    if "model.safetensors" in files:
        return files["model.safetensors"]
    dcp = {k: v for k, v in files.items() if k.startswith("dcp/")}
    if dcp:
        return sha256_bytes("".join(f"{k} {v}\n" for k, v in sorted(dcp.items())).encode())
    if (ckpt / "model.safetensors").is_file():
        return sha256_file(ckpt / "model.safetensors")
    return None


def code_version() -> dict[str, Any]:
    """kfoundry's version and, when it runs from a git checkout, the commit and whether the tree was modified."""
    out: dict[str, Any] = {"kfoundry": kfoundry.__version__, "git_commit": None, "git_dirty": None}
    here = Path(kfoundry.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        if commit.returncode == 0:
            out["git_commit"] = commit.stdout.strip()
            status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=30)
            out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or too slow: the version number still says a lot
        pass
    return out


# ------------------------------------------------------------------------------------------------- lookups


def find_checkpoint_entry(run_dir: str | Path, ckpt: str | Path, manifest_sha256: str | None = None
                          ) -> dict[str, Any] | None:
    """The latest `checkpoint` entry of RUN_DIR's ledger for this directory (matching the manifest hash when
    given), or None."""
    run_dir = Path(run_dir)
    target = Path(ckpt).resolve()
    for e in reversed(ledger.read(run_dir)):
        if e.get("kind") != "checkpoint" or not isinstance(e.get("path"), str):
            continue
        if resolve_in(run_dir, e["path"]).resolve() != target:
            continue
        if manifest_sha256 is None or e.get("manifest_sha256") == manifest_sha256:
            return e
    return None


def parent_paths(meta: dict[str, Any]) -> list[str]:
    """Parent checkpoint paths from meta.json: `parents` (a merge: dicts with "path") or `parent`."""
    parents = meta.get("parents")
    if isinstance(parents, list) and parents:
        return [str(p["path"] if isinstance(p, dict) else p) for p in parents]
    parent = meta.get("parent")
    return [str(parent)] if parent else []


def parent_ref(path: str | Path) -> dict[str, Any]:
    """How a derivation names a parent: its path, weights and manifest hashes, and its own ledger entry."""
    p = Path(path)
    ref: dict[str, Any] = {"path": str(p.resolve() if p.exists() else p)}
    manifest = p / MANIFEST
    ref["manifest_sha256"] = sha256_file(manifest) if manifest.is_file() else None
    ref["weights_sha256"] = weights_digest(p) if p.is_dir() else None
    rd = run_dir_of(p)
    entry = find_checkpoint_entry(rd, p, ref["manifest_sha256"]) if p.is_dir() else None
    ref["run_dir"] = str(rd) if entry else None
    ref["entry"] = entry["hash"] if entry else None
    if entry is None and p.is_dir():  # not in any ledger: keep what its meta.json says, marked as unverified

        meta = read_meta(p)
        ref["meta"] = {k: meta[k] for k in ("stage", "parent", "derived_from_external", "external_source")
                       if k in meta}
    return ref


def _find_root(entries: list[dict[str, Any]], stage: str, sources: list[str]) -> dict[str, Any] | None:
    for e in reversed(entries):
        if e.get("kind") in ROOT_KINDS and e.get("stage") == stage and e.get("from") == sources:
            return e
    return None


def _predecessor(entries: list[dict[str, Any]], stage: str, sources: list[str], step: int | None
                 ) -> dict[str, Any] | None:
    """The newest checkpoint of this (stage, parents) line with a smaller step, back to the line's root."""
    for e in reversed(entries):
        if e.get("stage") != stage or e.get("from") != sources:
            continue
        if e.get("kind") in ROOT_KINDS:
            return e
        if e.get("kind") == "checkpoint" and step is not None and isinstance(e.get("step"), int) and e["step"] < step:
            return e
    return None


def _latest(entries: list[dict[str, Any]], kind: str) -> dict[str, Any] | None:
    return next((e for e in reversed(entries) if e.get("kind") == kind), None)


# ------------------------------------------------------------------------------------------------- writers


def model_digest(model) -> str:
    """`state_digest` of a model's weights under their plain names (without compile/checkpointing wrappers).
    For a sharded model every rank must call it: each parameter is gathered whole in turn, one at a time."""
    return state_digest({clean_name(k): v for k, v in model_state(model).items()})


def record_init(run_dir: str | Path, model, *, seed: int, stage: str = "pretrain", weights_sha256: str | None = None,
                **extra: Any) -> dict[str, Any]:
    """Random initialisation: what anyone needs to rebuild the very same starting weights and check them.
    `weights_sha256` is `model_digest(model)`, computed by every rank when the model is sharded."""
    cfg = to_dict(model.cfg)
    device = next(model.parameters()).device
    digest = weights_sha256 or model_digest(model)
    return ledger.record(run_dir, "init", stage=stage, **{"from": []}, seed=seed, model_config=cfg,
                         model_config_sha256=json_sha256(cfg), init_device=device.type, code_version=code_version(),
                         init_weights_sha256=digest, **extra)


def _curation(shard_dir: Path, corpus: str | None) -> tuple[dict[str, Any] | None, Path | None]:
    """The data card `kfoundry data prepare` wrote, when these shards (or this corpus) came out of it."""
    candidates = [shard_dir.parent / "data_card.json"]
    if corpus and "," not in corpus:
        p = Path(corpus.split("#")[0])
        candidates += [p / "data_card.json", p.parent / "data_card.json"]
    for card_path in candidates:
        if card_path.is_file():
            card = read_json(card_path)
            return {"data_card": str(card_path.resolve()), "data_card_sha256": sha256_file(card_path),
                    "recipe": card.get("recipe"), "corpus": card.get("corpus"),
                    "totals": card.get("totals")}, card_path
    return None, None


def _data_entry(run_dir: Path, shard_dir: Path, meta_sha: str) -> dict[str, Any] | None:
    """The newest `data` entry of RUN_DIR's ledger for this shard directory as it is now (same meta.json)."""
    for e in reversed(ledger.read(run_dir)):
        shards = e.get("shards") or {}
        if e.get("kind") == "data" and shards.get("meta_sha256") == meta_sha and isinstance(shards.get("dir"), str) \
                and resolve_in(run_dir, shards["dir"]).resolve() == shard_dir.resolve():
            return e
    return None


def record_data(run_dir: str | Path, shard_dir: str | Path, *, corpus: str | None = None,
                tokenizer_dir: str | Path | None = None) -> dict[str, Any]:
    """The data a run trains on: the sha256 of every file of the shard directory, the tokenizer, the sources
    with their licences, and the curation recipe when the data went through `kfoundry data prepare`.

    Idempotent: when the ledger already records these shards (same meta.json), that entry is returned, so a
    resumed run does not hash gigabytes again.
    """
    run_dir, shard_dir = Path(run_dir), Path(shard_dir)
    meta_path = shard_dir / "meta.json"
    if not meta_path.is_file():
        raise MissingPathError(f"not a shard directory (no meta.json): {shard_dir}")
    meta_sha = sha256_file(meta_path)
    stored_dir = rel(run_dir, shard_dir)
    existing = _data_entry(run_dir, shard_dir, meta_sha)
    if existing is not None:
        return existing
    meta = read_json(meta_path)
    if corpus is None and (shard_dir / "run_config.json").is_file():
        corpus = read_json(shard_dir / "run_config.json").get("corpus")
    curation, card_path = _curation(shard_dir, corpus)
    made_here = _data_entry(shard_dir.parent, shard_dir, meta_sha) if shard_dir.parent.resolve() != run_dir.resolve() \
        else None
    if made_here is not None and corpus is None:  # shards made in another run dir: take its record of sources
        corpus, curation = made_here.get("corpus"), curation or made_here.get("curation")
        sources = made_here.get("sources")
    elif card_path is not None:
        sources = read_json(card_path).get("sources")  # the raw sources, before curation
    elif corpus:
        try:
            sources = describe_sources(corpus)
        except Exception as e:  # a moved file or an offline hub source: say so, do not lose the run
            sources = [{"source": corpus, "licence": None, "note": f"could not describe: {e}"}]
    else:
        sources = None
    files = {p.name: sha256_file(p) for p in sorted(shard_dir.iterdir()) if p.is_file()}
    tokenizer = None
    if tokenizer_dir is not None and (Path(tokenizer_dir) / "tokenizer.json").is_file():
        tokenizer = {"dir": rel(run_dir, tokenizer_dir),
                     "tokenizer_json_sha256": sha256_file(Path(tokenizer_dir) / "tokenizer.json")}
    return ledger.record(run_dir, "data", corpus=corpus, sources=sources, curation=curation,
                         shards={"dir": stored_dir, "meta_sha256": meta_sha, "files": files,
                                 "tokens": meta.get("tokens"), "docs": meta.get("docs"),
                                 "tokenizer_hash": meta.get("tokenizer_hash")},
                         tokenizer=tokenizer)


def record_checkpoint(ckpt: str | Path, *, run_dir: str | Path | None = None, **extra: Any) -> dict[str, Any]:
    """Record a checkpoint that was just written (call it right after `save_checkpoint`); returns its entry.

    Idempotent for an unchanged checkpoint: recording the same directory with the same manifest twice returns
    the first entry.
    """
    ckpt = Path(ckpt).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else run_dir_of(ckpt)
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        raise MissingPathError(f"{ckpt} has no {MANIFEST}; record a checkpoint only after it is completely written")
    manifest_sha = sha256_file(manifest)
    same = find_checkpoint_entry(run_dir, ckpt, manifest_sha)
    if same is not None:
        write_mark(ckpt, run_dir, same)
        return same
    meta = read_meta(ckpt)
    state = read_json(ckpt / "trainer_state.json") if (ckpt / "trainer_state.json").is_file() else {}
    stage = str(meta.get("stage") or "unknown")
    sources = [str(Path(p).resolve()) if Path(p).exists() else p for p in parent_paths(meta)]
    step = state.get("step")
    entries = ledger.read(run_dir)
    pred = _predecessor(entries, stage, sources, step if isinstance(step, int) else None)
    if pred is None:
        pred = record_derivation(run_dir, stage, sources, meta=meta)
    data = _latest(entries, "data")
    entry = ledger.record(run_dir, "checkpoint", stage=stage, **{"from": sources}, path=rel(run_dir, ckpt),
                          step=step, tokens=state.get("tokens_seen"), weights_sha256=weights_digest(ckpt),
                          manifest_sha256=manifest_sha, parent=pred["hash"],
                          data=data["hash"] if data else None, **extra)
    write_mark(ckpt, run_dir, entry)
    return entry


def write_mark(ckpt: Path, run_dir: Path, entry: dict[str, Any]) -> None:
    """Write MARK into the checkpoint: which ledger line recorded it (the ledger's path relative to the
    checkpoint, so a moved run still checks)."""
    mark = {"ledger": Path(os.path.relpath(ledger.ledger_path(run_dir), ckpt)).as_posix(),
            "line": entry["seq"] + 1, "hash": entry["hash"]}
    path = Path(ckpt) / MARK
    if not path.is_file() or read_mark(ckpt) != mark:
        atomic_write_json(path, mark)


def read_mark(ckpt: str | Path) -> dict[str, Any] | None:
    """The checkpoint's MARK, or None when it has none (or it does not hold a ledger, a line and a hash)."""
    try:
        mark = read_json(Path(ckpt) / MARK)
    except (OSError, ValueError):
        return None
    ok = isinstance(mark, dict) and isinstance(mark.get("ledger"), str) and isinstance(mark.get("line"), int) \
        and isinstance(mark.get("hash"), str)
    return mark if ok else None


def record_derivation(run_dir: str | Path, stage: str, sources: list[str], *, meta: dict[str, Any] | None = None,
                      **extra: Any) -> dict[str, Any]:
    """The root of a derived line: which checkpoints (or which external weights) a new model starts from."""
    meta = meta or {}
    external = meta.get("external_source") if meta.get("derived_from_external") else None
    details = {k: v for k, v in meta.items() if k not in _LINK_KEYS}
    fields: dict[str, Any] = {"stage": stage, "from": sources, "parents": [parent_ref(p) for p in sources],
                              "details": details or None, "code_version": code_version()}
    if meta.get("derived_from_external"):
        fields["derived_from_external"] = True
        fields["external_source"] = external
    elif not sources and stage != "import":
        fields["note"] = ("no parent and no recorded initialisation: this line's origin is unknown (the run "
                          "started before it kept a ledger, or its init entry is in another ledger)")
    return ledger.record(run_dir, "derivation", **fields, **extra)


def _is_recorded_run(ckpt: Path, run_dir: Path) -> bool:
    """Evaluations and exports are added to an existing ledger only: looking at a model that no ledger knows
    (a Hugging Face directory, a checkpoint from before the ledger) must not write files into it."""
    return (ckpt / MANIFEST).is_file() and ledger.ledger_path(run_dir).is_file()


def record_evaluation(ckpt: str | Path, payload: dict[str, Any] | str | Path, *,
                      run_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Record an evaluation of a kfoundry checkpoint (`payload` = what `run_eval` returned, or its eval.json).

    Returns None, recording nothing, when `ckpt` is not a kfoundry checkpoint of a run that keeps a ledger.
    """
    ckpt = Path(ckpt).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else run_dir_of(ckpt)
    if not _is_recorded_run(ckpt, run_dir):
        return None
    results_file = None
    if not isinstance(payload, dict):
        results_file = Path(payload)
        payload = read_json(results_file)
    elif payload.get("files", {}).get("json"):
        results_file = Path(payload["files"]["json"])
    entry = find_checkpoint_entry(run_dir, ckpt)
    tasks = [{k: row.get(k) for k in ("task", "metric", "score", "stderr", "percent_of_frontier")}
             for row in payload.get("tasks", [])]
    bpb = {lang: (b.get("bpb") if isinstance(b, dict) else b) for lang, b in (payload.get("bpb") or {}).items()}
    return ledger.record(run_dir, "evaluation", checkpoint=rel(run_dir, ckpt), weights_sha256=weights_digest(ckpt),
                         checkpoint_entry=entry["hash"] if entry else None,
                         results_file=rel(run_dir, results_file) if results_file else None,
                         results_sha256=sha256_file(results_file) if results_file and results_file.is_file()
                         else None,
                         protocol=payload.get("protocol"), tasks=tasks, bpb=bpb or None,
                         summary=payload.get("summary"), frontier_table=payload.get("frontier_table"))


def record_export(ckpt: str | Path, out: str | Path, *, fmt: str, run_dir: str | Path | None = None
                  ) -> dict[str, Any] | None:
    """Record what an export wrote (every file's sha256), tied to the checkpoint's weights (None, recording
    nothing, when the checkpoint's run keeps no ledger)."""
    ckpt, out = Path(ckpt).resolve(), Path(out).resolve()
    run_dir = Path(run_dir).resolve() if run_dir is not None else run_dir_of(ckpt)
    if not _is_recorded_run(ckpt, run_dir):
        return None
    files = ({p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
             if out.is_dir() else {out.name: sha256_file(out)})
    entry = find_checkpoint_entry(run_dir, ckpt)
    return ledger.record(run_dir, "export", format=fmt, checkpoint=rel(run_dir, ckpt),
                         weights_sha256=weights_digest(ckpt), checkpoint_entry=entry["hash"] if entry else None,
                         out=rel(run_dir, out), files=files)
