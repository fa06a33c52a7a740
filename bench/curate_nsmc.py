"""Bench: the whole shared NSMC corpus (678k movie reviews), or any corpus, through `data prepare --recipe ko-web`.

Prints documents/s, MB/s (UTF-8 bytes of the text read), wall time, seconds per stage and the removal table,
next to a peer figure measured in the same run: kfoundry's corpus reader alone reading the same file (the
decompress + parse floor that any curation of this file pays), and the ratio of the two.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/curate_nsmc.py [--input SPEC] [--json OUT] [--workers 2] [--out DIR]
        [--limit N]

The machine's load average is printed before and after: on a shared machine it explains most of the spread
between runs. A JSON copy of everything printed goes to OUT (default DIR/bench.json). For our quality filters
against datatrove's own FineWeb-2 pipeline on the same input, see bench/curate_anchor.py.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def nsmc_path() -> Path:
    base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    path = base / "ko" / "nsmc" / "reviews.jsonl.gz"
    if not path.is_file():
        sys.exit(f"NSMC not found at {path} (set KFOUNDRY_SHARED_DATA)")
    return path


def read_floor(spec: str) -> tuple[float, int, int]:
    """Seconds, documents and UTF-8 bytes for kfoundry's corpus reader alone."""
    from kfoundry.corpus import iter_documents

    t = time.perf_counter()
    docs = nbytes = 0
    for doc in iter_documents(spec):
        docs += 1
        nbytes += len(doc.text.encode("utf-8"))
    return time.perf_counter() - t, docs, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=None, help="corpus SPEC (default: the shared NSMC reviews)")
    ap.add_argument("--json", default=None, help="write the results here (default: OUT/bench.json)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", type=int, default=None)
    ap.add_argument("--recipe", default="ko-web")
    ap.add_argument("--out", default=None, help="output directory (default: a temporary one, removed after)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N reviews (for a quick try)")
    args = ap.parse_args()

    from kfoundry.data.curate import prepare

    spec = args.input or str(nsmc_path())
    tmp = None
    if args.limit:
        if not spec.endswith(".jsonl.gz"):
            sys.exit("--limit needs a .jsonl.gz input")
        tmp = Path(tempfile.mkdtemp(prefix="kf-nsmc-"))
        with gzip.open(spec, "rb") as src, gzip.open(tmp / "reviews.jsonl.gz", "wb") as dst:
            dst.writelines(itertools.islice(src, args.limit))
        spec = str(tmp / "reviews.jsonl.gz")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kf-bench-")) / "out"
    if out.exists():
        shutil.rmtree(out)

    load_before = os.getloadavg()
    floor_s, floor_docs, floor_bytes = read_floor(spec)
    t = time.perf_counter()
    card = prepare(spec, out, recipe=args.recipe, workers=args.workers, tasks=args.tasks)
    wall = time.perf_counter() - t
    load_after = os.getloadavg()

    docs = card["totals"]["docs_read"]
    mb = floor_bytes / 1e6
    result = {
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/curate_nsmc.py " + " ".join(sys.argv[1:]),
        "input": args.input or "shared NSMC",
        "recipe": args.recipe, "workers": args.workers, "cpus": os.cpu_count(),
        "load_avg_before": [round(x, 1) for x in load_before], "load_avg_after": [round(x, 1) for x in load_after],
        "docs_read": docs, "docs_curated": card["totals"]["docs_curated"], "mb_read": round(mb, 1),
        "wall_s": round(wall, 1), "docs_per_s": round(docs / wall), "mb_per_s": round(mb / wall, 3),
        "peer_read_floor_s": round(floor_s, 1), "peer_docs_per_s": round(floor_docs / floor_s),
        "ratio_wall_to_read_floor": round(wall / floor_s, 1),
        "stage_seconds": {k: round(v, 1) for k, v in card.get("stage_seconds", {}).items()},
        "identity_ok": card["identity"]["ok"],
        "steps": [{"step": s["step"], "docs_in": s["docs_in"], "docs_kept": s["docs_kept"],
                   "removed": {k: v["docs"] for k, v in s["removed"].items()}} for s in card["steps"]],
        "pii": card["pii"],
        "dedup": {k: card["dedup"][k] for k in ("exact_removed", "near_removed", "kept_in_clusters")},
    }
    print(f"data prepare --recipe {args.recipe} on {spec} ({docs:,} documents, {mb:.1f} MB UTF-8), "
          f"{args.workers} workers, load average {load_before[0]:.1f} -> {load_after[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"  ours:  {wall:8.1f} s wall  {docs / wall:10,.0f} docs/s  {mb / wall:6.2f} MB/s")
    print(f"  peer:  {floor_s:8.1f} s       {floor_docs / floor_s:10,.0f} docs/s  (corpus reader alone, 1 process)")
    identity = "holds" if card["identity"]["ok"] else "BROKEN"
    print(f"  ratio: {wall / floor_s:.1f}x the read floor; accounting identity {identity}")
    print("  stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result["stage_seconds"].items()))
    print("\n| step | docs in | kept | removed (top reasons) |\n|---|---:|---:|---|")
    for s in result["steps"]:
        top = ", ".join(f"{k} {v:,}" for k, v in list(s["removed"].items())[:5]) or "-"
        print(f"| {s['step']} | {s['docs_in']:,} | {s['docs_kept']:,} | {top} |")
    print(f"\ncurated: {card['totals']['docs_curated']:,} documents; PII replaced: {card['pii']}; "
          f"dedup: {result['dedup']}")
    json_path = Path(args.json) if args.json else out / "bench.json"
    json_path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"results: {json_path}")
    print(f"details: {out / 'data_card.md'}")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
