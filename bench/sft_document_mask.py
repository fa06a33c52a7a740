"""SFT step time: conversations packed with a DocumentMask (now) against the dense [B, 1, T, T] mask SFT built
on the host every step before (the peer, rebuilt here exactly as it was), in the same run on the same batches.

    python bench/sft_document_mask.py                      # 8 x 2048, cpu-tiny's width, 5 timed steps each
    python bench/sft_document_mask.py --batch 8 --seq 2048 --steps 5 --threads 2

A step is what SFT's training step does: collate the rows, forward, backward (fp32 on the CPU). Conversations
are random tokens with lengths drawn uniformly from 10 to 250 (the range of chat examples), packed by
`kfoundry.post.sft.pack`. Both paths see identical batches; their losses are printed to show they agree.
Prints one JSON object with the median step times, the ratio, and the share of the old step spent building
the mask alone.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

from kfoundry.config import ModelConfig, preset
from kfoundry.model.llama import Transformer
from kfoundry.post import sft as S


def old_block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """The pre-DocumentMask rule, as sft.py had it: [B, T] segment ids (-1 = padding) -> [B, 1, T, T]."""
    T = segments.shape[1]
    same = segments[:, :, None] == segments[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    mask = same & causal & (segments[:, :, None] >= 0)
    mask |= torch.eye(T, dtype=torch.bool, device=segments.device) & (segments[:, :, None] < 0)
    return mask[:, None]


def old_collate_mask(rows) -> torch.Tensor:
    """The segment ids the old collate filled, then its dense mask."""
    T = max(sum(len(ex.ids) - 1 for ex in row) for row in rows)
    seg = torch.full((len(rows), T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        at = 0
        for s, ex in enumerate(row):
            n = len(ex.ids) - 1
            seg[b, at:at + n] = s
            at += n
    return old_block_causal_mask(seg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = preset("cpu-tiny").model
    cfg = ModelConfig(**{**base.__dict__, "max_seq_len": args.seq})
    model = Transformer.build(cfg, seed=0)
    rng = random.Random(0)

    def batch_rows():
        examples = []
        while sum(len(e.ids) - 1 for e in examples) < args.batch * args.seq:
            n = rng.randint(10, 250)
            ids = tuple(rng.randrange(cfg.vocab_size) for _ in range(n + 1))
            examples.append(S.Example(ids, tuple(i > n // 3 for i in range(n + 1))))
        return S.pack(examples, args.seq)[: args.batch]

    def step_new(rows):
        batch = S.collate(rows, pad_id=0)
        loss = S.packed_loss_sum(model, batch) / batch.n_targets
        loss.backward()
        return float(loss.detach())

    def step_old(rows):
        batch = S.collate(rows, pad_id=0)  # the same tensors; the mask below is what the old collate added
        t0 = time.perf_counter()
        mask = old_collate_mask(rows)
        mask_s = time.perf_counter() - t0
        loss = model(batch.x, batch.y, positions=batch.positions.clamp(min=0), attn_mask=mask,
                     reduction="sum") / batch.n_targets
        loss.backward()
        return float(loss.detach()), mask_s

    times = {"new": [], "old": []}
    mask_times, diffs = [], []
    for i in range(args.steps + 1):  # the first step of each is warm-up
        rows = batch_rows()
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        new_loss = step_new(rows)
        t_new = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        old_loss, mask_s = step_old(rows)
        t_old = time.perf_counter() - t0
        if i:
            times["new"].append(t_new)
            times["old"].append(t_old)
            mask_times.append(mask_s)
            diffs.append(abs(new_loss - old_loss))
    new, old = statistics.median(times["new"]), statistics.median(times["old"])
    print(json.dumps({"shape": [args.batch, args.seq], "threads": args.threads, "params": model.num_params(),
                      "step_s_document_mask": round(new, 3), "step_s_dense_mask": round(old, 3),
                      "speedup": round(old / new, 2), "dense_mask_build_s": round(statistics.median(mask_times), 3),
                      "max_loss_diff": max(diffs), "loadavg_1m": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
