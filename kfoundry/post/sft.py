"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat format.

    chats (JSONL messages / Q-A CSV / starter) -> render with the chat template -> (ids, assistant mask)
        -> pack several conversations per row, each attending only to itself -> loss on assistant tokens only

Choices, and why:

- **Packing with per-conversation attention** (not padding). Chat examples are short and uneven (10 to 250
  tokens); padding each to the longest would spend most of the compute on pad tokens. Conversations are packed
  greedily into rows of `train.seq_len` tokens; each attends causally to itself only, and position ids restart at
  0 for each, so a packed conversation computes exactly what it would alone (the test proves it). The rule travels
  as the conversations' lengths (`model.masks.DocumentMask`), not as a dense [T, T] mask: on a GPU attention stays
  in a fused variable-length flash kernel, and its cost is the sum of each conversation's square, not the row's.
- **Loss only on assistant tokens**: the targets are -1 (ignored) except where the next token is assistant content
  or the end-of-turn token that closes it (`chat_format.render`). The step loss is the mean over those tokens.
- **Whole conversations or nothing**: a conversation longer than `train.seq_len + 1` tokens is left out and
  counted (`too_long`), never truncated mid-answer.
- **Validation loss** on held-out conversations (`--val-data`, or a seeded `--val-fraction` of the data), on
  assistant tokens only, every `train.eval_every` steps.
- **The one training engine** (train/trainer.py), as pretraining: OUT/ckpt/step-N with trainer_state.json, the
  same accumulation, clipping and cadence, and torchrun (`--nproc N`); the epoch order is a pure function of
  (seed, epoch), so `--resume auto` continues bit for bit.
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from kfoundry.checkpoint import load_config, load_model, load_tokenizer
from kfoundry.config import (STAGE_PRESETS, DataConfig, RunConfig, TrainConfig, complete, parse_override, resolve,
                             validate_options)
from kfoundry.errors import ConfigError
from kfoundry.model.llama import Transformer
from kfoundry.model.masks import DocumentMask
from kfoundry.post.chat_format import render_many
from kfoundry.post.data import Chat, LoadStats, load_chats, load_split_encode
from kfoundry.post.runner import batches_per_step, derived_max_steps, open_post_run
from kfoundry.train.distributed import shutdown
from kfoundry.train.precision import autocast
from kfoundry.train.trainer import EpochSource, Stage, StepLoss, Trainer

# SFT's defaults are the `sft` stage preset (config.STAGE_PRESETS): the base preset's batch shape and device, with
# optimisation settings suited to fine-tuning. Kept under this name for code that layers on them.
SFT_DEFAULTS: dict[str, Any] = STAGE_PRESETS["sft"]["train"]


def post_train_config(preset_name: str | None, overrides: Sequence[str], stage: str) -> TrainConfig:
    """TrainConfig = base preset's train section, then the stage preset, then `--set train.key=value` overrides;
    validated like every run (config.validate). The model comes from the checkpoint, so only train.* applies."""
    for o in overrides:
        if set(parse_override(o)) != {"train"}:
            raise ConfigError(f"--set {o}: only train.* settings apply here (the model comes from the checkpoint)")
    return resolve(preset_name, overrides=list(overrides), stage=stage).train


