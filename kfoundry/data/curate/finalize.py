"""The last stage: check the accounting, write the data card, and turn the curated documents into tokens.

It runs as a one-task datatrove stage, so on a cluster it is simply the last job of the chain.

Token shards. The curated folder is itself a corpus SPEC (a folder of `.jsonl.gz` files with `text` and
`lang`), so shards are made the way `kfoundry data shard` makes them (`kfoundry.data.shards.write_shards`),
with the tokenizer given by `--tokenizer DIR`, or else one trained here on the curated text
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

from kfoundry.data.curate.accounting import check_identity, length_bin, merge
from kfoundry.data.curate.card import length_band, redact_examples, top_removals, write_card


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
    from kfoundry.corpus import describe_sources

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
                   "removed_by_task": _removed_by_task(out / "removed" / "decontaminate")})
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


def _removed_by_task(folder: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for f in sorted(folder.glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                counts[json.loads(line).get("contaminated_task", "?")] += 1
    return dict(counts.most_common())


def make_shards(out: Path, settings: dict[str, Any]) -> dict[str, str]:
    """Tokenizer (given or trained) and token shards of the curated folder; returns their paths."""
    from kfoundry.corpus import CorpusStats, iter_documents
    from kfoundry.data.shards import write_shards
    from kfoundry.tokenizer import KTokenizer, train_tokenizer

    spec = str(out / "curated")
    if settings.get("tokenizer"):
        tok_dir = Path(settings["tokenizer"])
        tok = KTokenizer.load(tok_dir)
    else:
        tok_dir = out / "tokenizer"
        if (tok_dir / "tokenizer.json").is_file():
            tok = KTokenizer.load(tok_dir)
        else:
            tok = train_tokenizer((d.text for d in iter_documents(spec)), settings["vocab_size"])
            tok.save(tok_dir)
    stats = CorpusStats()
    write_shards(iter_documents(spec, stats, seed=settings.get("seed", 0)), tok, out / "shards",
                 val_fraction=settings["val_fraction"], seed=settings.get("seed", 0), stats=stats,
                 config={"command": "data prepare", "tokenizer_hash": tok.hash, "corpus": spec},
                 overwrite=True)
    return {"tokenizer": str(tok_dir), "shards": str(out / "shards")}


def finalize(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Build the card, check the identity, make shards, write everything; raise AccountingError if broken."""
    card = build_card(out, settings)
    if card["identity"]["ok"] and settings.get("shards") and card["totals"]["docs_curated"] > 0:
        card["outputs"].update(make_shards(out, settings))
    write_card(out, card)
    if not card["identity"]["ok"]:
        raise AccountingError("accounting identity broken: " + "; ".join(card["identity"]["failures"]))
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
