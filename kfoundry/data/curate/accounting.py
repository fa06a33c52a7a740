"""Accounting: every document that enters a step leaves it kept or removed under a named reason.

`Accounted(name, step, out_dir)` wraps any datatrove step. While the step runs it counts, per task:

    docs_in / chars_in        what entered (characters as they entered)
    docs_kept / chars_kept    what left downstream (characters as they entered, so the identity below holds
                              for steps that rewrite text too); chars_out = their length as they left
    removed[reason]           docs and characters of each removal, from the step's exclusion writer
    changes[name]             repairs a step made to documents it kept (NFC, mojibake, PII replaced, ...)
    examples[reason]          the first few removed documents (id and the start of the text)
    length histogram          of entering documents, in power-of-two bins (for the data card)

so that, per step, `docs_in == docs_kept + sum(removed docs)` and the same for characters. To learn the
reason of each removal, the wrapper gives the step an `ExclusionRecorder` as its exclusion writer (every
datatrove filter and dedup filter accepts one): it writes the removed document to `removed/<step>/` (the
exclusion files users inspect) and tells the tally why. A document that vanishes without passing through
the recorder is counted under `unrecorded`, which the identity check reports as a failure.

Each task writes `accounting/<step>/<rank>.json` when its data is exhausted, before datatrove marks the task
complete; a task killed halfway is re-run whole and overwrites its file. `merge` adds the tasks up and
`check_identity` checks the per-step identity, that each step received what the previous one kept, and the
overall identity `read = curated + every removal`.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from datatrove.pipeline.base import PipelineStep

from kfoundry.data.curate.io import FastJsonlWriter, flat_record
from kfoundry.fileio import atomic_write_json

EXAMPLES_PER_REASON = 3
EXAMPLE_CHARS = 240
UNRECORDED = "unrecorded"


def length_bin(n: int) -> int:
    """Power-of-two bin of a length: 0 for 0, k for 2**(k-1) <= n < 2**k."""
    return int(n).bit_length()


class StepTally:
    """The counts of one step in one task (see the module docstring)."""

    def __init__(self, step: str):
        self.step = step
        self.docs_in = self.chars_in = 0
        self.docs_kept = self.chars_kept = self.chars_out = 0
        self.removed: dict[str, list[int]] = {}
        self.examples: dict[str, list[dict]] = {}
        self.changes: Counter = Counter()
        self.len_hist_in: Counter = Counter()
        self.kept_by_lang: dict[str, list[int]] = {}
        self._pending: dict[int, int] = {}

    def enter(self, doc) -> None:
        n = len(doc.text)
        self.docs_in += 1
        self.chars_in += n
        self.len_hist_in[n.bit_length()] += 1  # length_bin(n), inline: this runs for every document and step
        self._pending[id(doc)] = n

    def keep(self, doc) -> None:
        self.docs_kept += 1
        self.chars_kept += self._pending.pop(id(doc), len(doc.text))
        self.chars_out += len(doc.text)
        lang = doc.metadata.get("lang") or "unrouted"
        row = self.kept_by_lang.setdefault(lang, [0, 0])
        row[0] += 1
        row[1] += len(doc.text)

    def remove(self, doc, reason: str) -> None:
        self._count_removed(reason, self._pending.pop(id(doc), len(doc.text)))
        seen = self.examples.setdefault(reason, [])
        if len(seen) < EXAMPLES_PER_REASON:
            seen.append({"id": doc.id, "text": doc.text[:EXAMPLE_CHARS]})

    def _count_removed(self, reason: str, chars: int, docs: int = 1) -> None:
        row = self.removed.setdefault(reason, [0, 0])
        row[0] += docs
        row[1] += chars

    def finish(self) -> None:
        """Documents that entered but neither left nor were recorded as removed."""
        if self._pending:
            self._count_removed(UNRECORDED, sum(self._pending.values()), len(self._pending))
            self._pending.clear()

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "docs_in": self.docs_in, "chars_in": self.chars_in,
            "docs_kept": self.docs_kept, "chars_kept": self.chars_kept, "chars_out": self.chars_out,
            "removed": {k: {"docs": v[0], "chars": v[1]} for k, v in sorted(self.removed.items())},
            "changes": dict(sorted(self.changes.items())),
            "examples": self.examples,
            "len_hist_in": {str(k): v for k, v in sorted(self.len_hist_in.items())},
            "kept_by_lang": {k: {"docs": v[0], "chars": v[1]} for k, v in sorted(self.kept_by_lang.items())},
        }


class ExclusionRecorder(FastJsonlWriter):
    """A JSONL exclusion writer (`<rank>.jsonl.gz`) that also tells the step's tally why each document was
    removed."""

    def __init__(self, output_folder: str, step: str, default_reason: str):
        super().__init__(output_folder, flat_record, compressed=True, gzip_level=1)
        self.step = step
        self.default_reason = default_reason
        self.tally: StepTally | None = None

    def write(self, document, rank: int = 0, **kwargs) -> None:
        reason = document.metadata.get("filter_reason") or self.default_reason
        document.metadata["filter_reason"] = reason
        document.metadata["removed_by"] = self.step
        if self.tally is not None:
            self.tally.remove(document, reason)
        super().write(document, rank, **kwargs)


class Accounted(PipelineStep):
    """Runs `step` and accounts for every document through it (see the module docstring)."""

    type = "📒 - ACCOUNTED"

    def __init__(self, name: str, step: PipelineStep, out_dir: str | Path, default_reason: str | None = None):
        super().__init__()
        self.step_name = name
        self.step = step
        self.name = f"{name}: {step.name}"
        self.accounting_dir = str(Path(out_dir) / "accounting" / name)
        self.stats = step.stats  # datatrove's own per-step stats stay visible in its stats.json
        if hasattr(step, "exclusion_writer"):
            step.exclusion_writer = ExclusionRecorder(str(Path(out_dir) / "removed" / name), name,
                                                      default_reason or name)

    def run(self, data, rank: int = 0, world_size: int = 1):
        tally = StepTally(self.step_name)
        recorder = getattr(self.step, "exclusion_writer", None)
        if isinstance(recorder, ExclusionRecorder):
            recorder.tally = tally
        if hasattr(self.step, "changes"):
            self.step.changes = Counter()

        def entering():
            for doc in data or ():
                tally.enter(doc)
                yield doc

        for doc in self.step.run(entering(), rank, world_size):
            tally.keep(doc)
            yield doc
        tally.changes.update(getattr(self.step, "changes", None) or {})
        tally.finish()
        atomic_write_json(Path(self.accounting_dir) / f"{rank:05d}.json", tally.to_dict())


# ---------------------------------------------------------------------------------------------------------
# Merging and checking


def merge_step(records: Iterable[dict]) -> dict[str, Any]:
    """Add up the per-task records of one step."""
    total: dict[str, Any] = {"docs_in": 0, "chars_in": 0, "docs_kept": 0, "chars_kept": 0, "chars_out": 0,
                             "removed": {}, "changes": Counter(), "examples": {}, "len_hist_in": Counter(),
                             "kept_by_lang": {}, "tasks": 0}
    for rec in records:
        total["tasks"] += 1
        for key in ("docs_in", "chars_in", "docs_kept", "chars_kept", "chars_out"):
            total[key] += rec.get(key) or 0
        for reason, row in rec.get("removed", {}).items():
            dst = total["removed"].setdefault(reason, {"docs": 0, "chars": 0})
            dst["docs"] += row["docs"]
            dst["chars"] += row["chars"]
        total["changes"].update(rec.get("changes", {}))
        total["len_hist_in"].update({int(k): v for k, v in rec.get("len_hist_in", {}).items()})
        for lang, row in rec.get("kept_by_lang", {}).items():
            dst = total["kept_by_lang"].setdefault(lang, {"docs": 0, "chars": 0})
            dst["docs"] += row["docs"]
            dst["chars"] += row["chars"]
        for reason, examples in rec.get("examples", {}).items():
            seen = total["examples"].setdefault(reason, [])
            seen.extend(examples[: EXAMPLES_PER_REASON - len(seen)])
    total["docs_removed"] = sum(r["docs"] for r in total["removed"].values())
    total["chars_removed"] = sum(r["chars"] for r in total["removed"].values())
    total["changes"] = dict(sorted(total["changes"].items()))
    total["len_hist_in"] = {str(k): v for k, v in sorted(total["len_hist_in"].items())}
    total["removed"] = dict(sorted(total["removed"].items(), key=lambda kv: -kv[1]["docs"]))
    return total


def merge(out_dir: str | Path, steps: list[str]) -> list[dict[str, Any]]:
    """One merged record per step, in pipeline order (a step with no task files has zero counts)."""
    merged = []
    for name in steps:
        files = sorted((Path(out_dir) / "accounting" / name).glob("*.json"))
        record = merge_step(json.loads(f.read_text(encoding="utf-8")) for f in files)
        merged.append({"step": name, **record})
    return merged


def check_identity(steps: list[dict[str, Any]], curated_docs: int | None = None) -> dict[str, Any]:
    """Check `in = kept + removed` per step (docs and chars), the chain between steps, and the total.

    Returns {"ok": bool, "failures": [...], "read": N, "curated": N, "removed": N}. The `read` step's
    removals are records that never became text (malformed JSON, invalid UTF-8), so they carry no
    characters; its character identity is checked on what it yielded.
    """
    failures = []
    for s in steps:
        if s["docs_in"] != s["docs_kept"] + s["docs_removed"]:
            failures.append(f"{s['step']}: docs in {s['docs_in']} != kept {s['docs_kept']} + removed "
                            f"{s['docs_removed']}")
        if s["chars_in"] != s["chars_kept"] + s["chars_removed"]:
            failures.append(f"{s['step']}: chars in {s['chars_in']} != kept {s['chars_kept']} + removed "
                            f"{s['chars_removed']}")
        if UNRECORDED in s["removed"]:
            failures.append(f"{s['step']}: {s['removed'][UNRECORDED]['docs']} documents left without a reason")
    for prev, cur in zip(steps, steps[1:]):
        if prev["docs_kept"] != cur["docs_in"]:
            failures.append(f"{cur['step']} received {cur['docs_in']} documents but {prev['step']} kept "
                            f"{prev['docs_kept']}")
    read = steps[0]["docs_in"] if steps else 0
    last = steps[-1]["docs_kept"] if steps else 0
    removed = sum(s["docs_removed"] for s in steps)
    if read != last + removed:
        failures.append(f"overall: read {read} != curated {last} + removed {removed}")
    if curated_docs is not None and curated_docs != last:
        failures.append(f"curated files hold {curated_docs} documents but the last step kept {last}")
    return {"ok": not failures, "failures": failures, "read": read, "curated": last, "removed": removed}
