"""Bench: our Korean quality filtering against the anchor, datatrove's stock FineWeb-2 `kor_Hang` filtering.

The anchor is what FineWeb-2 ran for Korean (huggingface/fineweb-2 `fineweb-2-pipeline.py`, step 5, with
`configs/kor_Hang.yml`): datatrove's own `GopherRepetitionFilter`, `FineWebQualityFilter` and
`GopherQualityFilter`, in that order, built with `language="kor_Hang"` (datatrove's stock Kiwi tokenizer) and
the upstream thresholds, written out below from the upstream files rather than read from our recipe, so that
a drift in `recipes/ko-web.yaml` shows up here as disagreement. Ours is `kfoundry.data.curate.quality`
with the `ko-web` recipe's thresholds, exactly as `data prepare` builds it.

Both run in this one process's run, one after the other, as datatrove pipelines on the same JSONL shards
with the same executor (`LocalPipelineExecutor`), the same number of tasks and the same number of worker
processes; each filter gets an exclusion writer that records the removal reason, and a final writer records
the kept ids. Two inputs are made from `--input` (any JSONL/JSONL.gz/txt corpus SPEC; default the shared
NSMC reviews):

- `docs`: the documents as they are;
- `long`: every `--lines` (20) consecutive documents joined one per line into one document, which forces
  Kiwi on both sides (a one-line document is mostly decided without words).

Every document is tagged `lang="ko"`, so ours applies the Korean thresholds to all of them, as the anchor
does (in `data prepare` the language step would route English-only documents elsewhere first).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/curate_anchor.py [--input FILE] [--json OUT] [--workers 2]
        [--limit N] [--lines 20] [--only docs|long]

Printed per input: documents/s of each side and the ratio, the CPU seconds each side's worker processes
spent (and their ratio, which does not depend on the machine's load), the share of documents with the same
keep/remove decision, and the disagreements by (anchor reason -> our reason). The load average before and
after is printed too: on a shared machine the ratio from the same run is the figure that matters.

The whole file (no `--limit`) is 678,147 reviews and 33,908 long documents, about 24M characters each; the
anchor analyses all of them with Kiwi `sbg`, which on an idle 2-core machine takes most of an hour.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# FineWeb-2 configs/kor_Hang.yml (commit 05e6729567a5df985fbd814e862c48f796feb09f) and the fixed overrides of
# fineweb-2-pipeline.py step 5. Order as upstream: repetition, FineWeb quality, Gopher quality.
KOR_HANG = {
    "dup_line_frac": 0.374,
    "dup_n_grams": [[5, 0.201], [6, 0.184], [7, 0.168], [8, 0.154], [9, 0.14], [10, 0.127]],
    "top_n_grams": [[2, 0.282], [3, 0.228], [4, 0.185]],
    "line_punct_thr": 0.062, "new_line_ratio": 0.196,
    "min_avg_word_length": 1, "max_avg_word_length": 6, "max_non_alpha_words_ratio": 0.791,
    "stopwords": ["의", "다", "이", "는", "에", "을", "한", "년", "하", "은", "를", "했", "고", "에서", "가", "있", "으로",
                  "인", "월", "로", "되"],
}


def anchor_filters(writer) -> list[tuple[str, object]]:
    """FineWeb-2's step 5 for kor_Hang, with datatrove's stock tokenizer for the language."""
    from datatrove.pipeline.filters import FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    c, lang = KOR_HANG, "kor_Hang"
    return [
        ("gopher_repetition", GopherRepetitionFilter(
            language=lang, dup_para_frac=0, dup_line_char_frac=0, dup_para_char_frac=0,
            dup_line_frac=c["dup_line_frac"], top_n_grams=c["top_n_grams"], dup_n_grams=c["dup_n_grams"],
            exclusion_writer=writer("gopher_repetition"))),
        ("fineweb_quality", FineWebQualityFilter(
            language=lang, short_line_thr=999, char_duplicates_ratio=0.1, line_punct_thr=c["line_punct_thr"],
            new_line_ratio=c["new_line_ratio"], exclusion_writer=writer("fineweb_quality"))),
        ("gopher_quality", GopherQualityFilter(
            language=lang, max_avg_word_length=c["max_avg_word_length"],
            min_avg_word_length=c["min_avg_word_length"], stop_words=c["stopwords"],
            max_non_alpha_words_ratio=c["max_non_alpha_words_ratio"], min_stop_words=2,
            exclusion_writer=writer("gopher_quality"))),
    ]


def our_filters(writer, recipe: str) -> list[tuple[str, object]]:
    """The quality steps `data prepare` builds for the recipe, each with an exclusion writer."""
    from kfoundry.data.curate import load_recipe
    from kfoundry.data.curate.quality import build_quality_steps

    rec = load_recipe(recipe)
    steps = build_quality_steps(rec.quality.thresholds, rec.quality.kiwi_model, rec.quality.estimate_short_docs)
    for name, step in steps:
        step.exclusion_writer = writer(name)
    return steps


class CpuClock:
    """A pipeline step that passes documents through and records the CPU seconds its worker process spent
    on the task (`<rank>.json`: pid, CPU time at the start and at the end). A worker's CPU time does not
    depend on how busy the machine is, so the ratio of the two sides' CPU seconds is a load-independent
    check on the wall-clock ratio. Kiwi's model load, once per worker process, is inside it."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        start = time.process_time()
        yield from data
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"{rank:05d}.json").write_text(json.dumps(
            {"pid": os.getpid(), "start": start, "end": time.process_time()}))


