"""The finalize stage: check the accounting, write the data card and the completion marker, get a tokenizer.

It runs as a one-task datatrove stage, so on a cluster it is simply one more job of the chain.

Completion marker. Once the identity holds, `curated.done.json` (kfoundry.corpus.prepared) lists every
curated file with its size; only then does any corpus reader accept the folder (a killed run leaves curated
files that gzip reads without complaint up to the cut). A broken identity writes no marker.

Token shards. The curated folder is itself a corpus SPEC (a folder of `.jsonl.gz` files with `text` and
`lang`), so shards are made the way `kfoundry data shard --tasks N` makes them: the two stages after this one
(`encode`, N tasks, and `shards`, kfoundry.data.shard_tasks) on the same executor as the curation. The
tokenizer is the one given by `--tokenizer DIR`, or else one trained here on the curated text
(`kfoundry.tokenizer.train_tokenizer`, `output.vocab_size` of the recipe) and saved as `tokenizer/`.
"""

from __future__ import annotations

import gzip
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from datatrove.pipeline.base import PipelineStep

from kfoundry.corpus import describe_sources, iter_documents
from kfoundry.corpus.prepared import CURATED_DIR, DONE_FILE
from kfoundry.data.curate.accounting import check_identity, length_bin, merge
from kfoundry.data.curate.card import length_band, redact_examples, top_removals, write_card
from kfoundry.data.curate.pii import redact
from kfoundry.fileio import atomic_write_json
from kfoundry.tokenizer import train_tokenizer


class AccountingError(RuntimeError):
    """The accounting identity does not hold: documents were lost or double-counted."""


