"""The one training engine: every stage that changes weights (pretraining, continued pretraining, SFT, DPO,
distillation) runs on this loop, in one process or under torchrun with FSDP2/DDP.

A stage supplies only what is its own (`Stage`):
    loss(model, batch) -> StepLoss     sums over the batch: the loss, what it is averaged over, extra metrics
    source                             the batches, with state_dict()/load_state_dict() for exact resume
    evaluate(model) -> {name: value}   validation metrics (every rank calls it under torchrun)

The Trainer owns everything else, the same way for every stage:

    open_run        resume or start: --resume auto/PATH, no silent overwrite, the run's recorded settings
    for each step:  lr from the schedule (per param group: lr_scale)
                    micro-batches: forward, backward of the *summed* loss (FSDP reduce-scatters each one)
                    one all-reduce of [count, loss, metrics, tokens] on the device, one host sync per step
                    gradients x world/count (token-weighted mean over the global batch) x clip factor
                    a NaN/inf gradient norm skips the step (logged), then optimizer step
                    log (loss, tokens/s, MFU), evaluate, checkpoint on their cadences; wall-clock budget
    end:            a final checkpoint (consolidated safetensors under torchrun), summary, peak memory

Token weighting: the gradient is that of (sum of per-target losses over all micro-batches and ranks) / (their
count), so a token weighs the same wherever it sits, however uneven the micro-batches. The count is only needed
after the backward passes, so the first forward never waits for the step's other micro-batches.

Exact resume: a checkpoint holds the weights, the optimizer state, the step, the source's position, the RNG state
and the run's settings. Nothing in a step depends on wall-clock time or on anything before the last checkpoint
except through those, so a run killed at any point and resumed ends with the same bits (tests/test_train.py and
tests/test_engine.py kill real processes with SIGKILL to prove it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from kfoundry import provenance
from kfoundry.checkpoint import (Checkpointer, check_resumable, find_resumable, list_checkpoints, load_trainer_state,
                                 read_meta, rng_state, set_rng_state)
from kfoundry.config import RunConfig, from_dict, to_dict, write_config
from kfoundry.errors import CheckpointError, ConfigError
from kfoundry.provenance import ledger
from kfoundry.train.distributed import (DistInfo, all_reduce_sum, broadcast_object, gather_objects, grad_norm,
                                        no_grad_sync, parallelize, scale_grads)
from kfoundry.train.metrics import MetricsLog, median_tps
from kfoundry.train.mfu import checked_mfu, peak_flops
from kfoundry.train.optim import apply_lr, build_optimizer
from kfoundry.train.precision import autocast

# Settings that may differ on resume without being a change of the run (none of them changes a weight): where it
# runs, how long this sitting may take, how often it logs and saves, how many checkpoints it keeps. Everything
# else comes from the run's recorded settings.
OPERATIONAL_KEYS = ("train.device", "train.max_minutes", "train.wandb", "train.log_every", "train.ckpt_every",
                    "train.keep_last", "train.prefetch", "train.async_checkpoint", "train.dist_timeout_minutes")


# ---------------------------------------------------------------------------------------------------------
# What a stage supplies


@dataclass
class StepLoss:
    """One micro-batch's contribution: `loss` is a *sum* over `count` units (target tokens, preference pairs);
    `metrics` are sums over the same units (reported as means); `tokens` is what the forward processed."""

    loss: torch.Tensor
    count: torch.Tensor
    tokens: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class BatchSource(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Stage:
    name: str
    loss: Callable[[Any, Any], StepLoss]
    source: BatchSource
    evaluate: Callable[[Any], dict[str, float]]
    metric_names: tuple[str, ...] = ()
    flops_per_token: float | None = None  # model FLOPs per processed token, for MFU
    start_info: dict[str, Any] = field(default_factory=dict)  # extra fields for the run's start record


class LoaderSource:
    """A resumable iterable (PackedLoader) as a BatchSource: its state advances as batches are drawn."""

    def __init__(self, loader) -> None:
        self.loader, self._it = loader, None

    def __next__(self):
        if self._it is None:
            self._it = iter(self.loader)
        return next(self._it)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


class EpochSource:
    """Batches of a dataset that is re-dealt every epoch (SFT conversations, DPO pairs), shared out to ranks.

    `epoch_items(epoch)` must be a pure function of the epoch (its shuffle seeded by it). The position is global:
    each draw takes item `index + rank` and advances `index` by the world size, so the state (epoch, index) is the
    same on every rank and a run saved with 2 ranks resumes with 1. At the end of an epoch a rank whose item would
    fall past the end wraps to the epoch's start, so every rank runs the same number of forward passes."""

    def __init__(self, epoch_items: Callable[[int], list], collate: Callable[[Any], Any], rank: int = 0,
                 world_size: int = 1) -> None:
        self.epoch_items, self.collate, self.rank, self.world = epoch_items, collate, rank, world_size
        self.epoch, self.index = 0, 0
        self._cache: tuple[int, list] | None = None

    def items(self, epoch: int) -> list:
        if self._cache is None or self._cache[0] != epoch:
            items = self.epoch_items(epoch)
            if not items:
                raise ConfigError("an epoch holds no batch (no usable training example)")
            self._cache = (epoch, items)
        return self._cache[1]

    def __next__(self):
        items = self.items(self.epoch)
        if self.index >= len(items):
            self.epoch, self.index = self.epoch + 1, 0
            items = self.items(self.epoch)
        item = items[(self.index + self.rank) % len(items)]
        self.index += self.world
        return self.collate(item)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


