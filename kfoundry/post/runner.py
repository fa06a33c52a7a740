"""What SFT, DPO and distillation share: start from a checkpoint (or resume), step AdamW on a schedule, log,
evaluate, checkpoint.

    trainer = PostTrainer("sft", base_ckpt, out_dir, train_cfg, resume="auto", data_sha256=..., ...)
    summary = trainer.fit(epoch_batches, train_step, evaluate)

- `epoch_batches(epoch)` returns the list of batches of that epoch. It must be a pure function of the epoch (the
  shuffle is seeded by it), which is what makes resume exact: the trainer state records only (epoch, batch).
- `train_step(batch)` runs forward (under `loop.autocast`) and backward for one optimizer step and returns its
  metrics ("loss" at least, and "tokens", the number of tokens processed, for throughput).
- `evaluate()` returns validation metrics (or {}), run every `eval_every` steps and at the end.

Distillation differs in two ways, each an optional argument: it trains a fresh model (`build_model`; `base` is then
the parent and the tokenizer's source, not the starting weights), and it streams token shards instead of
re-deriving epochs (`stream`, e.g. a PackedLoader: `fit(None, ...)` calls `train_step(None)`, which draws from the
stream itself, and the stream's own `state_dict()` is saved in trainer_state.json and put back on resume).

The pieces are the pretraining loop's own: `build_optimizer`/`lr_at` (kfoundry/train/optim.py), checkpoint discovery
and pruning, `MetricsLog` and device selection (kfoundry/train/loop.py), `save_checkpoint`/`load_model`
(kfoundry/checkpoint.py). So a post-training run directory looks like a pretraining one: OUT/ckpt/step-NNNNNN with
trainer_state.json + optimizer.pt, OUT/metrics.jsonl, OUT/run_config.json, and `--resume auto` continues it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kfoundry import checkpoint as ckpt_io
from kfoundry import provenance
from kfoundry.config import DataConfig, RunConfig, TrainConfig, to_dict, write_config
from kfoundry.fileio import sha256_bytes
from kfoundry.train import loop
from kfoundry.train.optim import build_optimizer, lr_at


class PostTrainer:
    """One post-training run: the policy model, its optimizer and its place in the data, saved and restored whole."""

    def __init__(self, stage: str, base: str | Path, out_dir: str | Path, tc: TrainConfig, *,
                 resume: str | None = None, data_sha256: str, data_spec: str = "", meta: dict | None = None,
                 build_model: Callable[[torch.device], torch.nn.Module] | None = None, stream: Any = None,
                 progress: bool = True, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> None:
        self.stage, self.tc, self.log, self.progress, self.stream = stage, tc, log, progress, stream
        self.out_dir = Path(out_dir)
        self.ckpt_root = self.out_dir / "ckpt"
        self.base = Path(base)
        self.data_sha256 = data_sha256
        self.meta = meta or {}
        self.device = loop.pick_device(tc.device)
        torch.manual_seed(tc.seed)

        start = loop.find_resumable(self.ckpt_root, log) if resume == "auto" else (Path(resume) if resume else None)
        if resume == "auto" and start is None:
            log(f"no complete checkpoint under {self.ckpt_root}; starting from "
                + ("a fresh model" if build_model else str(self.base)))
        source = start if start is not None else self.base
        if start is None and build_model is not None:
            self.model = build_model(self.device)
        else:
            self.model = ckpt_io.load_model(source, device=self.device)
        self.tok = ckpt_io.load_tokenizer(source)
        self.parent = str(self.base.resolve())
        self.optimizer = build_optimizer(self.model, tc, self.device.type)
        self.step, self.tokens_seen, self.epoch, self.batch_in_epoch = 0, 0, 0, 0
        self.resumed_from = start
        if start is not None:
            state = ckpt_io.load_trainer_state(start)
            if state.get("stage") != stage:
                raise ValueError(f"{start} is a {state.get('stage')!r} checkpoint; cannot resume {stage} from it")
            if state.get("data_sha256") != data_sha256:
                raise ValueError(f"cannot resume from {start}: the training data changed since it was written "
                                 "(its tokenized examples hash differently); start a new --out directory")
            self.optimizer.load_state_dict(ckpt_io.load_optimizer_state(start))
            self.step, self.tokens_seen = state["step"], state["tokens_seen"]
            self.epoch, self.batch_in_epoch = state["epoch"], state["batch_in_epoch"]
            if stream is not None:
                stream.load_state_dict(state["stream"])
            loop._set_rng_state(state["rng"])
            self.parent = ckpt_io.read_meta(start).get("parent", self.parent)
            log(f"resumed {stage} from {start} at step {self.step}")
        self.run_cfg = RunConfig(model=self.model.cfg, train=tc, data=DataConfig(corpus=data_spec), preset=stage)
        write_config(self.run_cfg, self.out_dir)

    # ------------------------------------------------------------------------------------------- saving

    def save(self, final: bool) -> Path:
        state = {"stage": self.stage, "step": self.step, "tokens_seen": self.tokens_seen, "epoch": self.epoch,
                 "batch_in_epoch": self.batch_in_epoch, "rng": loop._rng_state(), "data_sha256": self.data_sha256,
                 "config_sha256": sha256_bytes(json.dumps(to_dict(self.run_cfg)).encode())}
        if self.stream is not None:  # the position after the last step's batches
            state["stream"] = self.stream.state_dict()
        meta = {"stage": self.stage, "parent": self.parent, "final": final, **self.meta}
        path = ckpt_io.save_checkpoint(self.ckpt_root / f"step-{self.step:06d}", self.model, self.tok,
                                       optimizer=self.optimizer, trainer_state=state, meta=meta, overwrite=True)
        loop.prune_checkpoints(self.ckpt_root, self.tc.keep_last)
        provenance.record_checkpoint(path)  # the ledger: weights hash, step, tokens, the base it derives from
        return path

    # ---------------------------------------------------------------------------------------------- loop

    def fit(self, epoch_batches: Callable[[int], list] | None, train_step: Callable[[Any], dict[str, float]],
            evaluate: Callable[[], dict[str, float]]) -> dict[str, Any]:
        """Train to `max_steps` (or `max_minutes`); `epoch_batches=None` means train_step draws from the stream."""
        tc = self.tc
        if epoch_batches is None and self.stream is None:
            raise ValueError("fit(None, ...) needs the stream train_step draws from, to save its position")
        metrics = loop.MetricsLog(self.out_dir, self.run_cfg)
        metrics.write({"event": "start", "stage": self.stage, "step": self.step, "max_steps": tc.max_steps,
                       "resumed_from": str(self.resumed_from) if self.resumed_from else None,
                       "parent": self.parent, "params": self.model.num_params(), "device": str(self.device)})
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=tc.max_steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
        batches = epoch_batches(self.epoch) if epoch_batches is not None else None
        if batches is not None and not batches:
            raise ValueError(f"{self.stage}: an epoch holds no batch (no usable training example)")
        self.model.train()
        t_start = time.perf_counter()
        train_time, window_tokens, window_time = 0.0, 0, 0.0
        first_loss, last, last_eval, last_ckpt = None, {}, None, None
        while self.step < tc.max_steps:
            if batches is not None and self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                batches = epoch_batches(self.epoch)
            t0 = time.perf_counter()
            lr = lr_at(self.step, tc)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if batches is None:
                last = train_step(None)
            else:
                last = train_step(batches[self.batch_in_epoch])
                self.batch_in_epoch += 1
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
                         if tc.grad_clip > 0 else None)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.tokens_seen += int(last.get("tokens", 0))
            first_loss = last["loss"] if first_loss is None else first_loss
            dt = time.perf_counter() - t0
            train_time += dt
            window_tokens += int(last.get("tokens", 0))
            window_time += dt
            if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                rec = {"step": self.step, **last, "lr": lr, "epoch": self.epoch,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_sec": window_tokens / max(window_time, 1e-9),
                       "elapsed_s": time.perf_counter() - t_start}
                metrics.write(rec)
                if bar:
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                window_tokens, window_time = 0, 0.0
            if bar:
                bar.update(1)
            out_of_time = tc.max_minutes > 0 and (time.perf_counter() - t_start) / 60 >= tc.max_minutes
            done = self.step == tc.max_steps or out_of_time
            if self.step % tc.eval_every == 0 or done:
                last_eval = {"step": self.step, **evaluate()}
                self.model.train()
                metrics.write(last_eval)
                if bar and len(last_eval) > 1:
                    bar.write(f"step {self.step}: " + ", ".join(f"{k}={v:.4f}" for k, v in last_eval.items()
                                                                if k != "step" and isinstance(v, float)))
            if self.step % tc.ckpt_every == 0 or done:
                last_ckpt = self.save(final=done)
            if out_of_time:
                self.log(f"stopping {self.stage} at step {self.step}: the {tc.max_minutes}-minute budget is spent")
                break
        if bar:
            bar.close()
        if last_ckpt is None:  # resumed a finished run: point at what exists
            existing = loop.list_checkpoints(self.ckpt_root)
            last_ckpt = existing[-1] if existing else self.save(final=True)
        summary = {"stage": self.stage, "step": self.step, "tokens_seen": self.tokens_seen,
                   "first_loss": first_loss, "final_loss": last.get("loss"), "last_train": last,
                   "eval": last_eval, "checkpoint": str(last_ckpt), "train_seconds": train_time,
                   "parent": self.parent}
        metrics.write({"event": "end", **{k: v for k, v in summary.items() if k not in ("eval", "last_train")}})
        metrics.close()
        return summary
