"""Bench: the Korean PII finder (`kfoundry.data.curate.pii.find_pii`) over every review of a corpus.

Counts the spans found per type over all documents (not only the ones a recipe keeps), and prints a few
found values per type with their placeholder context, so that a person can check them by eye. This is the
source of the NSMC figures in docs/curation.md.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/pii_nsmc.py [--input SPEC] [--json OUT] [--examples 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=None, help="corpus SPEC (default: the shared NSMC reviews)")
    ap.add_argument("--json", default=None, help="write the counts here as JSON")
    ap.add_argument("--examples", type=int, default=0, help="found values shown per type (default none)")
    args = ap.parse_args()

    from kfoundry.corpus import iter_documents
    from kfoundry.data.curate.pii import PII_TYPES, find_pii

    spec = args.input
    if spec is None:
        base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))
        spec = str(base / "ko" / "nsmc" / "reviews.jsonl.gz")
    counts: Counter = Counter()
    docs_with: Counter = Counter()
    examples: dict[str, list[str]] = {k: [] for k in PII_TYPES}
    docs = 0
    t = time.perf_counter()
    for doc in iter_documents(spec):
        docs += 1
        spans = find_pii(doc.text)
        for kind in {s.kind for s in spans}:
            docs_with[kind] += 1
        for s in spans:
            counts[s.kind] += 1
            if len(examples[s.kind]) < args.examples:
                examples[s.kind].append(doc.text[max(0, s.start - 15):s.end + 15].replace("\n", " "))
    wall = time.perf_counter() - t
    print(f"{docs:,} documents of {spec} in {wall:.0f} s")
    print("| type | spans | documents |\n|---|---:|---:|")
    for kind in PII_TYPES:
        print(f"| {kind} | {counts[kind]:,} | {docs_with[kind]:,} |")
    for kind in PII_TYPES:
        for e in examples[kind]:
            print(f"  {kind}: ...{e}...")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "HF_HUB_OFFLINE=1 .venv/bin/python bench/pii_nsmc.py " + " ".join(sys.argv[1:]),
            "input": spec, "docs": docs, "spans": {k: counts[k] for k in PII_TYPES},
            "docs_with": {k: docs_with[k] for k in PII_TYPES}}, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