class Prefetcher:
    """Draw batches on a background thread (pinned host memory on CUDA) so the step never waits for data. Each
    batch travels with the source's state *after* it, so a checkpoint records the position of what was consumed,
    not of what was prefetched."""

    def __init__(self, source: BatchSource, depth: int, pin: bool) -> None:
        self.source, self.pin = source, pin
        self.state = source.state_dict()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kfoundry-prefetch")
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = next(self.source)
                if self.pin:
                    batch = _map_tensors(batch, lambda t: t.pin_memory())
                item = (batch, self.source.state_dict(), None)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put((None, None, e))

    def __next__(self):
        batch, state, error = self._queue.get()
        if error is not None:
            raise error
        self.state = state
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._thread.join(timeout=5)


def _map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_tensors(b, fn) for b in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):  # e.g. a PackedBatch and its DocumentMask
        return dataclasses.replace(batch, **{f.name: _map_tensors(getattr(batch, f.name), fn)
                                             for f in dataclasses.fields(batch) if f.init})
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


# ---------------------------------------------------------------------------------------------------------
# Opening a run: resume or start, and the settings it runs with


@dataclass
class RunStart:
    start: Path | None  # the checkpoint to resume from, or None for a fresh start
    settings: dict[str, Any]  # the settings this run continues with (recorded ones on a resume)
    state: dict[str, Any] | None  # the trainer state of `start`
    changes: dict[str, tuple[Any, Any]]  # explicitly allowed changes of recorded settings: key -> (old, new)


def settings_of(cfg: RunConfig, **options: Any) -> dict[str, Any]:
    """What a run records as its settings: the whole config, plus the stage's own options (beta, alpha, ...)."""
    return {**to_dict(cfg), "options": options}


