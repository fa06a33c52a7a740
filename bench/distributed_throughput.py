"""Training tokens/s with 1 process vs 2 torchrun processes (FSDP2, gloo) on this machine, same global batch.

Two CPU cores are not a scaling test: this records the figures (and the cost of the collectives), nothing more.

    .venv/bin/python bench/distributed_throughput.py [--steps 60] [--work runs/bench-dist]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def median_tps(run: Path) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    tps = sorted(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r and r.get("event") is None)[1:]
    return tps[len(tps) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="runs/bench-dist")
    args = ap.parse_args()
    work = Path(args.work)
    common = ["--preset", "cpu-tiny", "--no-progress", "--set", f"train.max_steps={args.steps}",
              "--set", "train.log_every=10", "--set", f"train.eval_every={args.steps}",
              "--set", f"train.ckpt_every={args.steps}"]
    base = work / "one"
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "kfoundry", "pretrain", "--out", str(base), *common,
                    "--set", "train.micro_batch_size=8"], check=True)
    two = work / "two"
    subprocess.run([sys.executable, "-m", "kfoundry", "pretrain", "--nproc", "2", "--out", str(two), *common,
                    "--tokenizer", str(base / "tokenizer"), "--shards", str(base / "shards"),
                    "--set", "train.micro_batch_size=4"], check=True)
    result = {"one_process_tokens_per_sec": median_tps(base), "two_processes_tokens_per_sec": median_tps(two)}
    result["ratio"] = result["two_processes_tokens_per_sec"] / result["one_process_tokens_per_sec"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