def cpu_seconds(folder: Path) -> float:
    """CPU seconds of a side: per worker process, from its first task's start to its last task's end."""
    spans: dict[int, list[float]] = {}
    for f in folder.glob("*.json"):
        r = json.loads(f.read_text())
        lo, hi = spans.setdefault(r["pid"], [r["start"], r["end"]])
        spans[r["pid"]] = [min(lo, r["start"]), max(hi, r["end"])]
    return sum(hi - lo for lo, hi in spans.values())


def _decision(_writer, doc) -> dict:
    return {"id": doc.id, "reason": doc.metadata.get("filter_reason")}


def make_inputs(spec: str, tmp: Path, tasks: int, lines: int, limit: int | None, only: str | None
                ) -> dict[str, int]:
    """Write the inputs as `tasks` JSONL shards each (round-robin); return their document counts."""
    from kfoundry.corpus import iter_documents

    texts = []
    for doc in iter_documents(spec, max_chars_per_doc=None):
        texts.append(doc.text)
        if limit and len(texts) >= limit:
            break
    inputs = {"docs": texts, "long": ["\n".join(texts[i:i + lines]) for i in range(0, len(texts), lines)]}
    counts = {}
    for name, docs in inputs.items():
        if only and name != only:
            continue
        folder = tmp / name / "shards"
        folder.mkdir(parents=True)
        files = [open(folder / f"{r:05d}.jsonl", "w", encoding="utf-8") for r in range(tasks)]
        for i, text in enumerate(docs):
            files[i % tasks].write(json.dumps({"text": text, "id": f"{name}-{i}", "lang": "ko"},
                                              ensure_ascii=False) + "\n")
        for f in files:
            f.close()
        counts[name] = len(docs)
    return counts