def config_of(settings: dict[str, Any]) -> tuple[RunConfig, dict[str, Any]]:
    return (from_dict(RunConfig(), {k: v for k, v in settings.items() if k != "options"}),
            dict(settings.get("options") or {}))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def open_run(out_dir: Path, settings: dict[str, Any], *, resume: str | None, info: DistInfo, explicit: bool = True,
             allow_change: bool = False, stage: str = "pretrain", data_sha256: str | None = None,
             log: Callable[[str], None] = print) -> RunStart:
    """Decide where a run starts and with which settings.

    - `resume=None` and OUT/ckpt already holds checkpoints: refused (a second run would overwrite the first and
      fork its ledger).
    - `resume="auto"`: the newest good checkpoint (broken ones are named and skipped; all broken is an error), or
      a fresh start when there is none. `resume=PATH`: that checkpoint, checked first.
    - On a resume the run's recorded settings apply. `explicit` settings (given on the command line) that differ
      from them are refused unless `allow_change`; then the changes are returned, to be recorded.
    - A checkpoint of another stage, or one trained on other data (`data_sha256`, a fingerprint of the tokenized
      examples), cannot be resumed: that would not continue the same run.
    """
    ckpt_root = out_dir / "ckpt"
    start: Path | None = None
    if resume is None:
        existing = list_checkpoints(ckpt_root)
        if existing:
            raise ConfigError(f"{out_dir} already holds checkpoints (newest {existing[-1].name}); continue that run "
                              "with --resume auto, or choose a new --out")
    elif resume == "auto":
        found: Path | str | None = None
        if info.is_main:
            try:
                found = find_resumable(ckpt_root, log)
            except CheckpointError as e:
                found = f"error:{e}"
        found = broadcast_object(str(found) if found is not None else None, info)
        if isinstance(found, str) and found.startswith("error:"):
            raise CheckpointError(found[len("error:"):])
        start = Path(found) if found else None
        if start is None:
            log(f"no checkpoint under {ckpt_root}; starting a new run")
    else:
        start = Path(resume)
        check_resumable(start, verify_files=False)  # the files' hashes are checked when they are loaded
    if start is None:
        return RunStart(None, settings, None, {})
    state = load_trainer_state(start)
    if state.get("stage", stage) != stage:
        raise CheckpointError(f"{start} is a {state.get('stage')!r} checkpoint; cannot resume {stage} from it")
    if data_sha256 is not None and state.get("data_sha256") != data_sha256:
        raise CheckpointError(f"cannot resume from {start}: the training data changed since it was written (its "
                              "tokenized examples hash differently); start a new --out directory")
    recorded = state.get("settings")
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{start}/trainer_state.json records no settings; it cannot be resumed by this version")
    cfg_then, opts_then = config_of(recorded)  # read as today's config: an old file's 0-for-off becomes None
    recorded = settings_of(cfg_then, **opts_then)
    now, then = flatten(settings), flatten(recorded)
    diff = {k: (then.get(k), now.get(k)) for k in sorted(set(now) | set(then))
            if now.get(k) != then.get(k) and k not in OPERATIONAL_KEYS}
    if not explicit:
        merged = dict(recorded)
        for key in OPERATIONAL_KEYS:  # these come from this invocation
            section, name = key.split(".")
            if section in settings and name in settings[section]:
                merged.setdefault(section, {})[name] = settings[section][name]
        return RunStart(start, merged, state, {})
    if diff and not allow_change:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
        raise ConfigError(f"resuming {start} with different settings ({shown}). A resume continues the run it "
                          "resumes: drop those options to use the recorded settings, or pass --allow-change to change "
                          "them (the change is recorded in the ledger and the metrics)")
    return RunStart(start, settings, state, diff)


# ---------------------------------------------------------------------------------------------------------
# One optimizer step's gradient, in two parts (tests/dist_worker_grads.py checks them against one process)


