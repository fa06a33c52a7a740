"""`run_eval`: one evaluation, end to end, for `kfoundry eval` (and the speedrun's eval stage).

    model dir ──> backend (kfoundry checkpoint: our adapter; Hugging Face dir: lm-eval's `hf` model)
              ──> tasks (lm-eval names; the offline KoBEST pack when --task-dir is given)
              ──> lm_eval.simple_evaluate (log-likelihood / generation, metrics, standard errors)
              ──> bits per byte per language (held-out text)
              ──> contamination (n-gram overlap with the run's training shards)
              ──> eval.json / eval.md / eval.html / eval.png with the frontier gap

Hub tasks (`kmmlu`, `haerae`, `click`, ...) need the network the first time (then the datasets cache);
offline they fail with lm-eval's own error, which is reported as one line.
"""

from __future__ import annotations

import importlib.resources
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kfoundry.checkpoint import load_tokenizer
from kfoundry.errors import CheckpointError, ConfigError, MissingPathError
from kfoundry.eval import bpb, contamination, frontier, report
from kfoundry.fileio import read_json
from kfoundry.model.device import pick_device
from kfoundry.provenance import record_evaluation

PACK_NAME_RE = re.compile(r"^(?:task|group):\s*(\S+)\s*$", re.M)


@dataclass
class EvalSpec:
    """What to evaluate and how. Paths are plain strings so the spec can be written into eval.json as is."""

    model: str
    tasks: list[str]
    out: str
    num_fewshot: int | None = None
    limit: float | None = None
    task_dir: str | None = None
    backend: str = "auto"  # auto | kfoundry | hf
    device: str = "auto"
    batch_size: int = 64
    apply_chat_template: bool = False
    bpb: list[str] = field(default_factory=list)  # LANG=PATH; empty = FLORES-200 dev when available
    bpb_limit: int | None = 200
    skip_bpb: bool = False
    shards: str | None = None
    contamination_n: int = 13
    skip_contamination: bool = False
    frontier: str | None = None
    seed: int = 1234


def pack_dir() -> Path:
    return Path(str(importlib.resources.files("kfoundry.eval").joinpath("tasks")))


def pack_names() -> set[str]:
    """Task and group names the offline pack defines (read from its YAML files)."""
    names: set[str] = set()
    for path in pack_dir().rglob("*.yaml"):
        names.update(PACK_NAME_RE.findall(path.read_text(encoding="utf-8")))
    return names


def detect_backend(path: str | Path) -> str:
    """'kfoundry' for a kfoundry checkpoint directory, 'hf' for a Hugging Face model directory."""
    path = Path(path)
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MissingPathError(f"not a model directory (no config.json): {path}")
    data = read_json(cfg)
    if "format_version" in data and (path / "model.safetensors").is_file() and (path / "tokenizer").is_dir():
        return "kfoundry"
    if "model_type" in data:
        return "hf"
    raise CheckpointError(f"{path}: config.json is neither a kfoundry checkpoint nor a Hugging Face model")


def build_lm(spec: EvalSpec, backend: str):
    if backend == "kfoundry":
        from kfoundry.eval.lm import KFoundryLM

        return KFoundryLM(model=spec.model, device=spec.device, batch_size=spec.batch_size)
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=spec.model, device=str(pick_device(spec.device)), dtype="float32",
                batch_size=spec.batch_size)


def task_manager(spec: EvalSpec):
    """lm-eval's TaskManager. With --task-dir the offline pack is added (its tasks shadow the hub's of the same
    name), and lm-eval's thousands of built-in task files are not even indexed when the pack has every task."""
    from lm_eval.tasks import TaskManager

    if not spec.task_dir:
        return TaskManager()
    task_dir = Path(spec.task_dir)
    if not task_dir.is_dir():
        raise MissingPathError(f"--task-dir not found: {task_dir}")
    only_pack = set(spec.tasks) <= pack_names()
    # The pack shadowing lm-eval's hub KoBEST tasks is the point of --task-dir; don't warn about it per task.
    logging.getLogger("lm_eval.tasks._index").setLevel(logging.ERROR)
    return TaskManager(include_path=str(pack_dir()), include_defaults=not only_pack,
                       metadata={"task_dir": str(task_dir.resolve())})


def _kfoundry_tokenizer(spec: EvalSpec, lm, backend: str):
    """The run's KTokenizer (contamination needs token ids comparable with the shards)."""
    if backend == "kfoundry":
        return lm.tok
    source = Path(spec.model) / "kfoundry_source.json"
    if source.is_file():
        return load_tokenizer(read_json(source)["checkpoint"])
    return None