def sft_train_config(preset_name: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    return post_train_config(preset_name, overrides, "sft")


# --------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One rendered conversation: ids and the mask of learnable (assistant) positions."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]

    @property
    def inputs(self) -> tuple[int, ...]:
        return self.ids[:-1]

    @property
    def targets(self) -> list[int]:
        """Next-token targets, -1 where the next token is not an assistant token."""
        return [t if m else -1 for t, m in zip(self.ids[1:], self.mask[1:])]


def encode_chats(tok, chats: Sequence[Chat], seq_len: int, stats: LoadStats | None = None) -> list[Example]:
    """Render every chat; those that do not fit `seq_len` inputs are counted as `too_long` and left out."""
    out = []
    for start in range(0, len(chats), RENDER_CHUNK):
        out += _encode_chunk(tok, chats[start:start + RENDER_CHUNK], seq_len, stats)
    return out


RENDER_CHUNK = 2048  # conversations tokenized per batch call: bounds the memory of the intermediate texts


def _encode_chunk(tok, chats: Sequence[Chat], seq_len: int, stats: LoadStats | None) -> list[Example]:
    out = []
    for ids, mask in render_many(tok, chats):
        reason = "too_long" if len(ids) - 1 > seq_len else None if any(mask[1:]) else "nothing_to_learn"
        if reason:
            if stats is not None:  # it was counted as kept when loaded; move it to the refused
                stats.kept -= 1
                stats.reject(reason)
            continue
        out.append(Example(tuple(ids), tuple(mask)))
    return out


def examples_sha256(*groups: Sequence[Example]) -> str:
    """A fingerprint of the tokenized data: resume refuses to continue on different data."""
    h = hashlib.sha256()
    for g, examples in enumerate(groups):
        h.update(f"group{g}:{len(examples)};".encode())
        for ex in examples:
            h.update(repr((ex.ids, ex.mask)).encode())
    return h.hexdigest()


# -------------------------------------------------------------------------------------------- packing


PACK_LOOKBACK = 16  # open rows a conversation may join; bounds packing at O(n * 16) for any data size


def pack(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Pack conversations into rows of at most `seq_len` inputs, in order, first fit among the last open rows.

    Looking back a few rows lets a short conversation fill the gap a long one left, so rows are nearly full
    without sorting the data (which would put all long conversations together and skew each batch).
    """
    rows: list[list[Example]] = []
    used: list[int] = []
    for ex in examples:
        n = len(ex.ids) - 1
        first = max(0, len(rows) - PACK_LOOKBACK)
        slot = next((r for r in range(first, len(rows)) if used[r] + n <= seq_len), None)
        if slot is None:
            rows.append([])
            used.append(0)
            slot = len(rows) - 1
        rows[slot].append(ex)
        used[slot] += n
    return rows


@dataclass
class PackedBatch:
    """A collated batch of packed conversations, with its token counts known on the host (no device sync)."""

    x: torch.Tensor  # [B, T] input ids (pad after the last conversation of a row)
    y: torch.Tensor  # [B, T] targets, -1 = no loss
    positions: torch.Tensor  # [B, T] restart at 0 for each conversation, -1 on padding
    attn_mask: DocumentMask  # the conversations' boundaries: each attends causally to itself only
    n_targets: int  # assistant targets (the loss's denominator)
    n_tokens: int  # real (non-pad) input tokens

    def to(self, device) -> PackedBatch:
        return replace(self, x=self.x.to(device, non_blocking=True), y=self.y.to(device, non_blocking=True),
                       positions=self.positions.to(device, non_blocking=True), attn_mask=self.attn_mask.to(device))


def collate(rows: Sequence[Sequence[Example]], pad_id: int) -> PackedBatch:
    """Rows of conversations -> padded tensors (to the longest row of this batch, not to seq_len).

    The attention rule is the list of conversation lengths per row (`DocumentMask`), never a [B, T, T] matrix:
    the model turns it into one variable-length attention call on a GPU, so fused kernels stay in use.
    """
    lengths = [[len(ex.ids) - 1 for ex in row] for row in rows]
    T = max(sum(row) for row in lengths)
    B = len(rows)
    x = torch.full((B, T), pad_id, dtype=torch.long)
    y = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.full((B, T), -1, dtype=torch.long)
    n_targets = 0
    for b, row in enumerate(rows):
        at = 0
        for ex in row:
            n = len(ex.ids) - 1
            x[b, at:at + n] = torch.tensor(ex.inputs)
            y[b, at:at + n] = torch.tensor(ex.targets)
            pos[b, at:at + n] = torch.arange(n)
            n_targets += sum(ex.mask[1:])  # the targets that are not -1
            at += n
    return PackedBatch(x, y, pos, DocumentMask.from_lengths(lengths, T), n_targets=n_targets,
                       n_tokens=sum(map(sum, lengths)))


def epoch_rows(examples: Sequence[Example], epoch: int, seed: int, seq_len: int, batch_size: int,
               shuffle: bool = True) -> list[list[list[Example]]]:
    """The batches (lists of packed rows) of one epoch: shuffled by (seed, epoch), packed, grouped."""
    order = list(range(len(examples)))
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(examples), generator=gen).tolist()
    rows = pack([examples[i] for i in order], seq_len)
    return [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]


def packed_loss_sum(model, batch: PackedBatch) -> torch.Tensor:
    """Summed cross-entropy over the assistant targets of a packed batch."""
    pos = batch.positions.clamp(min=0)  # padding positions: any valid position, nothing reads their outputs
    return model(batch.x, batch.y, positions=pos, attn_mask=batch.attn_mask, reduction="sum")


@torch.no_grad()
def validation_loss(model, examples: Sequence[Example], seq_len: int, batch_size: int, pad_id: int, device,
                    max_batches: int) -> dict[str, float]:
    """Mean loss (nats per assistant token) on held-out conversations; {} when there are none."""
    if not examples:
        return {}
    device = torch.device(device)
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: one sync at the end
    for i, rows in enumerate(epoch_rows(examples, 0, 0, seq_len, batch_size, shuffle=False)):
        if max_batches and i >= max_batches:
            break
        batch = collate(rows, pad_id).to(device)
        with autocast(device):
            total += packed_loss_sum(model, batch).double()
        count += batch.n_targets
    return {"val_loss": float(total) / count} if count else {}


# ----------------------------------------------------------------------------------------------- the run


def split_chats(chats: Sequence[Chat], val_fraction: float, seed: int) -> tuple[list[Chat], list[Chat]]:
    """A seeded split by conversation; at least one conversation stays in training."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = min(len(chats) - 1, round(val_fraction * len(chats)))
    if n_val <= 0:
        return list(chats), []
    order = torch.randperm(len(chats), generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return [c for i, c in enumerate(chats) if i not in val], [c for i, c in enumerate(chats) if i in val]


def sft_loss(model, batch: PackedBatch) -> StepLoss:
    """Cross-entropy summed over the assistant targets of a packed batch (the Trainer averages per target)."""
    return StepLoss(loss=packed_loss_sum(model, batch), count=batch.n_targets, tokens=batch.n_tokens)


def sft(base: str | Path, data: Sequence[str | Path], out_dir: str | Path, tc: TrainConfig | None = None, *,
        val_data: Sequence[str | Path] = (), val_fraction: float = 0.05, epochs: float = 3.0,
        resume: str | None = None, progress: bool = True, explicit: bool = True, allow_change: bool = False,
        log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict[str, Any]:
    """Fine-tune checkpoint `base` on conversations from `data`; checkpoints go to OUT/ckpt/step-N.

    tc.max_steps=None means `epochs` passes over the training conversations. Returns a summary with the first and
    final training loss, the validation loss and the final checkpoint path. Under torchrun every rank calls this;
    each global batch is dealt out to the ranks (trainer.EpochSource).
    """
    base = Path(base)
    tc = copy.deepcopy(tc) if tc is not None else sft_train_config()  # max_steps/seq_len are filled in below
    model_cfg = load_config(base)
    cfg = complete(RunConfig(model=model_cfg, train=tc, data=DataConfig(corpus=",".join(map(str, data))),
                             preset="sft"), stage="sft")
    tok = load_tokenizer(base)
    train_ex, val_ex, stats = load_split_encode(
        data, val_data, load=load_chats, split=split_chats, encode=encode_chats, tok=tok, seq_len=tc.seq_len,
        val_fraction=val_fraction, seed=tc.seed, stage="sft", units=("conversations", "training conversation"),
        log=log)
    info, run, cfg, options = open_post_run(
        "sft", out_dir, cfg, {"epochs": epochs, "val_fraction": val_fraction}, resume=resume,
        data_sha256=examples_sha256(train_ex, val_ex), explicit=explicit, allow_change=allow_change, log=log)
    tc = cfg.train

    def batches_of(epoch: int) -> list[list[list[Example]]]:
        return epoch_rows(train_ex, epoch, tc.seed, tc.seq_len, tc.micro_batch_size)

    if tc.max_steps is None:
        validate_options("sft", {"epochs": options["epochs"]})
    tc.max_steps = derived_max_steps(run, tc.max_steps, lambda: max(1, math.ceil(
        options["epochs"] * len(batches_of(0)) / batches_per_step(tc, info.world_size))))
    device, pad_id = info.device, tok.pad_id
    source = EpochSource(batches_of, lambda rows: collate(rows, pad_id), info.rank, info.world_size)

    def evaluate(model) -> dict[str, float]:  # every rank scores the same held-out batches (FSDP needs equal work)
        return validation_loss(model, val_ex, tc.seq_len, tc.micro_batch_size, pad_id, device, tc.eval_batches)

    model = load_model(base, device=device) if run.start is None else Transformer.build(cfg.model, device=device)
    stage = Stage("sft", loss=sft_loss, source=source, evaluate=evaluate,
                  flops_per_token=model.flops_per_token(tc.seq_len))
    trainer = Trainer(stage, cfg, out_dir, run=run, model=model, tokenizer=tok, info=info, device=device,
                      parent=str(base.resolve()), data_sha256=examples_sha256(train_ex, val_ex),
                      meta={"data": [str(d) for d in data], "val_data": [str(d) for d in val_data]},
                      progress=progress, log=log)
    summary = trainer.fit()
    shutdown(info)
    summary["val_loss"] = (summary.get("eval") or {}).get("val_loss")
    summary["data"] = {"train_conversations": len(train_ex), "val_conversations": len(val_ex),
                       "kept": stats.kept, "refused": dict(stats.bad)}
    return summary
