"""`prepare`: run a curation recipe on a corpus SPEC into an output directory.

    from kfoundry.data.curate import prepare
    card = prepare("corpus.jsonl.gz", "out/data", recipe="ko-web", workers=2)
    card["totals"], card["identity"]["ok"], card["steps"]

The output directory (its layout is in docs/curation.md):

    prepare.json        the settings of this run (a re-run with other settings is refused, see below)
    ingest/ filtered/ unique/   intermediate JSONL shards (one per task)
    curated/            the curated documents, NNNNN.jsonl.gz: a corpus SPEC in its own right
    removed/<step>/     exclusion files: every removed document with `filter_reason`
    accounting/<step>/  per-task counts; data_card.json/.md and *.png: the data card
    curated.done.json   the completion marker: until it exists no corpus reader accepts this folder
    tokenizer/ shards/  token shards for training (unless shards=False); encode/ holds their parts meanwhile
    dedup/ decontam_index/ logs/<stage>/ (datatrove's logs, stats and completion markers)

Re-running on the same directory with the same settings resumes: finished stages and tasks are skipped
(datatrove's completion markers), unfinished ones run again; a finished run returns its card at once.
Different settings raise ValueError unless `overwrite=True`, because mixing the outputs of two recipes
would make the accounting meaningless.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kfoundry.corpus import iter_documents
from kfoundry.corpus.prepared import CURATED_DIR, DONE_FILE, SETTINGS_FILE
from kfoundry.data.curate.decontam import LM_EVAL_PREFIX, build_index, parse_lm_eval
from kfoundry.data.curate.finalize import Finalize, tokenizer_dir, write_done_marker
from kfoundry.data.curate.recipe import Recipe, load_recipe, resolve_set
from kfoundry.data.curate.stages import build_plan, check_executor, make_executors, run_local
from kfoundry.data.shard_tasks import shard_stages
from kfoundry.errors import ConfigError, MissingPathError
from kfoundry.fileio import atomic_write_json, read_json

SHARD_TOKENS = 1 << 24  # tokens per shard file, as `kfoundry data shard` writes by default
# Settings that may change between a run and its resumption without changing any result.
_RUN_ONLY = ("executor", "workers", "steps", "decontam_note")


def _backfill_marker(out: Path, shards: bool) -> None:
    """A run finished by a kfoundry that wrote no completion marker: its finalize stage completed and its card
    says the identity holds, so the marker it would have written is written now."""
    card_path = out / "data_card.json"
    if (out / DONE_FILE).is_file() or not card_path.is_file():
        return
    if not (out / "logs" / "finalize" / "completions" / "00000").is_file():
        return
    card = read_json(card_path)
    if card.get("identity", {}).get("ok"):
        docs = card["totals"]["docs_curated"]
        write_done_marker(out, docs, shards and docs > 0)


def _last_stage(shards: bool) -> str:
    return "shards" if shards else "finalize"


def _connect_ray(log: Callable[[str], None]) -> None:
    """Join the Ray cluster this shell points at (RAY_ADDRESS, or the one `ray start` made on this machine);
    with none running, Ray starts a local one for this process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
        log(f"[data prepare] ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs in the cluster")


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def _datatrove_output_to(path: Path, verbose: bool) -> Iterator[Callable[[str], None]]:
    """Send datatrove's (loguru, tqdm) console output to `path`; yield a logger that still reaches the user.

    datatrove re-adds a stderr sink for every task, so a level setting cannot quiet it; redirecting file
    descriptor 2 also catches its worker processes.
    """
    if verbose:
        yield _default_log
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    real = os.fdopen(os.dup(saved), "w", buffering=1, encoding="utf-8")
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield lambda msg: print(msg, file=real, flush=True)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        real.close()


def _decontam_sets(recipe: Recipe, decontam: list[str] | None) -> tuple[list[str], str]:
    """Sources to decontaminate against (folders and `lm-eval:` task lists), and a note for the card.

    Decontamination is never silently off: when the recipe's sets are missing this is an error, and only
    `decontam=[]` (`--no-decontam`) or a recipe with `decontaminate.enabled: false` turns it off.
    """
    if decontam is not None and not decontam:
        return [], "decontamination off (--no-decontam)"
    if decontam is None and not recipe.decontaminate.enabled:
        return [], "decontamination off in the recipe"
    entries = decontam if decontam is not None else [str(resolve_set(e)) if not e.startswith(LM_EVAL_PREFIX)
                                                     else e for e in recipe.decontaminate.sets]
    found = []
    for entry in entries:
        if entry.startswith(LM_EVAL_PREFIX):
            parse_lm_eval(entry)  # a malformed task list fails now
            found.append(entry)
            continue
        p = Path(entry).expanduser()
        if not p.is_dir():
            where = "--decontam folder" if decontam is not None else f"evaluation set of recipe {recipe.name!r}"
            raise MissingPathError(f"{where} not found: {p}; give --decontam DIR or --decontam lm-eval:TASKS, "
                                   "or --no-decontam to curate without decontamination")
        found.append(str(p.resolve()))
    return found, ""