def _bpb(spec: EvalSpec, lm, backend: str) -> dict[str, Any]:
    sets = bpb.heldout_sets(spec.bpb, spec.bpb_limit)
    if not sets:
        return {}
    scorer = bpb.KFoundryScorer(lm.model, lm.tok) if backend == "kfoundry" else bpb.HFScorer(lm.model, lm.tokenizer)
    return bpb.bpb_by_language(sets, scorer)


def _contamination(spec: EvalSpec, lm, backend: str, samples: dict[str, list],
                   groups: dict[str, list[str]]) -> dict[str, Any]:
    shards = Path(spec.shards) if spec.shards else contamination.find_shards(spec.model)
    if shards is None:
        return {"skipped": "no training shards found beside the checkpoint (pass --shards DIR)"}
    tok = _kfoundry_tokenizer(spec, lm, backend)
    if tok is None:
        return {"skipped": "the model has no kfoundry tokenizer to compare token n-grams with the shards"}
    docs = {task: contamination.iter_docs(s) for task, s in samples.items()}
    checked = contamination.check(docs, tok, shards, n=spec.contamination_n)
    return {"shards": str(shards), "n": spec.contamination_n, "tasks": contamination.add_groups(checked, groups)}


def run_eval(spec: EvalSpec, *, lm=None, log=lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Evaluate, write the report files, return the report payload (what eval.json holds)."""
    import lm_eval

    if not spec.tasks and spec.skip_bpb:
        raise ConfigError("nothing to evaluate: give --tasks, or leave bits-per-byte on")
    table = frontier.load_table(spec.frontier)
    backend = spec.backend if spec.backend != "auto" else detect_backend(spec.model)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    if lm is None:
        log(f"[eval] loading {spec.model} ({backend})")
        lm = build_lm(spec, backend)
    seconds["load"] = time.perf_counter() - t

    results: dict[str, Any] = {}
    samples: dict[str, list] = {}
    if spec.tasks:
        t = time.perf_counter()
        log(f"[eval] tasks: {', '.join(spec.tasks)}")
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                task_manager=task_manager(spec), log_samples=True, bootstrap_iters=1000,
                apply_chat_template=spec.apply_chat_template, random_seed=spec.seed, numpy_random_seed=spec.seed,
                torch_random_seed=spec.seed, fewshot_random_seed=spec.seed) or {}
        except (KeyError, ConnectionError, OSError) as e:
            hint = "" if spec.task_dir else " (offline? the KoBEST pack runs with --task-dir DIR)"
            raise ConfigError(f"lm-eval could not load the tasks {spec.tasks}: {e}{hint}") from e
        samples = results.pop("samples", {})
        seconds["tasks"] = time.perf_counter() - t

    mode = "chat" if spec.apply_chat_template else "base"
    rows = report.build_rows(results, table, mode=mode) if results else []

    bpb_result: dict[str, Any] = {}
    if not spec.skip_bpb:
        t = time.perf_counter()
        log("[eval] bits per byte")
        bpb_result = _bpb(spec, lm, backend)
        seconds["bpb"] = time.perf_counter() - t

    contamination_result: dict[str, Any] = {"skipped": "disabled (--no-contamination)"}
    if samples and not spec.skip_contamination:
        t = time.perf_counter()
        log("[eval] contamination check")
        contamination_result = _contamination(spec, lm, backend, samples, results.get("group_subtasks", {}))
        seconds["contamination"] = time.perf_counter() - t

    payload = {
        "model": spec.model,
        "backend": backend,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "protocol": {"tasks": list(spec.tasks), "num_fewshot": spec.num_fewshot, "limit": spec.limit, "mode": mode,
                     "task_dir": spec.task_dir, "seed": spec.seed},
        "tasks": rows,
        "summary": report.summarize(rows, table.target_fraction),
        "bpb": bpb_result,
        "contamination": contamination_result,
        "frontier_table": table.source,
        "target_fraction": table.target_fraction,
        "lm_eval_results": {k: results.get(k) for k in ("results", "n-shot", "n-samples", "versions")},
        "seconds": seconds,
    }
    payload["files"] = {k: str(v) for k, v in report.write_report(spec.out, payload).items()}
    record_evaluation(spec.model, payload)  # into the checkpoint's ledger, when its run keeps one
    return payload
