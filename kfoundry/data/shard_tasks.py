"""Token shards as datatrove tasks: N encode tasks in parallel, then one merge task, on any executor.

    from kfoundry.data.shard_tasks import shard_corpus
    meta = shard_corpus("corpus/", "tok/", "shards/", tasks=8, workers=2)              # local processes
    shard_corpus(..., executor="slurm", executor_options={"partition": "cpu", "time": "02:00:00"})
    shard_corpus(..., executor="ray")                                                   # a running Ray cluster

The same two stages are the tail of `kfoundry data prepare` (kfoundry.data.curate.prepare), so curation and
tokenization run on the same executor.

    encode   N tasks   EncodeShards: each task encodes its units into part files        -> WORK/parts/
    shards   1 task    MergeShards: the units in corpus order into the shard directory   -> OUT/

How the corpus is cut into units (decided inside the tasks, from the corpus itself, so every task and the
merge agree without talking to each other):

- **files**: a one-path SPEC (a folder, e.g. a prepare run's `curated/`) with at least N files. Each file is
  one unit; files go to tasks by size (largest first, each to the least-loaded task), so a task reads only
  its own files.
- **stream**: anything else (one big file, a mix, the starter, a hub dataset). The document stream is cut
  into blocks of `block_docs` documents and task t encodes blocks t, t+N, t+2N, ... Every task reads the
  whole stream (a .jsonl.gz cannot be split without decompressing it) but encodes only its blocks; the
  reading is the part that does not scale, so give a folder of files for large corpora.

Either way the merge writes documents in corpus order and the split of each document depends only on its
id, so the shard files are identical whatever the task count (tests/test_shards.py checks this byte for
byte). Memory per task is one encode batch; the merge copies memory-mapped slices.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from kfoundry.corpus import CorpusStats, file_specs, iter_documents
from kfoundry.data.shards import (STREAM_FILE, check_settings, encode_unit, finished_units, merge_parts, tokenizer_info,
                                  unit_key)
from kfoundry.errors import ConfigError
from kfoundry.fileio import atomic_write_json, read_json
from kfoundry.tokenizer import KTokenizer

BLOCK_DOCS = 4096  # documents per unit in stream mode: small enough to spread, large enough to batch well
WORK_SETTINGS = "shard_settings.json"


def gated_off(gate: str | None) -> bool:
    """True when `gate` names a JSON file whose "shards" is false: `data prepare` decided in its finalize
    stage (curated.done.json) that there is nothing to shard, after the stages were already planned."""
    return gate is not None and not read_json(gate).get("shards", True)


def plan_files(spec: str, world_size: int) -> list[tuple[str, int]] | None:
    """The SPEC's files when it is cut by file (see the module docstring), else None (stream mode)."""
    files = file_specs(spec)
    return files if files is not None and len(files) >= world_size else None


def assign_files(files: list[tuple[str, int]], world_size: int) -> list[list[int]]:
    """File numbers per task: largest first, each to the task with the fewest bytes so far (ties: lowest)."""
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for no in sorted(range(len(files)), key=lambda i: (-files[i][1], i)):
        t = min(range(world_size), key=lambda r: (load[r], r))
        owned[t].append(no)
        load[t] += files[no][1]
    return [sorted(o) for o in owned]


