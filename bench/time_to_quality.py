"""Time to quality: our default training recipe against the standard one, on held-out Korean text.

    python bench/time_to_quality.py --eval-text FILE [--quick] [--json OUT] [--sizes tiny,20m] [--seeds 1,2]

What runs, for each model size and seed (identical shape, data, token budget and seeds on both sides):

- **baseline**, the recipe a user would pick instead: AdamW (β 0.9/0.95, weight decay 0.1 on matrices, eps 1e-8),
  linear warmup over 10% of the steps, cosine to 10% of the peak, the model's default initialisation (normal
  0.02, residual outputs scaled by 1/sqrt(2·layers) as GPT-2/torchtitan do), the old cpu-tiny batch. Its
  learning rate is swept over `--baseline-lrs` (≥ 4 values); the one with the lowest bits per byte on the
  *tuning* text (FLORES-200 dev, Korean) is kept. Its final bits per byte on `--eval-text` is the target.
- **ours**: the optimizer, learning rates, schedule, warmup and batch of the `cpu-tiny` preset (our default).
  Its schedule is warmup-stable-decay, so one stable run serves every shorter budget: at each fraction f of the
  budget in `--fractions` a copy branches off and cools down as a run of budget f would (the last
  `decay_frac` of f), and is scored. The first f that reaches the target gives the tokens, FLOPs and
  wall-clock "ours needed"; a user who trains with budget f spends exactly that.

Quality is bits per byte on `--eval-text` (Korean; never trained or tuned on). Data: the shared NSMC reviews
(Korean) and Tiny Shakespeare (English), mixed 9:1 by characters, tokenized once into `--work` with a BPE of
4,096 tokens trained on the same mix.

Compute is FLOPs: 6·(matmul weights)·tokens plus attention (Transformer.flops_per_token), plus Muon's
Newton-Schulz FLOPs per optimizer step (optim.optimizer_flops_per_step). FLOP ratios do not depend on the
machine's load; wall-clock ratios do: in one process the runs follow each other, and with `--cache` each side
can run as its own process at the same time (then combined by a last call), but a busy shared machine makes
wall-clock noisy either way. The load average is recorded with every run, and so is each run's CPU time: with
one thread per process (OMP_NUM_THREADS=1) it is close to the time the run takes on a core of its own, so the
CPU-time ratio is steadier across loads than the wall-clock ratio. It is not exact: cache contention inflates it,
and runs doing the same FLOPs side by side took up to 1.8x apart (docs/benchmarks.md).

The last line printed is the ratios (ours / baseline) per size, and their worst case.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kfoundry.config import ModelConfig, TrainConfig, preset, resolve
from kfoundry.data.loader import PackedLoader
from kfoundry.fileio import sha256_file
from kfoundry.model.llama import Transformer
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.text import nfc
from kfoundry.tokenizer import KTokenizer
from kfoundry.train.optim import apply_lr, build_optimizer, optimizer_flops_per_step

SHARED = Path(os.environ.get("KFOUNDRY_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LN2 = math.log(2)

# Shapes. `tiny` is the cpu-tiny preset's model; `20m` is a ~20M-parameter model with the same vocabulary.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},  # filled from the preset below
    "20m": dict(vocab_size=4096, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=256,
                tie_embeddings=True),
}
# Token budgets: cpu-tiny's 400 steps x 8 rows x 256 tokens (the speedrun's default); the 20M model gets 100 steps
# (204,800 tokens, 0.01 tokens/param: far below compute-optimal, but its whole protocol, four baseline rates and
# ours for two seeds and again at 4x, fits this 2-core machine in a session; a GPU takes --budget-mult 10 and up).
BUDGET = {"tiny": 819_200, "20m": 204_800}
# The standard recipe's batch (rows of 256 tokens), warmup share and schedule.
BASELINE = dict(optimizer="adamw", beta1=0.9, beta2=0.95, weight_decay=0.1, schedule="cosine", min_lr_ratio=0.1,
                micro_batch_size=8, grad_clip=1.0)
BASELINE_WARMUP = 0.1
# Model settings that are part of a training recipe rather than the shape: `--ours-set model.qk_norm=true` changes
# them for ours alone; the baseline keeps the standard ones (no QK-norm, normal(0, 0.02)).
RECIPE_MODEL_KEYS = ("qk_norm", "init_std")
# Settings added after runs were first cached: left out of a run's identity while at their default, so a run cached
# before they existed (which trained exactly as the default does) is still found.
ADDED_LATER = {"z_loss": 0.0, "muon_ns_steps": 5}


def load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# ---------------------------------------------------------------------------------------------------------
# Data and scoring


def prepare(work: Path, log) -> tuple[Path, Path]:
    corpus = f"{SHARED / 'ko' / 'nsmc' / 'reviews.jsonl.gz'}:0.9,{SHARED / 'en' / 'tinyshakespeare' / 'input.txt'}:0.1"
    cfg = resolve("cpu-tiny", overrides=[f"data.corpus={corpus}", "data.max_total_chars=20000000",
                                         "data.val_fraction=0.02"])
    tok = ensure_tokenizer(work, cfg, log=log)
    return tok, ensure_shards(work, cfg, tok, log=log)


def text_windows(path: Path, tok: KTokenizer, seq_len: int, max_tokens: int) -> torch.Tensor:
    """A text file as rows of seq_len+1 tokens: one document per non-empty line, each [BOS] text [EOS], as the
    shards store them, packed back to back and cut into non-overlapping windows."""
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    lines = [nfc(x).strip() for x in path.read_text(encoding="utf-8").splitlines()]
    stream: list[int] = []
    for ids in tok.encode_batch([x for x in lines if x], bos=True, eos=True):
        stream += ids
        if len(stream) >= max_tokens + seq_len + 1:
            break
    n = min(len(stream) - 1, max_tokens) // seq_len
    if n == 0:
        raise ValueError(f"{path} is too short to score (needs more than {seq_len} tokens)")
    return torch.tensor([stream[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])


def autocast(device: torch.device):
    """bf16 autocast on a GPU (how kfoundry's GPU presets train), plain fp32 on the CPU (how cpu-tiny trains)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


@torch.no_grad()
def bits_per_byte(model: Transformer, rows: torch.Tensor, token_bytes: torch.Tensor, batch: int = 16) -> float:
    """Total loss in bits over total UTF-8 bytes of the predicted tokens (special tokens excluded)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    rows, token_bytes = rows.to(device), token_bytes.to(device)
    nats = nbytes = 0.0
    for i in range(0, len(rows), batch):
        x, y = rows[i: i + batch, :-1], rows[i: i + batch, 1:]
        with autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        b = token_bytes[y.flatten()]
        nats += float(loss[b > 0].double().sum())
        nbytes += float(b[b > 0].double().sum())
    model.train(was)
    return nats / nbytes / LN2


# ---------------------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass
class Run:
    """One training run's state: model, optimizer, loader position, counters."""

    model: Transformer
    opt: torch.optim.Optimizer
    loader: PackedLoader
    batches: Any
    tc: TrainConfig
    step: int = 0
    tokens: int = 0
    seconds: float = 0.0  # training wall-clock only (evaluation excluded)
    # The process's CPU time over the same spans: with one thread (OMP_NUM_THREADS=1) it is close to what the run
    # takes on a core of its own, so runs made at different loads compare better than by wall-clock (not exactly).
    cpu_seconds: float = 0.0

    @classmethod
    def start(cls, mcfg: ModelConfig, tc: TrainConfig, shards: Path, seed: int,
              device: torch.device = torch.device("cpu")) -> "Run":
        torch.manual_seed(seed)
        model = Transformer.build(copy.deepcopy(mcfg), seed=seed).to(device)  # drawn on the CPU: same start anywhere
        model.train()
        loader = PackedLoader(shards, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=seed)
        return cls(model, build_optimizer(model, tc, device.type), loader, iter(loader), tc)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train_until(self, step: int, schedule: TrainConfig | None = None) -> None:
        """Optimizer steps up to `step`, with the learning rates of `schedule` (default: the run's own)."""
        sched, device = schedule or self.tc, self.device
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        while self.step < step:
            apply_lr(self.opt, self.step, sched)
            x, y = (t.to(device, non_blocking=True) for t in next(self.batches))
            with autocast(device):
                loss = self.model(x, y, z_loss=self.tc.z_loss)
            loss.backward()
            if self.tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens += x.numel()
            # Checked in batches of steps: reading a loss waits for the GPU, which would serialise the launches.
            losses.append(loss.detach())
            if len(losses) == 50 or self.step == step:
                if not torch.isfinite(torch.stack(losses)).all():
                    raise FloatingPointError(f"loss is not finite within steps {self.step - len(losses) + 1}-{self.step}")
                losses.clear()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds += time.perf_counter() - t0
        self.cpu_seconds += time.process_time() - c0

    def branch(self) -> "Run":
        """An independent copy (weights, optimizer moments, data position) to cool down from here."""
        model = copy.deepcopy(self.model)
        opt = build_optimizer(model, self.tc, self.device.type)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))  # load shares tensors: copy
        loader = PackedLoader(self.loader.shard_dir, split="train", batch_size=self.tc.micro_batch_size,
                              seq_len=self.tc.seq_len, seed=self.loader.seed)
        loader.load_state_dict(self.loader.state_dict())
        return Run(model, opt, loader, iter(loader), self.tc, self.step, self.tokens, self.seconds, self.cpu_seconds)

    def flops(self, per_token: float, per_step: float) -> float:
        return per_token * self.tokens + per_step * self.step


