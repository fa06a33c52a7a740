"""Time for the `cpu-tiny` preset to reach a fixed validation bits-per-byte on the shared NSMC reviews.

Builds a tokenizer and shards for the corpus once (cached in --work), then pretrains and reads the wall-clock
time at which the validation bpb first reached --target from metrics.jsonl.

    .venv/bin/python bench/time_to_bpb.py [--target 2.0] [--steps 600] [--work runs/bench-nsmc]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from kfoundry.config import resolve
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.train.loop import pretrain

SHARED = Path(os.environ.get("KFOUNDRY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", type=float, default=2.0, help="validation bits per byte to reach")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--work", default="runs/bench-nsmc")
    args = ap.parse_args()
    corpus = str(SHARED / "ko" / "nsmc" / "reviews.jsonl.gz")
    work = Path(args.work)
    cfg = resolve("cpu-tiny", overrides=[f"data.corpus={corpus}", f"train.max_steps={args.steps}",
                                         f"train.eval_every={args.eval_every}", "train.eval_batches=8",
                                         f"train.ckpt_every={args.steps}", "data.max_total_chars=20000000"])
    t0 = time.perf_counter()
    tok = ensure_tokenizer(work, cfg)
    shards = ensure_shards(work, cfg, tok)
    prep = time.perf_counter() - t0
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    summary = pretrain(cfg, run, shard_dir=shards, tokenizer_dir=tok, progress=False)
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val_bpb"' in x]
    hit = next((e for e in evals if e["val_bpb"] <= args.target), None)
    result = {
        "target_bpb": args.target,
        "reached": hit is not None,
        "seconds_to_target": hit["elapsed_s"] if hit else None,
        "step_at_target": hit["step"] if hit else None,
        "tokens_at_target": hit["tokens"] if hit else None,
        "final_val_bpb": evals[-1]["val_bpb"] if evals else None,
        "train_seconds": summary["train_seconds"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "mfu": summary["mfu"],
        "prep_seconds_tokenizer_and_shards": prep,
        "curve": [(e["step"], round(e["elapsed_s"], 1), round(e["val_bpb"], 4)) for e in evals],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