def prepare(
    corpus: str,
    out: str | Path,
    *,
    recipe: str | Path | Recipe = "ko-web",
    executor: str = "local",
    workers: int = 1,
    tasks: int | None = None,
    decontam: list[str] | None = None,
    tokenizer: str | Path | None = None,
    shards: bool = True,
    vocab_size: int | None = None,
    seed: int = 0,
    executor_options: dict[str, Any] | None = None,
    overwrite: bool = False,
    verbose: bool = False,
    log: Callable[[str], None] = _default_log,
) -> dict[str, Any]:
    """Curate `corpus` into `out`; return the data card (with `stage_seconds` added for a local run).

    workers: processes at a time (local) or concurrent tasks (slurm/ray); tasks: how many pieces the corpus
    is cut into (default 2 x workers). decontam: folders of evaluation files and `lm-eval:TASKS[@DIR]`
    entries, replacing the recipe's sets ([] turns decontamination off; missing sets are an error). tokenizer: an existing tokenizer for the shards (default: train one).
    executor_options: extra keyword arguments for datatrove's executor (slurm needs partition and time).
    """
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_executor(executor, executor_options)
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    tasks = tasks if tasks is not None else 2 * workers
    if tasks < 1:
        raise ConfigError(f"--tasks must be at least 1, got {tasks}")
    if tokenizer is not None and not (Path(tokenizer) / "tokenizer.json").is_file():
        raise MissingPathError(f"tokenizer directory not found (no tokenizer.json): {tokenizer}")
    iter_documents(corpus)  # checks the SPEC now: a missing path fails here, not inside a worker
    out = Path(out).expanduser().resolve()
    sets, note = _decontam_sets(rec, decontam)
    settings: dict[str, Any] = {
        "format": "kfoundry.prepare", "version": 1, "corpus": corpus, "recipe": rec.to_dict(), "tasks": tasks,
        "executor": executor, "workers": workers, "decontam_sets": sets, "decontam_note": note,
        "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else None, "shards": shards,
        "vocab_size": vocab_size or rec.output.vocab_size, "val_fraction": rec.output.val_fraction, "seed": seed,
        "decontam_index": str(out / "decontam_index") if sets else None,
    }

    if (out / SETTINGS_FILE).is_file():
        old = read_json(out / SETTINGS_FILE)
        differ = sorted(k for k in {*old, *settings} - set(_RUN_ONLY) if old.get(k) != settings.get(k))
        same = not differ
        if not same and not overwrite:
            raise ConfigError(f"{out} holds a curation run with other settings ({', '.join(differ)}); choose "
                              "another --out or pass --overwrite")
        if not same:
            shutil.rmtree(out)
        else:
            _backfill_marker(out, shards)
        if same and (out / "data_card.json").is_file() and (out / "logs" / _last_stage(shards) / "completions" / "00000").is_file():
            log(f"[data prepare] {out} is already complete; nothing to do")
            return read_json(out / "data_card.json")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"{out} exists and is not a curation run; choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)

    if note:
        log(f"[data prepare] note: {note}")
    index_dir = Path(settings["decontam_index"]) if sets else None
    if index_dir is not None:
        report = build_index(sets, index_dir, n_grams=rec.decontaminate.n_grams,
                             min_item_words=rec.decontaminate.min_item_words)
        log(f"[data prepare] decontamination index: {report['items_indexed']:,} evaluation items from "
            f"{len(report['tasks'])} tasks")

    def build() -> tuple[Any, list[Any]]:
        finalize_step = Finalize(out, settings)
        plan = build_plan(corpus, out, rec, tasks, decontam_index=index_dir, finalize=finalize_step, seed=seed)
        if shards:  # tokenization on the same executor: N encode tasks, then one merge (shard_tasks.py)
            plan.stages += shard_stages(str(out / CURATED_DIR), tokenizer_dir(out, settings), out / "encode",
                                        out / "shards", tasks=tasks, val_fraction=settings["val_fraction"],
                                        seed=seed, shard_tokens=SHARD_TOKENS, overwrite=True,
                                        config={"command": "data prepare", "corpus": str(out / CURATED_DIR)},
                                        gate=out / DONE_FILE)
        settings["steps"] = plan.steps  # the same dict the finalize step holds
        atomic_write_json(out / SETTINGS_FILE, settings)
        return plan, make_executors(plan, executor, workers, executor_options)

    if executor != "local":
        if executor == "ray":
            _connect_ray(log)
        plan, executors = build()
        executors[-1].run()  # slurm submits the chain and returns; ray runs it
        if executor == "ray":  # datatrove's Ray executor logs a failed task and goes on; we do not
            for stage, ex in zip(plan.stages, executors):
                incomplete = ex.get_incomplete_ranks(range(stage.tasks))
                if incomplete:
                    raise RuntimeError(f"data prepare failed on ray: stage {stage.name}, tasks {incomplete} did not "
                                       f"complete; see {out / 'logs' / stage.name / 'logs'} and run again to resume")
        card_path = out / "data_card.json"
        if card_path.is_file():
            return read_json(card_path)
        log(f"[data prepare] submitted {len(executors)} stages with {executor}; the data card will be at {card_path}")
        return {"submitted": True, "out": str(out), "stages": [s.name for s in plan.stages]}

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    with _datatrove_output_to(out / "logs" / "datatrove.log", verbose) as say:
        def on_stage(name: str, secs: float) -> None:
            seconds[name] = secs
            say(f"[data prepare] {name:<10} {secs:7.1f} s")

        say(f"[data prepare] recipe {rec.name}: {corpus} -> {out} ({tasks} tasks, {workers} workers)")
        plan, executors = build()
        try:
            run_local(executors, [s.name for s in plan.stages], on_stage)
        except Exception as e:
            # the traceback is in the datatrove log; the user gets one line and where to look
            raise RuntimeError(f"data prepare failed: {e} (details: {out / 'logs'})") from e
    card = read_json(out / "data_card.json")
    card["stage_seconds"] = seconds
    card["wall_seconds"] = time.perf_counter() - start
    atomic_write_json(out / "run_summary.json", {"stage_seconds": seconds, "wall_seconds": card["wall_seconds"],
                                                 "workers": workers, "tasks": tasks})
    return card
