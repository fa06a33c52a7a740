"""Growth experiment: depth up-scaling (SOLAR) + continued pretraining vs training the big model from scratch.

On a subset of the shared NSMC corpus (Korean movie reviews):

    path A (up-scaled):  train an n-layer parent -> `upscale --drop m` to 2(n - m) layers -> `pretrain --init`
    path B (scratch):    train a 2(n - m)-layer model from random initialisation

Both paths use the real pipeline (kfoundry.train.loop.pretrain, kfoundry.model.upscale), the same tokenizer,
shards, batch shape and validation set. Compute is counted as `model.flops_per_token(seq_len) * tokens` for
every training step, and the parent's training counts against path A. By default the continuation is sized so
that both paths spend the same total compute; the question is whether path A reaches path B's final validation
bits per byte earlier (goal: less total compute).

    .venv/bin/python bench/growth_dus.py --threads 1 --plot docs/growth_dus.png --json /tmp/growth.json

On a shared 2-core machine use --threads 1 (two threads under contention spin and run several times slower).
Defaults took about 21 minutes there under a load average of 10-14. `--work DIR` keeps the runs; running again
with the same DIR reuses every finished run whose settings match (and retrains what depends on a changed one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from kfoundry.checkpoint import load_model
from kfoundry.config import RunConfig, resolve, to_dict
from kfoundry.corpus import CorpusStats, iter_documents
from kfoundry.data.shards import write_shards
from kfoundry.convert.upscale import upscale_checkpoint
from kfoundry.tokenizer import KTokenizer, train_tokenizer
from kfoundry.train import loop
from kfoundry.train.evaluation import evaluate

ROOT = Path(__file__).resolve().parents[1]
NSMC = "ko/nsmc/reviews.jsonl.gz"


def shared_data() -> Path:
    return Path(os.environ.get("KFOUNDRY_SHARED_DATA", ROOT.parent / "shared" / "data"))


def prepare_data(work: Path, args) -> tuple[Path, Path, dict]:
    """Tokenizer and shards from every `--every`-th review (spread over all movies; the file is sorted by movie)."""
    record = work / "data.json"
    if record.is_file() and (work / "shards" / "meta.json").is_file():  # a finished earlier preparation
        return work / "tokenizer", work / "shards", json.loads(record.read_text(encoding="utf-8"))
    corpus = shared_data() / NSMC
    if not corpus.is_file():
        sys.exit(f"NSMC not found at {corpus} (set KFOUNDRY_SHARED_DATA)")
    stats = CorpusStats()
    docs = list(itertools.islice(iter_documents(str(corpus), stats), 0, args.every * args.reviews, args.every))
    tok = train_tokenizer((d.text for d in docs), args.vocab)
    tok.save(work / "tokenizer")
    meta = write_shards(docs, tok, work / "shards", val_fraction=args.val_fraction, seed=0, stats=stats,
                        overwrite=True)
    data = {"reviews": len(docs), "chars": sum(len(d.text) for d in docs),
            "train_tokens": meta["splits"]["train"]["tokens"], "val_tokens": meta["splits"]["val"]["tokens"]}
    record.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return work / "tokenizer", work / "shards", data


def run_config(args, *, layers: int, steps: int, warmup: int, lr: float, seed: int) -> RunConfig:
    return resolve("cpu-tiny", overrides=[
        f"model.vocab_size={args.vocab}", f"data.vocab_size={args.vocab}", f"model.dim={args.dim}",
        f"model.n_layers={layers}", f"model.n_heads={args.heads}", f"model.n_kv_heads={args.heads}",
        f"model.ffn_dim={3 * args.dim}", f"model.max_seq_len={args.seq_len}", "model.tie_embeddings=true",
        f"train.seq_len={args.seq_len}", f"train.micro_batch_size={args.batch}", f"train.max_steps={steps}",
        f"train.warmup_steps={warmup}", f"train.lr={lr}", f"train.eval_every={args.eval_every}",
        f"train.eval_batches={args.eval_batches}", f"train.ckpt_every={10 ** 9}", "train.log_every=5",
        f"train.seed={seed}", "train.device=cpu",
    ])


def curve(run_dir: Path, flops_per_token: float, tokens_per_step: int, offset: float = 0.0) -> list[dict]:
    """(step, total training FLOPs so far, val bpb) for every evaluation of a run."""
    points = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if "val_bpb" in rec:
            points.append({"step": rec["step"], "flops": offset + rec["step"] * tokens_per_step * flops_per_token,
                           "bpb": rec["val_bpb"]})
    return points


def finished(run_dir: Path, cfg: RunConfig, init: Path | None) -> dict | None:
    """The summary of a finished earlier run with the same training settings (so --work can be reused), else None."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "run_config.json"
    if not (metrics.is_file() and config.is_file()):
        return None
    recorded = json.loads(config.read_text(encoding="utf-8"))
    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    end = next((r for r in reversed(records) if r.get("event") == "end"), None)
    now = to_dict(cfg)
    # Compare the fields both versions know: a field added to the config later (with its default) is no change.
    agree = lambda a, b: all(a[k] == b[k] for k in a.keys() & b.keys())  # noqa: E731
    same = agree(recorded["train"], now["train"]) and (init is not None or agree(recorded["model"], now["model"]))
    if not same or end is None or end["step"] != cfg.train.max_steps or not Path(end["checkpoint"]).is_dir():
        return None
    return {**end, "eval": next(r for r in reversed(records) if "val_bpb" in r)}