def baseline_cfg(seq_len: int, lr: float, steps: int) -> TrainConfig:
    """A fresh TrainConfig: nothing of our recipe (per-group rates, Muon) leaks into the baseline."""
    return TrainConfig(seq_len=seq_len, **BASELINE, lr=lr, max_steps=steps,
                       warmup_steps=max(1, round(BASELINE_WARMUP * steps)))


def ours_cfg(tc0: TrainConfig, budget: int) -> TrainConfig:
    """The cpu-tiny preset's recipe, its step count set by the budget (warmup keeps its share of the steps)."""
    steps = budget // (tc0.micro_batch_size * tc0.seq_len)
    warm = round(tc0.warmup_steps / tc0.max_steps * steps) if tc0.warmup_steps else 0
    return dataclasses.replace(tc0, max_steps=steps, warmup_steps=warm)


def run_size(size: str, seed: int, budget: int, lrs: list[float], fractions: list[float], data: dict, log,
             ours_set: list[str], cache: Path | None, skip_ours: bool = False) -> dict:
    base = resolve("cpu-tiny", overrides=ours_set)
    shape = dataclasses.replace(preset("cpu-tiny").model, **SIZES[size])
    moved = [k for k in dataclasses.asdict(shape) if k not in RECIPE_MODEL_KEYS
             and getattr(base.model, k) != getattr(preset("cpu-tiny").model, k)]
    if moved:
        raise ValueError(f"--ours-set may change the model's recipe ({', '.join(RECIPE_MODEL_KEYS)}), not its shape "
                         f"(model.{moved[0]}): both sides train the same shape")
    standard = ModelConfig()
    mcfg = dataclasses.replace(shape, **{k: getattr(standard, k) for k in RECIPE_MODEL_KEYS})  # the baseline's
    ours_mcfg = dataclasses.replace(shape, **{k: getattr(base.model, k) for k in RECIPE_MODEL_KEYS})
    tc0 = base.train
    score = lambda m, rows: bits_per_byte(m, rows, data["token_bytes"])  # noqa: E731
    per_token = Transformer.build(copy.deepcopy(mcfg), device="meta").flops_per_token(tc0.seq_len)

    # -- baseline: the lr sweep, the best kept by the tuning text ------------------------------------------
    b_steps = budget // (BASELINE["micro_batch_size"] * tc0.seq_len)
    sweep = []
    for lr in lrs:
        tc = baseline_cfg(tc0.seq_len, lr, b_steps)
        row = cached_run(cache, [identity(mcfg), identity(tc), seed, data["key"]],
                         lambda: baseline_run(mcfg, tc, seed, data, per_token, score))
        if row is None:
            log(f"[{size} seed {seed}] baseline lr={lr:g}: not in the cache (--cached-only), left out")
            continue
        sweep.append(row)
        log(f"[{size} seed {seed}] baseline lr={lr:g}: tune {row['tune_bpb']:.4f}  eval {row['eval_bpb']:.4f}  "
            f"{row['seconds']:.0f}s  {'(cached)' if row.get('cached') else ''} load {row['load']}")
    # No baseline (--baseline-lrs ''): ours alone, e.g. for an ablation compared with a baseline run earlier.
    best = min(sweep, key=lambda s: s["tune_bpb"]) if sweep else {"eval_bpb": -math.inf, "tune_bpb": -math.inf}
    target = best["eval_bpb"]
    at_edge = at_sweep_edge(sweep, best)
    if at_edge:
        log(f"[{size} seed {seed}] WARNING: the kept baseline lr {best['lr']:g} is at the edge of the sweep "
            f"({', '.join(format(r['lr'], 'g') for r in sweep)}): extend --baseline-lrs past it before trusting the "
            "ratios")

    # -- ours: one stable trunk, a cooldown branch per budget fraction ------------------------------------
    tc = ours_cfg(tc0, budget)
    if tc.schedule != "wsd" and sorted(fractions) != [1.0]:
        raise ValueError("branching shorter budgets off one run needs train.schedule=wsd; "
                         "with another schedule pass --fractions 1.0 (the full budget only)")
    per_step = optimizer_flops_per_step(Transformer.build(copy.deepcopy(ours_mcfg), device="meta"), tc)
    branches = [] if skip_ours else cached_run(
        cache, [identity(ours_mcfg), identity(tc), seed, sorted(fractions), data["key"]],
        lambda: ours_branches(ours_mcfg, tc, seed, fractions, data, per_token, per_step, score, size, log)) or []
    reached = next((b for b in branches if b["eval_bpb"] <= target), None)
    # The same question on the tuning text: what the ablations are judged by.
    reached_tune = next((b for b in branches if b["tune_bpb"] <= best["tune_bpb"]), None)
    full = next((b for b in branches if b["fraction"] == 1.0), None)
    out = {"size": size, "seed": seed, "params": sum(p.numel() for p in Transformer.build(copy.deepcopy(mcfg), device="meta").parameters()), "budget_tokens": budget,
           "flops_per_token": per_token, "muon_flops_per_step": per_step,
           "ours_recipe": {**_recipe(tc), **{f"model.{k}": getattr(ours_mcfg, k) for k in RECIPE_MODEL_KEYS}},
           "baseline_sweep": sweep, "baseline_best_lr": best.get("lr"), "target_eval_bpb": target,
           "baseline": best, "baseline_lr_at_edge": at_edge, "ours_branches": branches, "ours_full_budget": full, "reached": reached,
           "reached_tune": reached_tune}
    if reached:
        out["ratios"] = ratios(reached, best)
    if reached_tune:
        out["ratios_tune"] = ratios(reached_tune, best)
    return out


