"""Pretraining (and continued pretraining with `init`), as a stage of the one training engine.

    shards (train split) --PackedLoader--> (x, y) --model--> summed next-token loss  -> Trainer (trainer.py)
    shards (val split)   --evaluate_by_language--> val_loss, val_bpb (overall, ko, en)

What is particular to pretraining is small: the model starts from random initialisation (recorded in the ledger
before any step) or from `init`'s weights, the batches are packed token rows, and the loss is summed over every
target token. Everything else — accumulation, clipping, schedule, cadence, budget, checkpoints, exact resume,
torchrun — is the Trainer's, shared with SFT, DPO and distillation.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

from kfoundry import provenance
from kfoundry.checkpoint import find_resumable, list_checkpoints, load_config, load_model
from kfoundry.config import RunConfig, complete
from kfoundry.data.loader import PackedLoader
from kfoundry.errors import ConfigError
from kfoundry.model.llama import Transformer
from kfoundry.tokenizer import KTokenizer
from kfoundry.train.distributed import DistInfo, env_rank, init_distributed, shutdown
from kfoundry.train.evaluation import evaluate_by_language
from kfoundry.train.trainer import LoaderSource, Stage, StepLoss, Trainer, config_of, open_run, settings_of

__all__ = ["find_resumable", "list_checkpoints", "lm_loss", "pretrain"]


def lm_loss(model, batch, z_loss: float = 0.0) -> StepLoss:
    """Next-token cross-entropy summed over the targets (-1 = no target), plus `train.z_loss` times the summed
    squared log-normaliser when it is set (the logged training loss then includes that term; validation does not)."""
    x, y = batch
    count = (y >= 0).sum()
    return StepLoss(loss=model(x, y, reduction="sum", z_loss=z_loss), count=count, tokens=count)


def check_shapes(cfg: RunConfig, tok: KTokenizer) -> None:
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}")
    complete(cfg)  # the one set of rules (config.validate), now that the model is final (--init replaces it)


def pretrain(cfg: RunConfig, out_dir: str | Path, *, shard_dir: str | Path, tokenizer_dir: str | Path,
             resume: str | None = None, init: str | Path | None = None, progress: bool = True, explicit: bool = True,
             allow_change: bool = False, log=lambda msg: print(msg, file=sys.stderr)) -> dict[str, Any]:
    """Train; returns the Trainer's summary (final checkpoint, last evaluation, tokens/s, MFU). Under torchrun every
    rank calls this; rank 0 alone writes logs, metrics and the non-sharded parts of checkpoints.

    `explicit=False` means the caller's settings are only defaults (the command line named none): a resumed run
    then continues with its recorded settings. See `trainer.open_run` for the resume rules."""
    out_dir, shard_dir = Path(out_dir), Path(shard_dir)
    parent = None
    if init is not None:  # continued pretraining: the model is the one of the weights it starts from
        cfg.model = load_config(init)
        parent = str(Path(init).resolve())
    if env_rank() == 0:
        if resume is None and list_checkpoints(out_dir / "ckpt"):
            open_run(out_dir, settings_of(cfg), resume=None, info=DistInfo(), log=log)  # refuses, before any hashing
        # Hash the shards into the ledger before the process group exists: no rank waits in a collective on it.
        provenance.record_data(out_dir, shard_dir, tokenizer_dir=tokenizer_dir)
    info = init_distributed(cfg.train.device, cfg.train.dist_timeout_minutes)
    device = info.device
    run = open_run(out_dir, settings_of(cfg), resume=resume, info=info, explicit=explicit, allow_change=allow_change,
                   log=log if info.is_main else (lambda m: None))
    cfg, _ = config_of(run.settings)
    tc = cfg.train
    tok = KTokenizer.load(tokenizer_dir)
    check_shapes(cfg, tok)
    if init is not None and run.start is None:
        model = load_model(init, device=device)
    elif info.enabled and tc.parallel == "fsdp":
        # Build on the meta device (no memory); the Trainer shards it, then each rank allocates and initialises
        # only its shard, drawing the very weights one process would: a model larger than one GPU can be built.
        with torch.device("meta"):
            model = Transformer(cfg.model)
    else:  # fresh, or the shape a resumed checkpoint's weights are loaded into
        model = Transformer.build(cfg.model, device=device, seed=tc.seed)
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long, device=device)
    loader = PackedLoader(shard_dir, split="train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=tc.seed,
                          rank=info.rank, world_size=info.world_size, expect_tokenizer_hash=tok.hash)

    def evaluate(m) -> dict[str, float]:
        return evaluate_by_language(m, shard_dir, batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                                    max_batches=tc.eval_batches, token_bytes=token_bytes, device=device, info=info)

    stage = Stage("pretrain", loss=functools.partial(lm_loss, z_loss=tc.z_loss), source=LoaderSource(loader),
                  evaluate=evaluate,
                  flops_per_token=model.flops_per_token(tc.seq_len),
                  start_info={"shard_tokens_used_per_epoch": loader.token_use()})
    trainer = Trainer(stage, cfg, out_dir, run=run, model=model, tokenizer=tok, info=info, device=device,
                      parent=parent, record_init=init is None, progress=progress, log=log)
    summary = trainer.fit()
    shutdown(info)
    return summary