def train(name: str, cfg: RunConfig, work: Path, tok_dir: Path, shards: Path, init: Path | None = None,
          reuse: bool = True) -> dict:
    t0 = time.perf_counter()
    summary = finished(work / name, cfg, init) if reuse else None
    reused = summary is not None
    if summary is None:
        shutil.rmtree(work / name, ignore_errors=True)  # never append to a stale run
        summary = loop.pretrain(cfg, work / name, shard_dir=shards, tokenizer_dir=tok_dir, init=init,
                                progress=False, log=lambda m: None)
    model = load_model(summary["checkpoint"])
    fpt = model.flops_per_token(cfg.train.seq_len)
    print(f"  {name}: {model.cfg.n_layers} layers, {model.num_params():,} params, {summary['step']} steps, "
          f"{summary['tokens_seen']:,} tokens, final val bpb {summary['eval']['val_bpb']:.4f} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return {"summary": summary, "flops_per_token": fpt, "params": model.num_params(), "layers": model.cfg.n_layers,
            "flops": summary["tokens_seen"] * fpt, "reused": reused}


# "Less compute" must beat the one-step rounding of the compute-matched continuation (~0.3%); 2% is clearly more.
LESS = 0.98


def verdict(scratch_flops: float, target: float, paths: list[dict]) -> dict:
    """The cheapest point of any up-scaled path (eval points within runs, or a run's end) at or below the target."""
    hits = [p for path in paths for p in path["points"] if p["bpb"] <= target]
    best = min(hits, key=lambda p: p["flops"]) if hits else None
    return {"target_bpb": target, "reached_at_flops": best["flops"] if best else None,
            "compute_ratio": best["flops"] / scratch_flops if best else None,
            "goal_met": bool(best) and best["flops"] <= LESS * scratch_flops}