def at_sweep_edge(sweep: list[dict], best: dict) -> bool:
    """Whether the kept rate is the lowest or highest swept (of two or more): then the best rate may lie outside
    the grid, and the baseline is not tuned yet."""
    lrs = [r["lr"] for r in sweep]
    return len(lrs) > 1 and best["lr"] in (min(lrs), max(lrs))


def ratios(ours: dict, base: dict) -> dict[str, float]:
    """ours / baseline for tokens, FLOPs, wall-clock and (when both runs recorded it) CPU seconds."""
    keys = ["tokens", "flops", "seconds"] + (["cpu_seconds"] if "cpu_seconds" in ours and "cpu_seconds" in base else [])
    return {k: ours[k] / base[k] for k in keys}


def identity(settings) -> dict[str, Any]:
    """A config dataclass as part of a cache key (see ADDED_LATER)."""
    return {k: v for k, v in dataclasses.asdict(settings).items() if not (k in ADDED_LATER and v == ADDED_LATER[k])}


CACHED_ONLY = False  # --cached-only: a run missing from the cache is left out (None), never computed


def cached_run(cache: Path | None, identity: list, compute) -> Any:
    """`compute()`, or its result from an earlier run with the same identity when `cache` is set. Lets the
    baseline's learning rates and our run go to separate processes that run at the same time (same load)."""
    if cache is None:
        return compute()
    path = cache / (hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    if path.is_file():
        out = json.loads(path.read_text())
        return [{**r, "cached": True} for r in out] if isinstance(out, list) else {**out, "cached": True}
    if CACHED_ONLY:
        return None
    out = compute()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out) + "\n")
    return out