@contextlib.contextmanager
def stderr_to(path: Path):
    """datatrove's per-task console logs (loguru on stderr, worker processes too) go to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as f:
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def run_side(side: str, shards: Path, out: Path, tasks: int, workers: int, recipe: str) -> float:
    """Run one side's pipeline; return its wall time in seconds."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.writers.jsonl import JsonlWriter

    from kfoundry.data.curate.io import RankJsonlReader

    def writer(step: str) -> JsonlWriter:
        return JsonlWriter(str(out / "removed" / step), output_filename="${rank}.jsonl", compression=None,
                           adapter=_decision)

    filters = anchor_filters(writer) if side == "anchor" else our_filters(writer, recipe)
    pipeline = [RankJsonlReader(shards), *[f for _, f in filters],
                JsonlWriter(str(out / "kept"), output_filename="${rank}.jsonl", compression=None, adapter=_decision),
                CpuClock(out / "cpu")]
    ex = LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=workers, logging_dir=str(out / "logs"))
    t = time.perf_counter()
    with stderr_to(out / "datatrove.log"):
        ex.run()
    wall = time.perf_counter() - t
    if ex.get_incomplete_ranks(skip_completed=True):
        sys.exit(f"{side}: tasks did not complete; see {out / 'logs'}")
    return wall


