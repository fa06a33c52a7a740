"""Training tokens/s with 1 process vs 2 torchrun processes (FSDP2, gloo) on this machine, same global batch, for
pretraining and for SFT (the same engine: `--stage sft` fine-tunes the pretrained model on the starter chat set).

Two CPU cores are not a scaling test: this records the figures (and the cost of the collectives), nothing more.
Before the runs, the CPU is probed at 1 and 2 threads while nothing else runs, so that the ranks' MFU (each rank
has one thread and probes while the other trains) is computed against an undisturbed peak.

    .venv/bin/python bench/distributed_throughput.py [--steps 60] [--stage pretrain|sft] [--work runs/bench-dist]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path


def median_window(run: Path, key: str) -> float | None:
    """Median over logged windows, the first (warm-up) window left out."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_sec" in r and r.get("event") is None][1:]
    values = sorted(r[key] for r in rows if r.get(key) is not None)
    return values[len(values) // 2] if values else None


def probe_idle_peaks() -> dict[int, float]:
    import torch

    from kfoundry.train.mfu import cpu_peak_flops
    peaks = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        peaks[threads] = cpu_peak_flops(refresh=True)  # the cache keeps the best probe per thread count
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--work", default="runs/bench-dist")
    ap.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    args = ap.parse_args()
    work = Path(args.work)
    common = ["--preset", "cpu-tiny", "--no-progress", "--set", f"train.max_steps={args.steps}",
              "--set", "train.log_every=10", "--set", f"train.eval_every={args.steps}",
              "--set", f"train.ckpt_every={args.steps}"]
    base = work / "one"
    shutil.rmtree(work, ignore_errors=True)
    peaks = probe_idle_peaks()
    subprocess.run([sys.executable, "-m", "kfoundry", "pretrain", "--out", str(base), *common,
                    "--set", "train.micro_batch_size=8"], check=True)
    two = work / "two"
    subprocess.run([sys.executable, "-m", "kfoundry", "pretrain", "--nproc", "2", "--out", str(two), *common,
                    "--tokenizer", str(base / "tokenizer"), "--shards", str(base / "shards"),
                    "--set", "train.micro_batch_size=4"], check=True)
    if args.stage == "sft":
        base_ckpt = json.loads((base / "metrics.jsonl").read_text().splitlines()[-1])["checkpoint"]
        sft = ["--model", base_ckpt, "--data", "starter", "--preset", "cpu-tiny", "--no-progress",
               "--set", f"train.max_steps={args.steps}", "--set", "train.log_every=10",
               "--set", f"train.eval_every={args.steps}", "--set", f"train.ckpt_every={args.steps}"]
        base, two = work / "sft-one", work / "sft-two"
        subprocess.run([sys.executable, "-m", "kfoundry", "sft", "--out", str(base), *sft,
                        "--set", "train.micro_batch_size=8"], check=True)
        subprocess.run([sys.executable, "-m", "kfoundry", "sft", "--nproc", "2", "--out", str(two), *sft,
                        "--set", "train.micro_batch_size=4"], check=True)
    result = {"stage": args.stage, "cpu_peak_flops_by_threads": peaks,
              "one_process_tokens_per_sec": median_window(base, "tokens_per_sec"),
              "two_processes_tokens_per_sec": median_window(two, "tokens_per_sec"),
              "one_process_mfu": median_window(base, "mfu"), "two_processes_mfu": median_window(two, "mfu")}
    result["ratio"] = result["two_processes_tokens_per_sec"] / result["one_process_tokens_per_sec"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
