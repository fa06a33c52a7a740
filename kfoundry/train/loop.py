"""The pretraining loop, top to bottom.

    set up (device, seed, model: fresh | --init | --resume) -> optimizer -> data loader
    for each step:  lr from the schedule
                    accumulate gradients over micro-batches (token-weighted loss)
                    clip, step, log (loss, tokens/s, MFU)
                    every eval_every: validation loss and bits per byte (overall and per language)
                    every ckpt_every: an atomic checkpoint with everything needed to continue exactly

Exact resume: a checkpoint holds the weights, the optimizer moments, the step, the data loader's position and the
RNG state. Nothing in a step depends on wall-clock time or on what happened before the last checkpoint except
through those, so a run killed at any point and resumed with `resume="auto"` ends with the same bits as a run
that was never interrupted (tests/test_train.py kills one with SIGKILL to prove it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kfoundry import checkpoint as ckpt_io
from kfoundry.config import RunConfig, to_dict, write_config
from kfoundry.fileio import sha256_bytes
from kfoundry.model.llama import Transformer
from kfoundry.train.mfu import peak_flops
from kfoundry.train.optim import build_optimizer, lr_at

LN2 = math.log(2)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights and optimizer stay fp32); plain fp32 on CPU, where bf16 matmuls are slow
    on most processors and fp32 keeps runs bit-reproducible."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------------------
# Checkpoint discovery


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first. Temporary '.tmp-*' leftovers of a killed write are ignored."""
    if not ckpt_root.is_dir():
        return []
    dirs = [p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(dirs, key=lambda p: int(p.name.split("-")[1]))


def find_resumable(ckpt_root: Path, log=print) -> Path | None:
    """The newest checkpoint whose files match their recorded hashes; a corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            ckpt_io.verify(path)
            return path
        except ckpt_io.CheckpointError as e:
            log(f"refusing checkpoint: {e}; trying the previous one")
    return None


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root.glob(".tmp-*"):  # leftovers of a write that was killed
        shutil.rmtree(tmp, ignore_errors=True)


def _rng_state() -> dict[str, str]:
    return {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}


def _set_rng_state(state: dict[str, str]) -> None:
    raw = base64.b64decode(state["torch"])
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, shard_dir: Path, cfg: RunConfig, token_bytes: torch.Tensor, device: torch.device,
             lang: str | None = None) -> dict[str, float] | None:
    """Mean loss (nats/token) and bits per byte on the validation split.

    Bits per byte = total loss in bits / total UTF-8 bytes of the predicted tokens. It does not depend on the
    tokenizer (a tokenizer with longer tokens has fewer, harder predictions; per byte that cancels out), so it
    compares models with different vocabularies. Special tokens (zero bytes, e.g. BOS) are left out of both sums.
    """
    from kfoundry.data.loader import PackedLoader

    loader = PackedLoader(shard_dir, split="val", batch_size=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                          seed=0, lang=lang, loop=False)
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64)
    nbytes = torch.zeros((), dtype=torch.float64)
    ntok = 0
    for i, (x, y) in enumerate(loader):
        if i >= cfg.train.eval_batches:
            break
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                                 ignore_index=-1)
        b = token_bytes[y.clamp(min=0)].flatten()
        counted = (b > 0) & (y.flatten() >= 0)
        nats += loss[counted].double().sum().cpu()
        nbytes += b[counted].double().sum().cpu()
        ntok += int(counted.sum())
    model.train(was_training)
    if ntok == 0:
        return None
    return {"loss": float(nats / ntok), "bpb": float(nats / nbytes / LN2), "tokens": ntok}


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (append-only, one JSON object per line) plus TensorBoard, and W&B when asked."""

    def __init__(self, out_dir: Path, cfg: RunConfig, enabled: bool = True):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            pass
        if cfg.train.wandb:
            import wandb  # optional dependency: pip install kfoundry[wandb]

            self.wandb = wandb.init(project="kfoundry", dir=str(out_dir), config=to_dict(cfg))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.tb:
                    self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(record, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# ---------------------------------------------------------------------------------------------------------
# The loop


def pretrain(cfg: RunConfig, out_dir: str | Path, *, shard_dir: str | Path, tokenizer_dir: str | Path,
             resume: str | None = None, init: str | Path | None = None, progress: bool = True,
             log=lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    from kfoundry.data.loader import PackedLoader
    from kfoundry.tokenizer import KTokenizer

    out_dir, shard_dir = Path(out_dir), Path(shard_dir)
    ckpt_root = out_dir / "ckpt"
    tc = cfg.train
    device = pick_device(tc.device)
    torch.manual_seed(tc.seed)
    tok = KTokenizer.load(tokenizer_dir)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long, device=device)

    # -- model: resume > init > fresh ----------------------------------------------------------------------
    start = find_resumable(ckpt_root, log) if resume == "auto" else (Path(resume) if resume else None)
    if resume == "auto" and start is None:
        log(f"no complete checkpoint under {ckpt_root}; starting from scratch")
    parent = None
    if start is not None:
        model = ckpt_io.load_model(start, device=device)
        cfg.model = model.cfg
    elif init is not None:
        model = ckpt_io.load_model(init, device=device)
        cfg.model = model.cfg
        parent = str(Path(init).resolve())
    else:
        model = Transformer.build(cfg.model, device=device, seed=tc.seed)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    if tc.seq_len > cfg.model.max_seq_len:
        raise ValueError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    model.train()
    write_config(cfg, out_dir)
    fwd = torch.compile(model) if tc.compile else model

    optimizer = build_optimizer(model, tc, device.type)
    tokens_per_micro = tc.micro_batch_size * tc.seq_len
    accum = max(1, math.ceil(tc.tokens_per_step / tokens_per_micro)) if tc.tokens_per_step else 1
    loader = PackedLoader(shard_dir, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                          seed=tc.seed, expect_tokenizer_hash=tok.hash)
    step, tokens_seen = 0, 0
    if start is not None:
        optimizer.load_state_dict(ckpt_io.load_optimizer_state(start))
        state = ckpt_io.load_trainer_state(start)
        step, tokens_seen = state["step"], state["tokens_seen"]
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        parent = ckpt_io.read_meta(start).get("parent")
        log(f"resumed from {start} at step {step}")
    batches = iter(loader)  # the loader's state advances as batches are drawn

    val_langs = _val_languages(shard_dir)
    peak, peak_src = peak_flops(device)
    flops_per_token = model.flops_per_token(tc.seq_len)
    metrics = MetricsLog(out_dir, cfg, enabled=progress)
    metrics.write({"event": "start", "step": step, "resumed_from": str(start) if start else None,
                   "params": model.num_params(), "flops_per_token": flops_per_token, "peak_flops": peak,
                   "peak_source": peak_src, "device": str(device), "accum_steps": accum})

    def save(final: bool = False) -> Path:
        path = ckpt_io.save_checkpoint(
            ckpt_root / f"step-{step:06d}", model, tok, optimizer=optimizer,
            trainer_state={"step": step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                           "rng": _rng_state(), "config_sha256": sha256_bytes(json.dumps(to_dict(cfg)).encode())},
            meta={"stage": "pretrain", "parent": parent, "final": final}, overwrite=True)
        prune_checkpoints(ckpt_root, tc.keep_last)
        return path

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=tc.max_steps, initial=step, desc="pretrain", unit="step", dynamic_ncols=True, file=sys.stderr)
    train_time, window_tokens, window_time = 0.0, 0, 0.0
    t_start = time.perf_counter()
    last_loss, last_eval, last_ckpt = float("nan"), None, None
    while step < tc.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Token-weighted gradient accumulation: sum the loss over every target token of the step, divide once.
        micro = [next(batches) for _ in range(accum)]
        n_targets = sum(int((y >= 0).sum()) for _, y in micro)
        loss_sum = 0.0
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device):
                loss = fwd(x, y, reduction="sum") / n_targets
            loss.backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip) if tc.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_targets
        last_loss = loss_sum
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        window_tokens += n_targets
        window_time += dt

        if step % tc.log_every == 0 or step == tc.max_steps:
            tps = window_tokens / max(window_time, 1e-9)
            mfu = flops_per_token * tps / peak if peak else None
            rec = {"step": step, "loss": last_loss, "lr": lr, "tokens": tokens_seen, "tokens_per_sec": tps,
                   "mfu": mfu, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "elapsed_s": time.perf_counter() - t_start}
            metrics.write(rec)
            if bar:
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{(mfu or 0) * 100:.1f}%")
            window_tokens, window_time = 0, 0.0
        if bar:
            bar.update(1)

        out_of_time = tc.max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= tc.max_minutes
        done = step == tc.max_steps or out_of_time
        if step % tc.eval_every == 0 or done:
            last_eval = {"step": step, "tokens": tokens_seen, "elapsed_s": time.perf_counter() - t_start}
            for lang in [None, *val_langs]:
                r = evaluate(fwd, shard_dir, cfg, token_bytes, device, lang=lang)
                if r is not None:
                    suffix = f"_{lang}" if lang else ""
                    last_eval[f"val_loss{suffix}"] = r["loss"]
                    last_eval[f"val_bpb{suffix}"] = r["bpb"]
            metrics.write(last_eval)
            if bar:
                bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items() if k.startswith("val")))
        if step % tc.ckpt_every == 0 or done:
            last_ckpt = save(final=done)
        if out_of_time:
            log(f"stopping at step {step}: the {tc.max_minutes}-minute budget is spent")
            break
    if bar:
        bar.close()
    if last_ckpt is None:  # nothing left to do (resumed a finished run): point at what exists
        last_ckpt = list_checkpoints(ckpt_root)[-1] if list_checkpoints(ckpt_root) else save(final=True)
    summary = {"step": step, "tokens_seen": tokens_seen, "final_loss": last_loss, "eval": last_eval,
               "checkpoint": str(last_ckpt), "train_seconds": train_time,
               "tokens_per_sec": _median_tps(out_dir),
               "params": model.num_params(), "peak_flops": peak, "peak_source": peak_src}
    summary["mfu"] = flops_per_token * summary["tokens_per_sec"] / peak if peak and summary["tokens_per_sec"] else None
    metrics.write({"event": "end", **{k: v for k, v in summary.items() if k != "eval"}})
    metrics.close()
    return summary


def _median_tps(out_dir: Path) -> float | None:
    """Median tokens/s over the logged windows (the first one includes warm-up, so the median is fairer)."""
    values = []
    path = out_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "tokens_per_sec" in rec and rec.get("event") is None:
                values.append(rec["tokens_per_sec"])
    if not values:
        return None
    values.sort()
    return values[len(values) // 2]


def _val_languages(shard_dir: Path) -> list[str]:
    """Languages present in the validation split, for per-language bits per byte."""
    from kfoundry.fileio import read_json

    meta_path = shard_dir / "meta.json"
    if not meta_path.is_file():
        return []
    meta = read_json(meta_path)
    langs = meta.get("splits", {}).get("val", {}).get("by_lang", {})
    return sorted(k for k in langs if k in ("ko", "en"))