class EncodeShards(PipelineStep):
    """Encode this task's units of a corpus SPEC into `parts_dir` (units already finished are skipped)."""

    type = "🔢 - TOKENIZE"
    name = "🔢 encode shards"

    def __init__(self, spec: str, tokenizer_dir: str | Path, parts_dir: str | Path, *, val_fraction: float,
                 seed: int = 0, max_chars_per_doc: int | None = None, block_docs: int = BLOCK_DOCS,
                 gate: str | Path | None = None):
        super().__init__()
        self.gate = str(gate) if gate else None
        self.spec, self.tokenizer_dir, self.parts_dir = spec, str(tokenizer_dir), str(parts_dir)
        self.val_fraction, self.seed, self.max_chars, self.block_docs = val_fraction, seed, max_chars_per_doc, block_docs

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if gated_off(self.gate):
            return
        tok = KTokenizer.load(self.tokenizer_dir)
        parts = Path(self.parts_dir)
        parts.mkdir(parents=True, exist_ok=True)
        done = set(finished_units(parts))
        kw = dict(val_fraction=self.val_fraction, seed=self.seed)
        files = plan_files(self.spec, world_size)
        if files is not None:
            for no in assign_files(files, world_size)[rank]:
                key = unit_key(no, 0)
                if key in done:
                    continue
                stats = CorpusStats()
                docs = iter_documents(files[no][0], stats, max_chars_per_doc=self.max_chars, seed=self.seed)
                info = encode_unit(docs, tok, parts, key, stats=stats, **kw)
                self.stat_update("documents", value=info["docs_seen"])
            return
        stats = CorpusStats()
        docs = iter_documents(self.spec, stats, max_chars_per_doc=self.max_chars, seed=self.seed)
        blocks = 0
        for b, group in itertools.groupby(enumerate(docs), key=lambda pair: pair[0] // self.block_docs):
            blocks = b + 1
            block = (d for _, d in group)
            if b % world_size != rank or unit_key(0, b) in done:
                for _ in block:  # another task's block (or finished): read past it
                    pass
                continue
            info = encode_unit(block, tok, parts, unit_key(0, b), **kw)
            self.stat_update("documents", value=info["docs_seen"])
        if rank == 0:  # every task read the whole stream; one of them records what it held
            atomic_write_json(parts / STREAM_FILE, {"blocks": blocks, "corpus_stats": stats.to_dict()})


def expected_units(spec: str, parts_dir: str | Path, world_size: int) -> list[str]:
    """Every unit the encode stage must have finished, in corpus order."""
    files = plan_files(spec, world_size)
    if files is not None:
        return [unit_key(no, 0) for no in range(len(files))]
    stream = Path(parts_dir) / STREAM_FILE
    if not stream.is_file():
        raise RuntimeError(f"{stream} is missing: encode task 0 did not finish; re-run the command")
    return [unit_key(0, b) for b in range(read_json(stream)["blocks"])]


class MergeShards(PipelineStep):
    """Merge the encoded units into the shard directory (one task); then the part files are removed."""

    type = "🔢 - TOKENIZE"
    name = "🔢 merge shards"

    def __init__(self, spec: str, tokenizer_dir: str | Path, parts_dir: str | Path, out_dir: str | Path, *,
                 encode_tasks: int, val_fraction: float, seed: int = 0, shard_tokens: int = 1 << 24,
                 config: dict[str, Any] | None = None, overwrite: bool = False, gate: str | Path | None = None):
        super().__init__()
        self.gate = str(gate) if gate else None
        self.spec, self.tokenizer_dir, self.parts_dir, self.out_dir = spec, str(tokenizer_dir), str(parts_dir), str(out_dir)
        self.encode_tasks, self.val_fraction, self.seed, self.shard_tokens = encode_tasks, val_fraction, seed, shard_tokens
        self.config, self.overwrite = config, overwrite

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        if gated_off(self.gate):
            return
        tok = KTokenizer.load(self.tokenizer_dir)
        units = expected_units(self.spec, self.parts_dir, self.encode_tasks)
        whole = CorpusStats()
        iter_documents(self.spec, whole)  # opening the SPEC (reading nothing) gives its notes: files skipped
        meta = merge_parts(self.parts_dir, self.out_dir, tokenizer_info(tok), val_fraction=self.val_fraction,
                           seed=self.seed, shard_tokens=self.shard_tokens, config=self.config,
                           overwrite=self.overwrite, expect_units=units, notes=whole.notes)
        self.stat_update("documents", value=meta["docs"])
        shutil.rmtree(self.parts_dir, ignore_errors=True)


def shard_stages(spec: str, tokenizer_dir: str | Path, work_dir: Path, out_dir: str | Path, *, tasks: int,
                 val_fraction: float, seed: int, shard_tokens: int, max_chars_per_doc: int | None = None,
                 block_docs: int = BLOCK_DOCS, config: dict[str, Any] | None = None, overwrite: bool = False,
                 gate: str | Path | None = None):
    """The `encode` and `shards` stages (kfoundry.data.curate.stages.Stage) for a plan; with `gate`, they do
    nothing when that JSON file says `"shards": false`."""
    # Imported here, not at the top: the kfoundry.data.curate package imports its `prepare`, which imports this
    # module, so a top-level import of curate.stages from here would be a cycle at import time.
    from kfoundry.data.curate.stages import Stage

    parts = work_dir / "parts"
    encode = EncodeShards(spec, tokenizer_dir, parts, val_fraction=val_fraction, seed=seed,
                          max_chars_per_doc=max_chars_per_doc, block_docs=block_docs, gate=gate)
    merge = MergeShards(spec, tokenizer_dir, parts, out_dir, encode_tasks=tasks, val_fraction=val_fraction,
                        seed=seed, shard_tokens=shard_tokens, config=config, overwrite=overwrite, gate=gate)
    return [Stage("encode", tasks, [encode]), Stage("shards", 1, [merge])]


def shard_corpus(spec: str, tokenizer_dir: str | Path, out_dir: str | Path, *, tasks: int = 1, workers: int = 1,
                 executor: str = "local", executor_options: dict[str, Any] | None = None,
                 val_fraction: float = 0.05, seed: int = 0, shard_tokens: int = 1 << 24,
                 max_chars_per_doc: int | None = None, block_docs: int = BLOCK_DOCS,
                 config: dict[str, Any] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Shard a corpus SPEC with `tasks` encode tasks (`workers` at a time); return `meta.json` (local/ray)
    or a `{"submitted": ...}` note (slurm, which returns once the jobs are queued).

    Work files and datatrove logs live in `OUT.work/` beside the output; a killed run resumes from the units
    it finished when run again with the same settings, and the folder is removed after a local success.
    """
    from kfoundry.data.curate.stages import Plan, check_executor, make_executors, run_local  # see shard_stages

    check_executor(executor, executor_options)
    if tasks < 1 or workers < 1:
        raise ConfigError(f"--tasks and --workers must be at least 1, got {tasks} and {workers}")
    if block_docs < 1:
        raise ConfigError(f"block_docs must be positive, got {block_docs}")
    check_settings(val_fraction, shard_tokens, KTokenizer.load(tokenizer_dir))
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose another --out or pass --overwrite")
    work = out.with_name(out.name + ".work")
    settings = {"spec": spec, "tokenizer": str(Path(tokenizer_dir).resolve()), "tasks": tasks, "seed": seed,
                "val_fraction": val_fraction, "shard_tokens": shard_tokens, "max_chars_per_doc": max_chars_per_doc,
                "block_docs": block_docs}
    if work.exists() and (not (work / WORK_SETTINGS).is_file() or read_json(work / WORK_SETTINGS) != settings):
        shutil.rmtree(work)  # the leftovers of a run with other settings: nothing in them can be reused
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(work / WORK_SETTINGS, settings)
    stages = shard_stages(spec, tokenizer_dir, work, out, tasks=tasks, val_fraction=val_fraction, seed=seed,
                          shard_tokens=shard_tokens, max_chars_per_doc=max_chars_per_doc, block_docs=block_docs,
                          config=config, overwrite=overwrite)
    plan = Plan(out=work, stages=stages, steps=[])
    executors = make_executors(plan, executor, workers, executor_options)
    if executor == "local":
        run_local(executors, [s.name for s in stages], lambda name, secs: None)
    else:
        executors[-1].run()  # slurm queues the chain and returns; ray runs it
    if (out / "meta.json").is_file() and not (work / "parts").exists():
        meta = read_json(out / "meta.json")
        shutil.rmtree(work, ignore_errors=True)
        return meta
    return {"submitted": True, "out": str(out), "work": str(work), "executor": executor}
