"""Bench: Kiwi's `knlm` and `sbg` models, characters analysed per CPU second, on NSMC reviews.

datatrove's `KiwiTokenizer` (what FineWeb-2 used for Korean) loads `sbg`; our recipes default to `knlm`
(kfoundry/data/curate/words.py). Both models run in this one process on the same texts: the first `--reviews`
NSMC reviews as they are, and the same reviews joined 20 per document, one per line. CPU time
(`time.process_time`) is measured rather than wall time, so a busy machine disturbs it less.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/kiwi_models.py [--reviews 4000]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reviews", type=int, default=4000)
    args = ap.parse_args()
    from kiwipiepy import Kiwi

    base = Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))
    with gzip.open(base / "ko" / "nsmc" / "reviews.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, args.reviews)]
    longs = ["\n".join(texts[i:i + 20]) for i in range(0, len(texts), 20)]
    chars = sum(map(len, texts))
    print(f"{len(texts):,} reviews, {chars:,} characters; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    for model in ("knlm", "sbg"):
        t = time.perf_counter()
        kiwi = Kiwi(model_type=model)
        load = time.perf_counter() - t
        kiwi.tokenize("워밍업")
        for name, data in (("reviews", texts), ("20 per document", longs)):
            t = time.process_time()
            for text in data:
                kiwi.tokenize(text)
            cpu = time.process_time() - t
            print(f"{model:5s} {name:16s} {chars / cpu:9,.0f} characters per CPU second  (model load {load:.1f} s)")


if __name__ == "__main__":
    main()
