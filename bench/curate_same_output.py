"""Check that two `data prepare` output folders hold the same curation: documents, removals and data card.

    .venv/bin/python bench/curate_same_output.py OUT_A OUT_B

Used to show that a speed-up changed nothing: run `bench/curate_nsmc.py --out OUT_A` on one commit and
`--out OUT_B` on another, then compare. Compared, after decompression:

- `curated/*.jsonl.gz`: every record, file by file, line by line (text, id and all metadata);
- `removed/<step>/*.jsonl.gz`: every removed record with its reason, file by file;
- `data_card.json`: everything except what names the output folder or depends on the clock;
- `accounting/<step>/*.json`: the per-task counts.

The gzip bytes themselves are not compared: gzip headers carry a timestamp. Prints one line per kind and
exits 1 on the first difference, naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

def gz_lines(path: Path) -> list[bytes]:
    with gzip.open(path, "rb") as f:
        return f.read().splitlines()


def compare_gz_folder(a: Path, b: Path, what: str) -> int:
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.jsonl.gz"))
    files_b = sorted(p.relative_to(b) for p in b.rglob("*.jsonl.gz"))
    if files_a != files_b:
        sys.exit(f"{what}: different files: {sorted(set(files_a) ^ set(files_b))[:5]}")
    records = 0
    for rel in files_a:
        la, lb = gz_lines(a / rel), gz_lines(b / rel)
        for i, (x, y) in enumerate(zip(la, lb)):
            if x != y:
                sys.exit(f"{what}: {rel} line {i + 1} differs:\n  {x[:200]!r}\n  {y[:200]!r}")
        if len(la) != len(lb):
            sys.exit(f"{what}: {rel} has {len(la)} vs {len(lb)} lines")
        records += len(la)
    print(f"{what}: {len(files_a)} files, {records:,} records, identical")
    return records


def card_without_paths(card: dict, out: Path) -> dict:
    text = json.dumps({k: v for k, v in card.items() if k not in {"stage_seconds", "wall_seconds"}},
                      ensure_ascii=False, sort_keys=True)
    return json.loads(text.replace(str(out), "<out>"))


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    compare_gz_folder(a / "curated", b / "curated", "curated")
    compare_gz_folder(a / "removed", b / "removed", "removed")
    ca = card_without_paths(json.loads((a / "data_card.json").read_text(encoding="utf-8")), a)
    cb = card_without_paths(json.loads((b / "data_card.json").read_text(encoding="utf-8")), b)
    if ca != cb:
        diff = sorted(k for k in set(ca) | set(cb) if ca.get(k) != cb.get(k))
        sys.exit(f"data card: differs in {diff}")
    print(f"data card: identical apart from the output folder ({ca['totals']})")
    acc_a = sorted(p.relative_to(a) for p in (a / "accounting").rglob("*.json"))
    if acc_a != sorted(p.relative_to(b) for p in (b / "accounting").rglob("*.json")):
        sys.exit("accounting: different files")
    for rel in acc_a:
        if json.loads((a / rel).read_text()) != json.loads((b / rel).read_text()):
            sys.exit(f"accounting: {rel} differs")
    print(f"accounting: {len(acc_a)} files identical")


if __name__ == "__main__":
    main()
