"""Share of a shard split's tokens that one training epoch predicts: the loader (the measured figure) against the
rule it replaced, cropping every row at a document start and discarding the tail (the peer, computed from the
same documents in the same order).

    python bench/token_use.py                       # builds the starter corpus's shards (2,048 vocabulary) first
    python bench/token_use.py --shards RUN/shards --seq 256 1024 2048

The loader's figure is counted, not derived: one pass over the train split (`loop=False`, so the pass ends where
the epoch ends) and every target that is not -1 is a predicted token.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kfoundry.config import resolve
from kfoundry.data.loader import PackedLoader
from kfoundry.pipeline import ensure_shards, ensure_tokenizer


def cropped_use(lengths, seq_len: int) -> int:
    """Tokens predicted per epoch when each row is filled with whole documents and the one that does not fit is
    cropped at the row's end (the old loader): a row of seq_len + 1 tokens predicts seq_len of them."""
    predicted, filled = 0, 0
    for n in lengths:
        take = min(int(n), seq_len + 1 - filled)
        filled += take
        if filled == seq_len + 1:
            predicted, filled = predicted + seq_len, 0
    return predicted + max(filled - 1, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=Path, help="a shard directory (default: build the starter corpus's)")
    ap.add_argument("--seq", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--split-chars", type=int, default=0,
                    help="starter only: cut documents into pieces of this many characters first (0 = whole, as "
                         "gpu-124m shards them)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards
        if shards is None:
            cfg = resolve("cpu-tiny", overrides=["data.vocab_size=2048", f"data.split_chars={args.split_chars}"])
            shards = ensure_shards(Path(tmp), cfg, ensure_tokenizer(Path(tmp), cfg, log=lambda m: None),
                                   log=lambda m: None)
        out = {"shards": str(args.shards or f"starter (2,048 vocab, split_chars={args.split_chars})")}
        for seq in args.seq:
            loader = PackedLoader(shards, "train", batch_size=8, seq_len=seq, loop=False)
            predicted = sum(int((y >= 0).sum()) for _, y in loader)
            total = loader.split_tokens
            lengths = loader._lengths[loader.documents(0)]
            out[f"seq_{seq}"] = {"split_tokens": total, "docs": len(lengths),
                                 "loader_use": round(predicted / total, 4),
                                 "cropped_rows_use": round(cropped_use(lengths, seq) / total, 4)}
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
