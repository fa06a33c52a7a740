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
from kfoundry import provenance
from kfoundry.config import RunConfig, to_dict, write_config
from kfoundry.fileio import sha256_bytes
from kfoundry.model.llama import Transformer
from kfoundry.train.dist_checkpoint import is_dcp_checkpoint, load_distributed, loader_state_for, save_distributed
from kfoundry.train.distributed import (DistInfo, all_reduce_sum, broadcast_object, clip_grad_norm, init_distributed,
                                        no_grad_sync, parallelize, shutdown)
from kfoundry.train.mfu import checked_mfu, peak_flops
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
             lang: str | None = None, info: DistInfo | None = None) -> dict[str, float] | None:
    """Mean loss (nats/token) and bits per byte on the validation split.

    Bits per byte = total loss in bits / total UTF-8 bytes of the predicted tokens. It does not depend on the
    tokenizer (a tokenizer with longer tokens has fewer, harder predictions; per byte that cancels out), so it
    compares models with different vocabularies. Special tokens (zero bytes, e.g. BOS) are left out of both sums.
    Under torchrun each rank scores its rows of each global batch and the sums are all-reduced; every rank runs
    the same number of forward passes (FSDP's collectives need that), so a final partial batch may be left out.
    """
    from kfoundry.data.loader import PackedLoader

    info = info or DistInfo()
    loader = PackedLoader(shard_dir, split="val", batch_size=cfg.train.micro_batch_size, seq_len=cfg.train.seq_len,
                          seed=0, lang=lang, loop=False, rank=info.rank, world_size=info.world_size)
    batches = []
    for x, y in loader:
        if len(batches) >= cfg.train.eval_batches:
            break
        batches.append((x, y))
    n = torch.tensor(len(batches))
    if info.enabled and info.world_size > 1:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # nats, bytes, tokens
    for x, y in batches[: int(n)]:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                                 ignore_index=-1)
        b = token_bytes[y.clamp(min=0)].flatten()
        counted = (b > 0) & (y.flatten() >= 0)
        sums += torch.stack([loss[counted].double().sum(), b[counted].double().sum(), counted.double().sum()]).cpu()
    model.train(was_training)
    sums = all_reduce_sum(sums, info)
    nats, nbytes, ntok = sums.tolist()
    if ntok == 0:
        return None
    return {"loss": nats / ntok, "bpb": nats / nbytes / LN2, "tokens": int(ntok)}