def curated_stats(curated: Path) -> dict[str, Any]:
    """Counts over the curated files: documents, characters, languages, lengths, cluster sizes, PII."""
    docs = chars = 0
    langs: dict[str, dict[str, int]] = {}
    lengths: list[int] = []
    hist: Counter = Counter()
    clusters: Counter = Counter()
    exact: Counter = Counter()
    by_band: dict[str, Counter] = {}
    for f in sorted(curated.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                n = len(rec["text"])
                docs += 1
                chars += n
                lengths.append(n)
                hist[length_bin(n)] += 1
                row = langs.setdefault(rec.get("lang") or "unrouted", {"docs": 0, "chars": 0})
                row["docs"] += 1
                row["chars"] += n
                clusters[int(rec.get("minhash_cluster_size") or 1)] += 1
                by_band.setdefault(length_band(n), Counter())[int(rec.get("minhash_cluster_size") or 1)] += 1
                exact[int(rec.get("duplicate_count") or 0)] += 1
    lengths.sort()
    summary = {}
    if lengths:
        summary = {"p50": lengths[len(lengths) // 2], "p90": lengths[int(len(lengths) * 0.9)],
                   "max": lengths[-1], "mean": statistics.fmean(lengths)}
    return {"docs": docs, "chars": chars, "langs": dict(sorted(langs.items(), key=lambda kv: -kv[1]["chars"])),
            "summary": summary, "hist": {str(k): v for k, v in sorted(hist.items())},
            "clusters": {str(k): v for k, v in sorted(clusters.items())},
            "clusters_by_band": {b: {str(k): v for k, v in sorted(c.items())} for b, c in by_band.items()},
            "exact": {str(k): v for k, v in sorted(exact.items())}}


def build_card(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Merge the accounting and the curated files into the data card dict (nothing written)."""
    steps = merge(out, settings["steps"])
    redact_examples(steps)
    cur = curated_stats(out / "curated")
    identity = check_identity(steps, cur["docs"])
    by_name = {s["step"]: s for s in steps}
    read = by_name.get("read", {})
    lang_step = by_name.get("language", {"removed": {}})
    decont = by_name.get("decontaminate")
    dc: dict[str, Any] = {"enabled": decont is not None, "note": settings.get("decontam_note", "")}
    if decont is not None and settings.get("decontam_index"):
        report = json.loads((Path(settings["decontam_index"]) / "index.json").read_text(encoding="utf-8"))
        dc.update({"sets": report["settings"]["sources"], "n_grams": report["settings"]["n_grams"],
                   "min_item_words": report["settings"]["min_item_words"], "items": report["items"],
                   "items_indexed": report["items_indexed"], "items_too_short": report["items_too_short"],
                   "tasks": report["tasks"], "removed": decont["docs_removed"],
                   **_matched(out / "removed" / "decontaminate")})
    pii_changes = by_name.get("pii", {}).get("changes", {})
    try:
        sources = describe_sources(settings["corpus"])
    except Exception as e:  # a hub source offline: say so instead of failing the card
        sources = [{"source": settings["corpus"], "kind": "unknown", "licence": None, "note": str(e)}]
    return {
        "format": "kfoundry.data_card", "version": 1,
        "corpus": settings["corpus"], "recipe": settings["recipe"], "executor": settings.get("executor"),
        "sources": sources,
        "totals": {"docs_read": read.get("docs_in", 0), "chars_read": read.get("chars_in", 0),
                   "docs_curated": cur["docs"], "chars_curated": cur["chars"],
                   "docs_removed": identity["removed"]},
        "identity": identity,
        "steps": steps,
        "languages": {"curated": cur["langs"],
                      "removed": {k.removeprefix("lang_"): v["docs"] for k, v in lang_step["removed"].items()
                                  if k.startswith("lang_")}},
        "lengths": {"curated": cur["summary"], "hist_read": by_name.get("normalize", read).get("len_hist_in", {}),
                    "hist_curated": cur["hist"]},
        "dedup": {"exact_removed": by_name.get("exact_dedup", {}).get("docs_removed", 0),
                  "near_removed": by_name.get("near_dedup", {}).get("docs_removed", 0),
                  "kept_in_clusters": sum(v for k, v in cur["clusters"].items() if int(k) > 1),
                  "cluster_size_hist": cur["clusters"], "cluster_size_by_band": cur["clusters_by_band"],
                  "exact_copies_hist": cur["exact"]},
        "pii": {k.removeprefix("pii_"): v for k, v in pii_changes.items() if k.startswith("pii_")},
        "decontamination": dc,
        "top_removals": top_removals(steps),
        "outputs": {"curated": "curated/", "removed": "removed/<step>/", "accounting": "accounting/<step>/",
                    "logs": "logs/<stage>/"},
    }


DECONTAM_EXAMPLES = 5


def _matched(folder: Path) -> dict[str, Any]:
    """Removed documents per evaluation task, and the first few matches: document id, task, the shared
    n-gram, and the document text around it (personal data redacted: decontamination runs before PII)."""
    counts: Counter = Counter()
    examples: list[dict[str, Any]] = []
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                counts[rec.get("contaminated_task", "?")] += 1
                if len(examples) < DECONTAM_EXAMPLES:
                    examples.append({"id": rec.get("id"), "task": rec.get("contaminated_task"),
                                     "ngram": rec.get("contaminated_ngram"),
                                     "text": redact(rec.get("text", "")[:300])[0]})
    return {"removed_by_task": dict(counts.most_common()), "examples": examples}


def tokenizer_dir(out: Path, settings: dict[str, Any]) -> Path:
    """The tokenizer the shards are made with: `--tokenizer DIR`, else `out/tokenizer` (trained in finalize)."""
    return Path(settings["tokenizer"]) if settings.get("tokenizer") else out / "tokenizer"


def ensure_tokenizer(out: Path, settings: dict[str, Any]) -> Path:
    """The given tokenizer, or one trained on the curated documents (kept if a resumed run already made it)."""
    tok_dir = tokenizer_dir(out, settings)
    if not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer((d.text for d in iter_documents(str(out / CURATED_DIR))), settings["vocab_size"])
        tok.save(tok_dir)
    return tok_dir


def write_done_marker(out: Path, docs: int, shards: bool) -> None:
    """`curated.done.json`: the curated files and their sizes; from now on the folder is a corpus. `shards`
    tells the encode and merge stages whether there is anything to shard."""
    files = {f"{CURATED_DIR}/{f.name}": f.stat().st_size for f in sorted((out / CURATED_DIR).glob("*.jsonl.gz"))}
    atomic_write_json(out / DONE_FILE, {"format": "kfoundry.prepare.done", "docs": docs, "files": files,
                                        "shards": shards})


def finalize(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Build the card, check the identity, mark the curated folder complete, get the tokenizer for the shards;
    raise AccountingError if the identity is broken (and then write no marker)."""
    card = build_card(out, settings)
    will_shard = card["identity"]["ok"] and bool(settings.get("shards")) and card["totals"]["docs_curated"] > 0
    if will_shard:
        card["outputs"].update({"tokenizer": str(tokenizer_dir(out, settings)), "shards": str(out / "shards")})
    write_card(out, card)
    if not card["identity"]["ok"]:
        raise AccountingError("accounting identity broken: " + "; ".join(card["identity"]["failures"]))
    write_done_marker(out, card["totals"]["docs_curated"], will_shard)
    if will_shard:
        ensure_tokenizer(out, settings)
    return card


class Finalize(PipelineStep):
    """The finalize stage as a datatrove step (runs once, takes no documents)."""

    type = "📒 - CARD"
    name = "📒 data card + shards"

    def __init__(self, out: str | Path, settings: dict[str, Any]):
        super().__init__()
        self.out = str(out)
        self.settings = settings

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        finalize(Path(self.out), self.settings)  # nothing flows out of the last stage
