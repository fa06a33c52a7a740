"""Summarise a pretraining run's metrics.jsonl for scripts/gpu_check.sh: one JSON object on stdout.

    python scripts/gpu_check_summary.py RUN/metrics.jsonl

tokens/s is the median of the logged windows after the first two (torch.compile and warm-up land there). MFU is
null when the run had no peak to measure against (a card missing from kfoundry/train/mfu.py's table, or bf16 on
a card without it); `peak_source` then says why.
"""

from __future__ import annotations

import json
import sys


def summarise(rows: list[dict]) -> dict:
    start = next(r for r in rows if r.get("event") == "start")
    end = next(r for r in rows if r.get("event") == "end")
    windows = [r for r in rows if "tokens_per_sec" in r and r.get("event") is None]
    windows = windows[2:] or windows  # a short run keeps its warm-up windows rather than none
    tps = sorted(r["tokens_per_sec"] for r in windows)[len(windows) // 2]
    peak = start.get("peak_flops")
    return {"device": start["device"], "peak_source": start["peak_source"], "params": start["params"],
            "tokens_per_sec_median": tps, "mfu": start["flops_per_token"] * tps / peak if peak else None,
            "peak_memory_gib": end.get("peak_memory_gib"), "final_loss": end["final_loss"]}


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(json.dumps(summarise([json.loads(line) for line in f if line.strip()]), indent=2))
