"""Bench: log-likelihood requests per second, kfoundry's lm-eval adapter vs lm-eval's own `hf` model.

Both score the same requests (the KoBEST dev documents of the offline pack, built once by lm-eval) with the same
weights: a kfoundry checkpoint and its Hugging Face export. The adapter's edge is in how it runs the tokens
(each question's shared context once, the output head only where a token is scored, batches packed by length);
the arithmetic is the same, which the script checks (max |difference| of the log-likelihoods).

    python bench/eval_adapter.py                      # builds a cpu-tiny-shaped model with a 1024-token context
    python bench/eval_adapter.py --model runs/x/ckpt/step-000400 --limit 200 --device cuda

Prints our figure, the peer's (at batch size 1, lm-eval's default, and at --hf-batch-size), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(work: Path, max_seq_len: int) -> Path:
    """A cpu-tiny-shaped model (random weights: speed does not depend on them) with the starter tokenizer."""
    from kfoundry.checkpoint import save_checkpoint
    from kfoundry.config import resolve
    from kfoundry.model.llama import Transformer
    from kfoundry.pipeline import ensure_tokenizer
    from kfoundry.tokenizer import KTokenizer

    cfg = resolve("cpu-tiny", overrides=[f"model.max_seq_len={max_seq_len}", "model.init_std=0.05"])
    tok = KTokenizer.load(ensure_tokenizer(work, cfg))
    cfg.model.vocab_size = tok.vocab_size
    return save_checkpoint(work / "ckpt", Transformer.build(cfg.model, seed=0), tok, overwrite=True)


def build_requests(kobest_dir: Path, tasks: list[str], limit: int):
    from lm_eval.tasks import TaskManager

    from kfoundry.eval.runner import pack_dir

    tm = TaskManager(include_path=str(pack_dir()), include_defaults=False, metadata={"task_dir": str(kobest_dir)})
    loaded = tm.load(tasks)["tasks"]
    requests = []
    for name, task in sorted(loaded.items()):
        task.build_all_requests(limit=limit)
        requests += task.instances
    return requests


def timed(lm, requests, repeats: int) -> tuple[float, list]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = lm.loglikelihood(requests, disable_tqdm=True)
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="kfoundry checkpoint (default: build a cpu-tiny-shaped one)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="context of the built model")
    p.add_argument("--kobest", default=str(ROOT.parent / "shared" / "data" / "eval" / "kobest"))
    p.add_argument("--tasks", default="kobest_boolq,kobest_copa,kobest_hellaswag,kobest_sentineg,kobest_wic")
    p.add_argument("--limit", type=int, default=40, help="documents per task")
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="best of N timings")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()

    import torch
    from lm_eval.models.huggingface import HFLM

    from kfoundry.eval.lm import KFoundryLM
    from kfoundry.export.hf import export_hf

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = Path(args.model) if args.model else build_model(work, args.max_seq_len)
        hf_dir = export_hf(ckpt, work / "hf")
        requests = build_requests(Path(args.kobest), args.tasks.split(","), args.limit)
        ours = KFoundryLM(model=str(ckpt), device=args.device)
        t_ours, r_ours = timed(ours, requests, args.repeats)
        figures = {"requests": len(requests), "device": args.device, "threads": torch.get_num_threads(),
                   "model_params": ours.model.num_params(), "context": ours.max_length,
                   "ours_req_per_s": len(requests) / t_ours}
        worst = 0.0
        for bs in sorted({1, args.hf_batch_size}):
            hf = HFLM(pretrained=str(hf_dir), device=args.device, dtype="float32", batch_size=bs)
            t_hf, r_hf = timed(hf, requests, args.repeats)
            worst = max(worst, max(abs(a[0] - b[0]) for a, b in zip(r_ours, r_hf)))
            figures[f"hf_bs{bs}_req_per_s"] = len(requests) / t_hf
            figures[f"ratio_vs_hf_bs{bs}"] = t_hf / t_ours
            del hf
        figures["max_abs_loglik_diff"] = worst
    print(json.dumps(figures, indent=2))
    for key in [k for k in figures if k.startswith("ratio")]:
        print(f"{key}: {figures[key]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