def baseline_run(mcfg, tc, seed, data, per_token, score) -> dict:
    r = Run.start(mcfg, tc, data["shards"], seed, data["device"])
    r.train_until(tc.max_steps)
    return {"lr": tc.lr, "tune_bpb": score(r.model, data["tune"]), "eval_bpb": score(r.model, data["eval"]),
            "val_bpb": score(r.model, data["val"]), "seconds": r.seconds,
            "cpu_seconds": r.cpu_seconds, "tokens": r.tokens,
            "flops": r.flops(per_token, 0.0), "load": load()}


def ours_branches(mcfg, tc, seed, fractions, data, per_token, per_step, score, size, log) -> list[dict]:
    trunk = Run.start(mcfg, tc, data["shards"], seed, data["device"])
    branches = []
    for f in sorted(fractions):
        steps_f = round(f * tc.max_steps)
        sched = dataclasses.replace(tc, max_steps=steps_f)  # a run whose whole budget is f
        cool = max(1, round(tc.decay_frac * steps_f))
        trunk.train_until(steps_f - cool)
        b = trunk.branch()
        b.train_until(steps_f, schedule=sched)
        row = {"fraction": f, "steps": b.step, "tokens": b.tokens, "flops": b.flops(per_token, per_step),
               "seconds": b.seconds, "cpu_seconds": b.cpu_seconds, "eval_bpb": score(b.model, data["eval"]), "tune_bpb": score(b.model, data["tune"]),
               "load": load()}
        if f == 1.0:
            row["val_bpb"] = score(b.model, data["val"])
        branches.append(row)
        log(f"[{size} seed {seed}] ours at {f:.2f} of the budget: eval {row['eval_bpb']:.4f} "
            f"tune {row['tune_bpb']:.4f}  {b.seconds:.0f}s  load {row['load']}")
    return branches