def decisions(out: Path) -> dict[str, str | None]:
    """id -> removal reason ("step/reason"), or None when kept."""
    got: dict[str, str | None] = {}
    for f in sorted((out / "kept").glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            got[json.loads(line)["id"]] = None
    for step_dir in sorted((out / "removed").glob("*")):
        for f in sorted(step_dir.glob("*.jsonl")):
            for line in f.open(encoding="utf-8"):
                r = json.loads(line)
                got[r["id"]] = f"{step_dir.name}/{r['reason']}"
    return got


def compare(anchor: dict, ours: dict, n: int) -> dict:
    if len(anchor) != n or len(ours) != n:
        sys.exit(f"lost documents: {n} in, anchor decided {len(anchor)}, ours {len(ours)}")
    same = sum(1 for k, a in anchor.items() if (a is None) == (ours[k] is None))
    pairs = Counter(f"{anchor[k] or 'kept'} -> {ours[k] or 'kept'}" for k in anchor
                    if (anchor[k] is None) != (ours[k] is None))
    return {"docs": n, "same_decision": same, "agreement": same / n,
            "anchor_kept": sum(1 for a in anchor.values() if a is None),
            "ours_kept": sum(1 for a in ours.values() if a is None),
            "disagreements": dict(pairs.most_common()),
            "anchor_reasons": dict(Counter(a or "kept" for a in anchor.values()).most_common()),
            "our_reasons": dict(Counter(a or "kept" for a in ours.values()).most_common())}


def explain(shards: Path, anchor: dict, ours: dict, limit: int = 50) -> list[dict]:
    """For (up to `limit`) disagreements: Gopher's non-symbol word count under datatrove's stock Kiwi model
    (sbg) and ours (knlm), and the characters our short-document estimate looks at, so each disagreement can
    be traced to the Kiwi model or to the estimate."""
    from datatrove.utils.text import PUNCTUATION_SET
    from kiwipiepy import Kiwi

    from kfoundry.data.curate.quality import max_words
    from kfoundry.data.curate.words import KoreanWords

    ids = [k for k in anchor if (anchor[k] is None) != (ours[k] is None)][:limit]
    if not ids:
        return []
    texts = {}
    for f in sorted(shards.glob("*.jsonl")):
        for line in f.open(encoding="utf-8"):
            r = json.loads(line)
            if r["id"] in ids:
                texts[r["id"]] = r["text"]
    models = {"sbg": Kiwi(model_type="sbg"), "knlm": Kiwi(model_type="knlm")}

    def words(kiwi, text: str) -> int:
        return sum(1 for t in kiwi.tokenize(text) if any(c not in PUNCTUATION_SET for c in text[t.start:t.end].strip()))

    est = 50 / KoreanWords.est_words_per_char
    return [{"id": i, "anchor": anchor[i] or "kept", "ours": ours[i] or "kept", "word_chars": max_words(texts[i]),
             "by_estimate": max_words(texts[i]) < est,
             **{f"words_{m}": words(k, texts[i]) for m, k in models.items()}} for i in ids]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=None, help="corpus SPEC (default: the shared NSMC reviews)")
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=None, help="tasks per side (default 2 x workers)")
    ap.add_argument("--lines", type=int, default=20, help="documents per long document")
    ap.add_argument("--limit", type=int, default=None, help="only the first N documents of the input")
    ap.add_argument("--only", choices=("docs", "long"), default=None, help="run one input only")
    ap.add_argument("--recipe", default="ko-web")
    args = ap.parse_args()

    spec = args.input
    if spec is None:
        base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))
        spec = str(base / "ko" / "nsmc" / "reviews.jsonl.gz")
    tasks = args.tasks or 2 * args.workers
    tmp = Path(tempfile.mkdtemp(prefix="kf-anchor-"))
    try:
        counts = make_inputs(spec, tmp, tasks, args.lines, args.limit, args.only)
        result = {"command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/curate_anchor.py " + " ".join(sys.argv[1:]),
                  "input": spec, "workers": args.workers, "tasks": tasks, "cpus": os.cpu_count(),
                  "recipe": args.recipe, "inputs": {}}
        for name, n in counts.items():
            load_before = os.getloadavg()
            walls = {}
            for side in ("anchor", "ours"):
                print(f"[{name}] {side} ...", flush=True)
                walls[side] = run_side(side, tmp / name / "shards", tmp / name / side, tasks, args.workers,
                                       args.recipe)
            load_after = os.getloadavg()
            anchor, ours = decisions(tmp / name / "anchor"), decisions(tmp / name / "ours")
            cmp = compare(anchor, ours, n)
            cmp["explained"] = explain(tmp / name / "shards", anchor, ours)
            cpu = {side: cpu_seconds(tmp / name / side / "cpu") for side in ("anchor", "ours")}
            row = {**cmp, "anchor_s": round(walls["anchor"], 2), "ours_s": round(walls["ours"], 2),
                   "anchor_cpu_s": round(cpu["anchor"], 2), "ours_cpu_s": round(cpu["ours"], 2),
                   "cpu_ratio": round(cpu["anchor"] / cpu["ours"], 2) if cpu["ours"] else None,
                   "anchor_docs_per_s": round(n / walls["anchor"], 1), "ours_docs_per_s": round(n / walls["ours"], 1),
                   "speedup": round(walls["anchor"] / walls["ours"], 2),
                   "load_avg_before": [round(x, 1) for x in load_before],
                   "load_avg_after": [round(x, 1) for x in load_after]}
            result["inputs"][name] = row
            print(f"\n== {name}: {n:,} documents from {spec}, {tasks} tasks, {args.workers} workers, "
                  f"load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
            print(f"  anchor (datatrove FineWeb-2 kor_Hang): {walls['anchor']:8.1f} s  "
                  f"{n / walls['anchor']:10,.0f} docs/s  kept {cmp['anchor_kept']:,}")
            print(f"  ours   (kfoundry ko-web quality):      {walls['ours']:8.1f} s  "
                  f"{n / walls['ours']:10,.0f} docs/s  kept {cmp['ours_kept']:,}")
            print(f"  CPU seconds in the workers: anchor {cpu['anchor']:.1f}, ours {cpu['ours']:.1f} "
                  f"({row['cpu_ratio']}x)")
            print(f"  speed-up {row['speedup']:.2f}x; same keep/remove decision on {cmp['same_decision']:,} of {n:,} "
                  f"({100 * cmp['agreement']:.3f}%)")
            for pair, k in list(cmp["disagreements"].items())[:12]:
                print(f"    {k:6,}  {pair}")
            for e in cmp["explained"]:
                print(f"    {e['id']}: {e['anchor']} -> {e['ours']}; Gopher words sbg {e['words_sbg']}, knlm "
                      f"{e['words_knlm']}; {e['word_chars']} word characters"
                      + (" (decided by the estimate)" if e["by_estimate"] else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            print(f"\nresults: {args.json}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