def plot(path: Path, scratch: list[dict], parent: list[dict], grown: list[tuple[str, list[dict]]], shock: dict,
         target: float, scratch_label: str, parent_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    pf = lambda pts: [p["flops"] / 1e12 for p in pts]  # noqa: E731
    pb = lambda pts: [p["bpb"] for p in pts]  # noqa: E731
    ax.plot(pf(scratch), pb(scratch), "o-", ms=3, color="tab:gray", label=scratch_label)
    ax.plot(pf(parent), pb(parent), "o-", ms=3, color="tab:blue", label=parent_label)
    ax.plot([parent[-1]["flops"] / 1e12] * 2, [parent[-1]["bpb"], shock["bpb"]], "x:", color="tab:red",
            label=f"up-scaled, before training ({shock['bpb']:.3f})")
    for (label, pts), color in zip(grown, ("tab:orange", "tab:green", "tab:purple", "tab:brown")):
        ax.plot(pf([shock, *pts]), pb([shock, *pts]), "o-", ms=3, color=color, label=label)
    ax.axhline(target, ls="--", lw=0.8, color="tab:gray")
    ax.set_xlabel("total training compute, TFLOPs (the parent's included)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Depth up-scaling vs from scratch (NSMC subset)")
    every = pb(scratch) + pb(parent) + [p["bpb"] for _, pts in grown for p in pts]
    ax.set_ylim(min(every) - 0.03, min(every) + 0.55)  # the first evals (near-unigram) would flatten the rest
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="parent depth n")
    p.add_argument("--drop", type=int, default=1, help="m: the child has 2(n - m) layers")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--scratch-steps", type=int, default=300, help="steps of the from-scratch 2(n-m)-layer model")
    p.add_argument("--parent-steps", type=int, default=150)
    p.add_argument("--cont-fractions", default="1.0,0.8",
                   help="continuation budgets, as fractions of the one that matches the scratch compute; each is "
                        "its own run with its own schedule")
    p.add_argument("--cont-warmup", type=int, default=10, help="re-warmup steps of the continuation")
    p.add_argument("--cont-lr", type=float, default=2e-3, help="peak learning rate of the continuation")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=6)
    p.add_argument("--every", type=int, default=4, help="take every k-th review")
    p.add_argument("--reviews", type=int, default=160_000, help="number of reviews in the subset")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one); finished runs in "
                                                "it with the same settings are reused")
    p.add_argument("--plot", default=None, help="write the plot (PNG) here")
    p.add_argument("--json", default=None, help="write all numbers here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = [float(f) for f in args.cont_fractions.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="growth-dus-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    child_layers = 2 * (args.layers - args.drop)
    tokens_per_step = args.batch * args.seq_len

    print(f"work dir {work}; torch threads {torch.get_num_threads()}", flush=True)
    tok_dir, shards, data = prepare_data(work, args)
    print(f"data: {data} ({time.perf_counter() - t_start:.0f} s)", flush=True)

    scratch_cfg = run_config(args, layers=child_layers, steps=args.scratch_steps, warmup=args.scratch_steps // 10,
                             lr=args.lr, seed=1)
    parent_cfg = run_config(args, layers=args.layers, steps=args.parent_steps, warmup=args.parent_steps // 10,
                            lr=args.lr, seed=1)
    scratch = train("scratch", scratch_cfg, work, tok_dir, shards)
    parent = train("parent", parent_cfg, work, tok_dir, shards)

    child = upscale_checkpoint(parent["summary"]["checkpoint"], work / "child", drop=args.drop, overwrite=True)
    child_model = load_model(child)
    child_fpt = child_model.flops_per_token(args.seq_len)
    matched = round((scratch["flops"] - parent["flops"]) / (child_fpt * tokens_per_step))
    if matched < 1:
        sys.exit("the parent alone already spends the scratch budget; lower --parent-steps")
    tok = KTokenizer.load(tok_dir)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long)
    # The seam's shock: the stacked model before any continued training.
    tc = scratch_cfg.train
    shock_eval = evaluate(child_model, shards, batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                          max_batches=tc.eval_batches, token_bytes=token_bytes, device=torch.device("cpu"))
    shock = {"step": 0, "flops": parent["flops"], "bpb": shock_eval["bpb"]}
    print(f"  upscaled {args.layers} -> {child_layers} layers: val bpb {shock['bpb']:.4f} before continuing "
          f"(parent {parent['summary']['eval']['val_bpb']:.4f}); compute-matched continuation: {matched} steps",
          flush=True)

    paths = []
    for f in fractions:
        steps = max(1, round(f * matched))
        name = "continued" if f == 1.0 else f"continued-x{f:g}"
        # A new data order (seed 2) for the continuation, so it does not replay the parent's batches first.
        cfg = run_config(args, layers=child_layers, steps=steps, warmup=args.cont_warmup, lr=args.cont_lr, seed=2)
        # A continuation is reused only if its parent was: a retrained parent makes a different child.
        run = train(name, cfg, work, tok_dir, shards, init=child, reuse=parent["reused"])
        pts = curve(work / name, run["flops_per_token"], tokens_per_step, offset=parent["flops"])
        paths.append({"name": name, "fraction": f, "steps": steps, "flops": run["flops"],
                      "total_flops": parent["flops"] + run["flops"], "final_bpb": pts[-1]["bpb"], "points": pts})

    scratch_pts = curve(work / "scratch", scratch["flops_per_token"], tokens_per_step)
    parent_pts = curve(work / "parent", parent["flops_per_token"], tokens_per_step)
    target = scratch_pts[-1]["bpb"]
    result = {
        "data": data, "args": vars(args), "child_layers": child_layers,
        "scratch": {"params": scratch["params"], "flops_per_token": scratch["flops_per_token"],
                    "flops": scratch["flops"], "final_bpb": target, "points": scratch_pts},
        "parent": {"params": parent["params"], "flops_per_token": parent["flops_per_token"], "flops": parent["flops"],
                   "final_bpb": parent_pts[-1]["bpb"], "points": parent_pts},
        "upscaled_before_training_bpb": shock["bpb"],
        "continued": paths,
        **verdict(scratch["flops"], target, [{"points": parent_pts}, *paths]),
        "seconds": time.perf_counter() - t_start,
    }

    print("\nvalidation bpb vs total training compute (TFLOPs; the up-scaled path includes its parent)")
    print(f"  from scratch, {child_layers} layers:  {scratch['flops'] / 1e12:6.3f} -> bpb {target:.4f}  (1.00x)")
    for path in paths:
        print(f"  up-scaled {args.layers} -> {child_layers}, {path['steps']:4d} continued steps:"
              f"  {path['total_flops'] / 1e12:6.3f} -> bpb {path['final_bpb']:.4f}  "
              f"({path['total_flops'] / scratch['flops']:.2f}x)")
    if result["reached_at_flops"]:
        print(f"  the up-scaled path first reaches {target:.4f} at {result['reached_at_flops'] / 1e12:.3f} TFLOPs: "
              f"{result['compute_ratio']:.3f}x the from-scratch compute")
    else:
        print(f"  the up-scaled path never reaches {target:.4f}")
    print(f"  goal (the from-scratch final bpb with at least {1 - LESS:.0%} less total compute) met: "
          f"{result['goal_met']}")
    print(f"  total wall time {result['seconds'] / 60:.1f} min")
    if args.plot:
        plot(Path(args.plot), scratch_pts, parent_pts,
             [(f"up-scaled to {child_layers} + {q['steps']} steps ({q['total_flops'] / scratch['flops']:.2f}x)",
               q["points"]) for q in paths],
             shock, target, f"from scratch, {child_layers} layers", f"parent, {args.layers} layers")
        print(f"  plot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