# ---------------------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (append-only, one JSON object per line) plus TensorBoard, and W&B when asked.

    All three are written whether or not a progress bar is shown (`--no-progress` only silences the terminal)."""

    def __init__(self, out_dir: Path, cfg: RunConfig):
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except ImportError:
            pass
        if cfg.train.wandb:
            try:
                import wandb  # optional dependency
            except ImportError:
                raise ValueError("train.wandb=true needs the wandb package: pip install 'kfoundry[wandb]'") from None
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


def forward_backward(fwd, model, micro: list[tuple[torch.Tensor, torch.Tensor]], info: DistInfo,
                     device: torch.device) -> tuple[float, int]:
    """Accumulate the gradient of one optimizer step over micro-batches; returns (mean loss, target tokens), both
    over the global batch.

    Token-weighted: the loss is summed over every target token of the step (all micro-batches, all ranks) and
    divided once by their count, so a token weighs the same wherever it sits. The factor world_size undoes the
    averaging of gradients across ranks that FSDP/DDP apply. Gradient sync is skipped until the last micro-batch.
    """
    n_targets = int(all_reduce_sum(torch.tensor(sum(int((y >= 0).sum()) for _, y in micro)), info))
    loss_sum = torch.zeros(())
    for i, (x, y) in enumerate(micro):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with no_grad_sync(model, skip=i < len(micro) - 1):
            with autocast(device):  # forward only: backward runs in the dtypes autocast chose
                loss = fwd(x, y, reduction="sum") * (info.world_size / n_targets)
            loss.backward()
        loss_sum += loss.detach().float().cpu() / info.world_size
    return float(all_reduce_sum(loss_sum, info)), n_targets


def pretrain(cfg: RunConfig, out_dir: str | Path, *, shard_dir: str | Path, tokenizer_dir: str | Path,
             resume: str | None = None, init: str | Path | None = None, progress: bool = True,
             log=lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    """Train; returns a summary (final checkpoint, last evaluation, tokens/s, MFU). Under torchrun every rank
    calls this; rank 0 alone writes logs, metrics and the non-sharded parts of checkpoints."""
    from kfoundry.data.loader import PackedLoader
    from kfoundry.tokenizer import KTokenizer

    out_dir, shard_dir = Path(out_dir), Path(shard_dir)
    ckpt_root = out_dir / "ckpt"
    tc = cfg.train
    info = init_distributed(tc.device)
    device = info.device if info.enabled else pick_device(tc.device)
    main = info.is_main
    if not main:
        progress, log = False, (lambda msg: None)
    torch.manual_seed(tc.seed)
    tok = KTokenizer.load(tokenizer_dir)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long, device=device)

    # -- model: resume > init > fresh. Every rank builds the same full model from the seed, then shards it. ----
    start = None
    if resume == "auto":
        start = broadcast_object(find_resumable(ckpt_root, log) if main else None, info)
        if start is None:
            log(f"no complete checkpoint under {ckpt_root}; starting from scratch")
    elif resume:
        start = Path(resume)
    parent = None
    from_dcp = start is not None and is_dcp_checkpoint(start)
    if start is not None and not from_dcp and info.enabled:
        raise ValueError(f"{start} was written by a single process (no torchrun); resume it without torchrun, or "
                         f"start a distributed run from its weights with --init")
    if start is not None:
        model = ckpt_io.load_model(start, device=device) if not from_dcp else \
            Transformer.build(ckpt_io.load_config(start), device=device, seed=tc.seed)
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
    flops_per_token = model.flops_per_token(tc.seq_len)
    n_params = model.num_params()
    model.train()
    if main:
        write_config(cfg, out_dir)
        if start is None and init is None:  # the ledger: random initialisation, before any step changes it
            provenance.record_init(out_dir, model, seed=tc.seed)
        provenance.record_data(out_dir, shard_dir, tokenizer_dir=tokenizer_dir)
    # Parallelism and compilation are applied from outside: the model file does not know about them.
    model = parallelize(model, info, mode=tc.parallel, activation_checkpointing=tc.activation_checkpointing,
                        compile_blocks=tc.compile and info.enabled)
    fwd = torch.compile(model) if tc.compile and not info.enabled else model

    optimizer = build_optimizer(model, tc, device.type)
    tokens_per_micro = tc.micro_batch_size * tc.seq_len * info.world_size
    accum = max(1, math.ceil(tc.tokens_per_step / tokens_per_micro)) if tc.tokens_per_step else 1
    loader = PackedLoader(shard_dir, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                          seed=tc.seed, rank=info.rank, world_size=info.world_size,
                          expect_tokenizer_hash=tok.hash)
    step, tokens_seen = 0, 0
    if start is not None:
        state = ckpt_io.load_trainer_state(start)
        if from_dcp:
            load_distributed(start, model, optimizer)
            loader.load_state_dict(loader_state_for(start, info.rank))
        else:
            optimizer.load_state_dict(ckpt_io.load_optimizer_state(start))
            loader.load_state_dict(state["loader"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        _set_rng_state(state["rng"])
        parent = ckpt_io.read_meta(start).get("parent")
        log(f"resumed from {start} at step {step}")
    batches = iter(loader)  # the loader's state advances as batches are drawn

    val_langs = _val_languages(shard_dir)
    peak, peak_src = peak_flops(device)
    if peak and info.world_size > 1:
        peak, peak_src = peak * info.world_size, f"{peak_src} x {info.world_size} ranks"
    metrics = MetricsLog(out_dir, cfg) if main else None
    if metrics:
        metrics.write({"event": "start", "step": step, "resumed_from": str(start) if start else None,
                       "params": n_params, "flops_per_token": flops_per_token, "peak_flops": peak,
                       "peak_source": peak_src, "device": str(device), "world_size": info.world_size,
                       "parallel": tc.parallel if info.enabled else None, "accum_steps": accum})

    def save(final: bool = False) -> Path:
        path = ckpt_root / f"step-{step:06d}"
        trainer_state = {"step": step, "tokens_seen": tokens_seen, "rng": _rng_state(),
                         "config_sha256": sha256_bytes(json.dumps(to_dict(cfg)).encode())}
        meta = {"stage": "pretrain", "parent": parent, "final": final}
        if info.enabled:
            save_distributed(path, model, optimizer, tok, info, model_cfg=cfg.model, trainer_state=trainer_state,
                             loader_state=loader.state_dict(), meta=meta)
        else:
            ckpt_io.save_checkpoint(path, model, tok, optimizer=optimizer, meta=meta, overwrite=True,
                                    trainer_state={**trainer_state, "loader": loader.state_dict()})
        if main:
            prune_checkpoints(ckpt_root, tc.keep_last)
            provenance.record_checkpoint(path, run_dir=out_dir)  # weights hash, step, tokens, parent entry
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
        # Token-weighted gradient accumulation: the loss is summed over every target token of the global step
        # (all micro-batches, all ranks) and divided once by their count. x world_size undoes the gradient
        # averaging across ranks that FSDP/DDP apply.
        micro = [next(batches) for _ in range(accum)]
        last_loss, n_targets = forward_backward(fwd, model, micro, info, device)
        grad_norm = clip_grad_norm(model, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += n_targets
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_time += dt
        window_tokens += n_targets
        window_time += dt

        if main and (step % tc.log_every == 0 or step == tc.max_steps):
            tps = window_tokens / max(window_time, 1e-9)
            mfu, peak = checked_mfu(flops_per_token * tps, peak, device, info.world_size)  # re-probes a low CPU peak
            rec = {"step": step, "loss": last_loss, "lr": lr, "tokens": tokens_seen, "tokens_per_sec": tps,
                   "mfu": mfu, "grad_norm": grad_norm, "elapsed_s": time.perf_counter() - t_start}
            if metrics:
                metrics.write(rec)
            if bar:
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", mfu=f"{(mfu or 0) * 100:.1f}%")
            window_tokens, window_time = 0, 0.0
        if bar:
            bar.update(1)

        # Every rank must agree on stopping (a wall-clock budget is read on rank 0 and broadcast).
        out_of_time = tc.max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= tc.max_minutes
        out_of_time = bool(broadcast_object(out_of_time, info)) if tc.max_minutes > 0 else False
        done = step == tc.max_steps or out_of_time
        if step % tc.eval_every == 0 or done:
            last_eval = {"step": step, "tokens": tokens_seen, "elapsed_s": time.perf_counter() - t_start}
            for lang in [None, *val_langs]:
                r = evaluate(fwd, shard_dir, cfg, token_bytes, device, lang=lang, info=info)
                if r is not None:
                    suffix = f"_{lang}" if lang else ""
                    last_eval[f"val_loss{suffix}"] = r["loss"]
                    last_eval[f"val_bpb{suffix}"] = r["bpb"]
            if metrics:
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
               "tokens_per_sec": _median_tps(out_dir) if main else None,
               "params": n_params, "peak_flops": peak, "peak_source": peak_src, "world_size": info.world_size}
    achieved = flops_per_token * summary["tokens_per_sec"] if summary["tokens_per_sec"] else None
    summary["mfu"], summary["peak_flops"] = checked_mfu(achieved, peak, device, info.world_size)
    if device.type == "cuda":
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if metrics:
        metrics.write({"event": "end", **{k: v for k, v in summary.items() if k != "eval"}})
        metrics.close()
    shutdown(info)
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