def _recipe(tc: TrainConfig) -> dict[str, Any]:
    keys = ("optimizer", "lr", "muon_lr", "muon_momentum", "muon_weight_decay", "muon_ns_steps", "embed_lr", "head_lr", "norm_lr",
            "schedule", "decay_frac", "min_lr_ratio", "warmup_steps", "max_steps", "micro_batch_size",
            "weight_decay", "beta1", "beta2", "grad_clip", "z_loss")
    return {k: getattr(tc, k) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval-text", required=True, help="Korean text, one document per line, never trained on")
    ap.add_argument("--tune-text", default=str(SHARED / "flores200" / "dev" / "kor_Hang.dev"),
                    help="text that picks the baseline's learning rate (default: FLORES-200 dev, Korean)")
    ap.add_argument("--quick", action="store_true", help="one size (tiny), one seed, a quarter of the budget")
    ap.add_argument("--sizes", default="tiny,20m")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--budget-mult", type=float, default=1.0, help="multiply every token budget (4 for the 4x check)")
    # 1e-2 bounds the grid from above: at a quarter of the tiny budget 6e-3 can be best (seed 1)
    ap.add_argument("--baseline-lrs", default="1e-3,2e-3,3e-3,6e-3,1e-2")
    ap.add_argument("--fractions", default="0.4,0.5,0.6,0.7,0.8,1.0")
    ap.add_argument("--eval-tokens", type=int, default=32768, help="tokens scored of each text")
    ap.add_argument("--work", default="runs/bench-ttq")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                    help="change our recipe for an ablation, e.g. train.muon_lr=0.05 (repeatable)")
    ap.add_argument("--cache", action="store_true",
                    help="reuse runs already in --work/cache with the same settings (each baseline lr and our run "
                         "are cached separately, so they can run as parallel processes and be combined after)")
    ap.add_argument("--skip-ours", action="store_true", help="only the baseline runs (to fill the cache)")
    ap.add_argument("--cached-only", action="store_true",
                    help="with --cache: combine what is cached, leaving out (and naming) any run not there")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda (bf16 autocast, as kfoundry's GPU presets train; weights drawn on the CPU)")
    args = ap.parse_args()
    global CACHED_ONLY
    CACHED_ONLY = args.cached_only
    device = torch.device(args.device)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731

    sizes, seeds = args.sizes.split(","), [int(s) for s in args.seeds.split(",")]
    mult = args.budget_mult
    if args.quick:
        sizes, seeds, mult = ["tiny"], seeds[:1], mult * 0.25
    lrs = [float(x) for x in args.baseline_lrs.split(",") if x]
    fractions = [float(x) for x in args.fractions.split(",")]
    if 1.0 not in fractions:
        fractions.append(1.0)
    SIZES["tiny"] = dataclasses.asdict(preset("cpu-tiny").model)
    for s in sizes:
        if s not in SIZES:
            raise ValueError(f"unknown size {s!r}; choose from {', '.join(SIZES)}")
    load_before = load()
    t0 = time.perf_counter()
    tok_dir, shards = prepare(Path(args.work), log)
    tok = KTokenizer.load(tok_dir)
    seq = preset("cpu-tiny").train.seq_len
    val_rows = next(iter(PackedLoader(shards, split="val", batch_size=10_000, seq_len=seq, loop=False)))
    val = torch.cat([val_rows[0], val_rows[1][:, -1:]], dim=1)[: args.eval_tokens // seq]  # x plus the last target
    data = {"shards": shards, "device": device, "token_bytes": torch.tensor(tok.token_bytes()),
            "eval": text_windows(Path(args.eval_text), tok, seq, args.eval_tokens),
            "tune": text_windows(Path(args.tune_text), tok, seq, args.eval_tokens), "val": val}
    data["key"] = [tok.hash, sha256_file(Path(args.eval_text)), sha256_file(Path(args.tune_text)), args.eval_tokens,
                   torch.__version__] + ([device.type, "bf16-autocast"] if device.type != "cpu" else [])
    cache = Path(args.work) / "cache" if args.cache else None
    results = [run_size(s, seed, int(BUDGET[s] * mult), lrs, fractions, data, log, args.ours_set, cache,
                        args.skip_ours)
               for s in sizes for seed in seeds]

    summary: dict[str, Any] = {}
    for s in sizes:
        rs = [r for r in results if r["size"] == s]
        if all("ratios" in r for r in rs):
            summary[s] = {k: max(r["ratios"][k] for r in rs) for k in rs[0]["ratios"] if all(k in r["ratios"] for r in rs)}
        else:
            summary[s] = None  # some seed never reached the baseline's quality within the budget
    report = {"eval_text": args.eval_text, "ours_set": args.ours_set, "tune_text": args.tune_text, "quick": args.quick, "budget_mult": mult,
              "torch_threads": torch.get_num_threads(), "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "load_before": load_before, "load_after": load(),
              "total_seconds": time.perf_counter() - t0, "results": results, "worst_ratios_by_size": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for r in results:
        b, o = r["baseline"], r["ours_full_budget"]
        print(f"{r['size']} seed {r['seed']} ({r['params'] / 1e6:.1f}M params, {r['budget_tokens']:,} tokens): "
              + (f"baseline lr {r['baseline_best_lr']:g}"
                 + (" (AT THE EDGE OF THE SWEEP)" if r["baseline_lr_at_edge"] else "")
                 + f" eval {b['eval_bpb']:.4f} tune {b['tune_bpb']:.4f} val {b['val_bpb']:.4f} | "
                 if r["baseline_sweep"] else "")
              + (f"ours full budget eval {o['eval_bpb']:.4f} tune {o['tune_bpb']:.4f} val {o['val_bpb']:.4f} | "
                 if o else "")
              + (f"reached at {r['reached']['fraction']:.2f} of the budget" if r["reached"] else "not reached"))
    print(f"load before {load_before}, after {load()}")
    print("ratios ours/baseline (worst seed): " + "; ".join(
        f"{s}: " + (f"tokens {v['tokens']:.2f}x flops {v['flops']:.2f}x wall-clock {v['seconds']:.2f}x"
                    + (f" cpu-time {v['cpu_seconds']:.2f}x" if "cpu_seconds" in v else "") if v
                    else "baseline quality not reached") for s, v in summary.items()))


if __name__ == "__main__":
    main()