def accumulation_steps(tc, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: enough for `train.tokens_per_step` over all ranks (1 if 0)."""
    if not tc.tokens_per_step:
        return 1
    return max(1, math.ceil(tc.tokens_per_step / (tc.micro_batch_size * tc.seq_len * world_size)))


def step_sum_names(stage: Stage) -> tuple[str, ...]:
    return ("count", "loss", *stage.metric_names, "tokens", "late")


def accumulate_gradients(stage: Stage, fwd, model, micro_batches, n_micro: int,
                         device: torch.device) -> torch.Tensor:
    """Backward the *summed* loss of each micro-batch (gradients add up); return the step's sums on the device,
    in `step_sum_names` order (`late` left 0). DDP skips its all-reduce until the last micro-batch; FSDP2
    reduce-scatters every one (see distributed.no_grad_sync)."""
    names = step_sum_names(stage)
    sums = torch.zeros(len(names), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        with no_grad_sync(model, skip=i < n_micro - 1):
            with autocast(device):  # forward only: backward runs in the dtypes autocast chose
                out = stage.loss(fwd, batch)
            out.loss.backward()
        parts = [out.count, out.loss, *(out.metrics[m] for m in stage.metric_names), out.tokens]
        sums[:-1] += torch.stack([torch.as_tensor(p, device=device).detach().double().reshape(()) for p in parts])
    return sums


def normalize_gradients(model, sums: torch.Tensor, names: tuple[str, ...], info: DistInfo,
                        grad_clip: float | None) -> tuple[dict[str, float], float, bool]:
    """All-reduce the step's sums (on the device), read them and the gradient norm in one host sync, and scale
    the gradients to the token-weighted mean over the global batch, clipped. Returns (sums, grad norm, ok);
    ok is False for a step with no targets or a NaN/inf norm, which the caller skips."""
    all_reduce_sum(sums, info)
    host = torch.cat([sums, grad_norm(model).double().reshape(1)]).tolist()  # the one sync of the step
    values = dict(zip(names, host[:-1]))
    count = values["count"]
    scale = info.world_size / count if count > 0 else 0.0  # x world undoes FSDP/DDP's average over ranks
    norm = host[-1] * scale
    if count <= 0 or not math.isfinite(norm):
        return values, norm, False
    clip = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip else 1.0  # None: no clipping
    scale_grads(model, scale * clip)
    return values, norm, True


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, stage: Stage, cfg: RunConfig, out_dir: str | Path, *, run: RunStart, model, tokenizer,
                 info: DistInfo, device: torch.device, parent: str | None = None, meta: dict | None = None,
                 data_sha256: str | None = None,
                 record_init: bool = False, progress: bool = True,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        """`model` is the unsharded starting model (fresh, --init or base weights), or a fresh model still on the
        meta device, which is sharded and then initialised here (FSDP); on a resume its weights are replaced by
        the checkpoint's. Every rank constructs the Trainer under torchrun."""
        self.stage, self.cfg, self.tc, self.run, self.info, self.device = stage, cfg, cfg.train, run, info, device
        self.out_dir, self.tok, self.meta, self.data_sha256 = Path(out_dir), tokenizer, meta or {}, data_sha256
        self.main = info.is_main
        self.log = log if self.main else (lambda m: None)
        self.progress = progress and self.main
        tc = self.tc
        torch.manual_seed(tc.seed)
        self.ckpt = Checkpointer(self.out_dir / "ckpt", sharded=info.enabled, keep_last=tc.keep_last,
                                 async_save=tc.async_checkpoint and info.enabled, is_main=self.main,
                                 on_saved=self._record)
        self.step, self.tokens_seen, self.parent = 0, 0, parent
        if run.start is not None:
            state = self.ckpt.restore_weights(run.start, model, distributed=info.enabled)
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.parent = read_meta(run.start).get("parent", parent)
        self.raw_model = model
        self.n_params = model.num_params()
        if self.main:
            write_config(cfg, self.out_dir)
        # Parallelism and compilation are applied from outside: the model file does not know about them.
        self.model = parallelize(model, info, mode=tc.parallel, activation_checkpointing=tc.activation_checkpointing,
                                 compile_blocks=tc.compile and info.enabled)
        sharded_init = any(p.is_meta for p in model.parameters())
        if sharded_init:  # built on the meta device and sharded (FSDP): each rank allocates and draws its shard only
            model.to_empty(device=device)
            model.init_weights(seed=tc.seed)
        if record_init and run.start is None:  # the ledger: random initialisation, before any step
            digest = provenance.model_digest(model)  # every rank: a sharded model is gathered a tensor at a time
            if self.main:
                provenance.record_init(self.out_dir, model, seed=tc.seed, weights_sha256=digest,
                                       init="sharded" if sharded_init else "whole")
        self.fwd = torch.compile(self.model) if tc.compile and not info.enabled else self.model
        self.optimizer = build_optimizer(self.model, tc, device.type)
        if run.start is not None:
            self.ckpt.restore_optimizer(run.start, self.model, self.optimizer)
            stage.source.load_state_dict(run.state["source"])
            set_rng_state(run.state["rng"])
            self.log(f"resumed from {run.start} at step {self.step} ({stage.name})")
        self.accum = accumulation_steps(tc, info.world_size)

    # ------------------------------------------------------------------------------------------- saving

    def save(self, final: bool) -> Path:
        state = {"stage": self.stage.name, "step": self.step, "tokens_seen": self.tokens_seen, "rng": rng_state(),
                 "source": self.source.state_dict(), "settings": self.run.settings, "max_steps": self.tc.max_steps,
                 "world_size": self.info.world_size, "data_sha256": self.data_sha256}
        meta = {"stage": self.stage.name, "parent": self.parent, "final": final, **self.meta}
        t0 = time.perf_counter()
        path = self.ckpt.save(self.step, self.model, self.optimizer, tokenizer=self.tok, model_cfg=self.cfg.model,
                              trainer_state=state, meta=meta, final=final)
        self.save_seconds += time.perf_counter() - t0
        return path

    def _record(self, path: Path) -> None:
        provenance.record_checkpoint(path, run_dir=self.out_dir)  # weights hash, step, tokens, parent

    # ---------------------------------------------------------------------------------------------- loop

    def fit(self) -> dict[str, Any]:
        tc, info, device, stage = self.tc, self.info, self.device, self.stage
        if self.main and self.run.start is not None:
            dropped = MetricsLog.truncate_after(self.out_dir / "metrics.jsonl", self.step)
        peak, peak_src = peak_flops(device)
        if peak and info.world_size > 1:
            peak, peak_src = peak * info.world_size, f"{peak_src} x {info.world_size} ranks"
        metrics = MetricsLog(self.out_dir, self.cfg) if self.main else None
        if metrics:
            if self.run.start is not None:
                metrics.write({"event": "resume", "step": self.step, "resumed_from": str(self.run.start),
                               "replayed_records_dropped": dropped})
            metrics.write({"event": "start", "stage": stage.name, "step": self.step, "max_steps": tc.max_steps,
                           "resumed_from": str(self.run.start) if self.run.start else None,
                           "params": self.n_params, "flops_per_token": stage.flops_per_token, "peak_flops": peak,
                           "peak_source": peak_src, "device": str(device), "world_size": info.world_size,
                           "parallel": tc.parallel if info.enabled else None, "accum_steps": self.accum,
                           "parent": self.parent, **stage.start_info})
            if self.run.changes:
                change = {k: {"from": a, "to": b} for k, (a, b) in self.run.changes.items()}
                metrics.write({"event": "config_change", "step": self.step, "changes": change})
                ledger.record(self.out_dir, "config_change", step=self.step, changes=change,
                                  checkpoint=str(self.run.start))
        self.source = Prefetcher(stage.source, tc.prefetch, pin=device.type == "cuda") if tc.prefetch > 0 \
            else stage.source
        bar = None
        if self.progress:
            bar = tqdm(total=tc.max_steps, initial=self.step, desc=stage.name, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        names = step_sum_names(stage)
        self.save_seconds, train_time, window_tokens, window_time = 0.0, 0.0, 0, 0.0
        t_start = time.perf_counter()
        first_loss, last, last_eval, last_ckpt, skipped = None, {}, None, None, 0
        self.model.train()
        try:
            while self.step < tc.max_steps:
                t0 = time.perf_counter()
                lr = apply_lr(self.optimizer, self.step, tc)  # each group: the schedule x its lr_scale
                micro = (to_device(next(self.source), device) for _ in range(self.accum))
                sums = accumulate_gradients(stage, self.fwd, self.model, micro, self.accum, device)
                # Every rank must agree on stopping: a rank past the wall-clock budget says so in the same reduce.
                if tc.max_minutes and (time.perf_counter() - t_start) / 60 >= tc.max_minutes:
                    sums[-1] = 1
                values, norm, ok = normalize_gradients(self.model, sums, names, info, tc.grad_clip)
                count = values["count"]
                if ok:
                    self.optimizer.step()
                else:
                    skipped += 1
                    self.log(f"step {self.step + 1}: skipped ({'no targets' if count <= 0 else f'grad norm {norm}'})")
                    if metrics:
                        metrics.write({"event": "skipped_step", "step": self.step + 1, "grad_norm": str(norm),
                                       "count": count})
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                n_tokens = int(values["tokens"])
                self.tokens_seen += n_tokens
                dt = time.perf_counter() - t0
                train_time += dt
                window_tokens += n_tokens
                window_time += dt
                last = {"loss": values["loss"] / count if count > 0 else float("nan"),
                        **{m: values[m] / count if count > 0 else float("nan") for m in stage.metric_names}}
                first_loss = last["loss"] if first_loss is None else first_loss
                if self.main and (self.step % tc.log_every == 0 or self.step == tc.max_steps):
                    tps = window_tokens / max(window_time, 1e-9)
                    mfu = None
                    if stage.flops_per_token:
                        mfu, peak = checked_mfu(stage.flops_per_token * tps, peak, device, info.world_size)
                    rec = {"step": self.step, **last, "lr": lr, "tokens": self.tokens_seen, "tokens_per_sec": tps,
                           "mfu": mfu, "grad_norm": norm, "elapsed_s": time.perf_counter() - t_start}
                    if metrics:
                        metrics.write(rec)
                    if bar:
                        bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{tps:,.0f}")
                    window_tokens, window_time = 0, 0.0
                if bar:
                    bar.update(1)
                out_of_time = values["late"] > 0
                done = self.step == tc.max_steps or out_of_time
                if done or (tc.eval_every and self.step % tc.eval_every == 0):
                    last_eval = {"step": self.step, "tokens": self.tokens_seen, **stage.evaluate(self.fwd)}
                    self.model.train()
                    if metrics:
                        metrics.write({**last_eval, "elapsed_s": time.perf_counter() - t_start})
                    if bar and len(last_eval) > 2:
                        bar.write(f"step {self.step}: " + ", ".join(
                            f"{k}={v:.4f}" for k, v in last_eval.items() if isinstance(v, float)))
                if done or (tc.ckpt_every and self.step % tc.ckpt_every == 0):
                    last_ckpt = self.save(final=done)
                if out_of_time:
                    self.log(f"stopping {stage.name} at step {self.step}: the {tc.max_minutes}-minute budget is spent")
                    break
            self.ckpt.wait()
        finally:
            if isinstance(self.source, Prefetcher):
                self.source.close()
            if bar:
                bar.close()
        if last_ckpt is None:  # nothing left to do (resumed a finished run): point at what exists
            existing = list_checkpoints(self.out_dir / "ckpt")
            last_ckpt = existing[-1] if existing else self.save(final=True)
        summary = {"stage": stage.name, "step": self.step, "tokens_seen": self.tokens_seen, "first_loss": first_loss,
                   "final_loss": last.get("loss"), "last_train": last, "eval": last_eval,
                   "checkpoint": str(last_ckpt), "train_seconds": train_time, "parent": self.parent,
                   "skipped_steps": skipped, "checkpoint_seconds": self.save_seconds,
                   "tokens_per_sec": median_tps(self.out_dir / "metrics.jsonl") if self.main else None,
                   "params": self.n_params, "peak_flops": peak, "peak_source": peak_src,
                   "world_size": info.world_size}
        achieved = (stage.flops_per_token or 0) * summary["tokens_per_sec"] if summary["tokens_per_sec"] else None
        summary["mfu"], summary["peak_flops"] = checked_mfu(achieved, peak, device, info.world_size)
        if device.type == "cuda":
            mem = {"allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                   "reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
            summary["peak_memory_per_rank"] = gather_objects(mem, info)
            summary["peak_memory_gib"] = max(m["allocated_gib"] for m in summary["peak_memory_per_rank"])
        if metrics:
            metrics.write({"event": "end", **{k: v for k, v in summary.items() if k not in ("eval", "last_train")}})
            metrics.close()
        return summary

