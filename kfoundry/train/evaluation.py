"""Validation on token shards: mean loss and bits per byte, overall and per language (pretraining, distillation).

Bits per byte = total loss in bits / total UTF-8 bytes of the predicted tokens. It does not depend on the
tokenizer (a tokenizer with longer tokens has fewer, harder predictions; per byte that cancels out), so it compares
models with different vocabularies. Special tokens (zero bytes, e.g. BOS) are left out of both sums.

Under torchrun each rank scores its rows of each global batch and the sums are all-reduced on the device; every
rank runs the same number of forward passes (FSDP's collectives need that), so a final partial batch may be left
out. Evaluation always reads the validation split of the shards the run trains on: the split is fixed when the
shards are written, so no stage can score a model on documents it trained on.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from kfoundry.data.loader import PackedLoader
from kfoundry.data.shards import read_meta
from kfoundry.train.distributed import DistInfo, all_reduce_sum
from kfoundry.train.precision import autocast

LN2 = math.log(2)


@torch.no_grad()
def evaluate(model, shard_dir: Path, *, batch_size: int, seq_len: int, max_batches: int, token_bytes: torch.Tensor,
             device: torch.device, lang: str | None = None, info: DistInfo | None = None,
             ) -> dict[str, float] | None:
    info = info or DistInfo()
    loader = PackedLoader(shard_dir, split="val", batch_size=batch_size, seq_len=seq_len, seed=0, lang=lang,
                          loop=False, rank=info.rank, world_size=info.world_size)
    batches = []
    for x, y in loader:
        if len(batches) >= max_batches:
            break
        batches.append((x, y))
    n = torch.tensor(len(batches), device=device)
    if info.enabled and info.world_size > 1:
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # nats, bytes, tokens
    for x, y in batches[: int(n)]:
        x, y = x.to(device), y.to(device)
        with autocast(device):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                                 ignore_index=-1)
        b = token_bytes[y.clamp(min=0)].flatten()
        counted = (b > 0) & (y.flatten() >= 0)
        sums += torch.stack([loss[counted].double().sum(), b[counted].double().sum(), counted.double().sum()])
    model.train(was_training)
    nats, nbytes, ntok = all_reduce_sum(sums, info).tolist()
    if ntok == 0:
        return None
    return {"loss": nats / ntok, "bpb": nats / nbytes / LN2, "tokens": int(ntok)}


def val_languages(shard_dir: Path) -> list[str]:
    """Languages present in the validation split, for per-language bits per byte."""
    if not (Path(shard_dir) / "meta.json").is_file():
        return []
    langs = read_meta(shard_dir).get("splits", {}).get("val", {}).get("by_lang", {})
    return sorted(k for k in langs if k in ("ko", "en"))


def evaluate_by_language(model, shard_dir: Path, *, batch_size: int, seq_len: int, max_batches: int,
                         token_bytes: torch.Tensor, device: torch.device, info: DistInfo | None = None,
                         ) -> dict[str, float]:
    """{val_loss, val_bpb, val_loss_ko, val_bpb_ko, ...}: overall, then per language present."""
    out: dict[str, float] = {}
    for lang in [None, *val_languages(shard_dir)]:
        r = evaluate(model, shard_dir, batch_size=batch_size, seq_len=seq_len, max_batches=max_batches,
                     token_bytes=token_bytes, device=device, lang=lang, info=info)
        if r is not None:
            suffix = f"_{lang}" if lang else ""
            out[f"val_loss{suffix}"], out[f"val_bpb{suffix}"] = r["loss"], r["bpb"]
    return out
