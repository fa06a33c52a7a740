"""Run under torchrun by tests/test_distributed.py (no test_ prefix: not collected).

Computes one optimizer step's gradient with the training engine's step (`accumulate_gradients` +
`normalize_gradients`: FSDP2 or DDP, each rank its share of the global batch) and with a single process on the
whole global batch, for one stage's loss (pretraining, SFT or DPO), and writes the largest absolute difference
to a JSON file. Every MODE:STAGE pair given runs in the same process group, one after another, on a fresh model
(one launch instead of one per pair: starting two ranks costs more than the six steps), and the file maps
"MODE-STAGE" to that pair's result.

    torchrun --nproc_per_node 2 tests/dist_worker_grads.py OUT.json fsdp:lm ddp:lm fsdp:sft ...
"""

import json
import sys

import torch

from kfoundry.config import preset
from kfoundry.model.llama import Transformer
from kfoundry.post.dpo import PairBatch, dpo_loss
from kfoundry.post.sft import Example, collate, sft_loss
from kfoundry.train.distributed import DistInfo, init_distributed, parallelize, shutdown
from kfoundry.train.loop import lm_loss
from kfoundry.train.trainer import Stage, accumulate_gradients, normalize_gradients, step_sum_names

DPO_METRICS = ("reward_acc", "reward_margin", "chosen_reward", "rejected_reward")


def global_batches(kind: str, vocab: int) -> tuple[list, Stage]:
    """Two micro-batches (the global batch of one step), with uneven target counts on purpose: the loss must be
    weighted per target over the whole global batch, not a mean of per-rank means."""
    gen = torch.Generator().manual_seed(0)
    if kind == "lm":
        x = torch.randint(0, vocab, (8, 32), generator=gen)
        y = torch.randint(0, vocab, (8, 32), generator=gen)
        y[3, 5:] = -1
        y[6, :20] = -1
        return [(x[:4], y[:4]), (x[4:], y[4:])], Stage("lm", lm_loss, None, None)
    if kind == "sft":
        def example(n: int, learn_from: int) -> Example:
            ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
            return Example(tuple(ids), tuple(i >= learn_from for i in range(n)))

        rows_a = [[example(12, 6), example(9, 2)], [example(20, 15)]]
        rows_b = [[example(30, 3)], [example(7, 4), example(8, 5), example(6, 1)]]
        return [collate(rows_a, 0), collate(rows_b, 0)], Stage("sft", sft_loss, None, None)
    if kind == "dpo":
        def pair_batch(b: int, t: int) -> PairBatch:
            x = torch.randint(3, vocab, (2 * b, t), generator=gen)
            y = torch.randint(3, vocab, (2 * b, t), generator=gen)
            y[:, : t // 3] = -1  # the prompt: no targets
            return PairBatch(x, y, -torch.rand(b, 2, generator=gen) * 40)

        return [pair_batch(3, 16), pair_batch(2, 24)], Stage("dpo", dpo_loss(0.1, 0), None, None,
                                                             metric_names=DPO_METRICS)
    raise SystemExit(f"unknown stage {kind}")


def one_pair(info: DistInfo, mode: str, kind: str) -> dict:
    cfg = preset("test-micro").model
    micro_global, stage = global_batches(kind, cfg.vocab_size)
    names = step_sum_names(stage)

    single = Transformer.build(cfg, seed=0)
    sums = accumulate_gradients(stage, single, single, micro_global, len(micro_global), torch.device("cpu"))
    ref, ref_norm, _ = normalize_gradients(single, sums, names, DistInfo(), grad_clip=0.0)

    model = Transformer.build(cfg, seed=0)
    wrapped = parallelize(model, info, mode=mode)
    mine = micro_global[info.rank::info.world_size]  # rank r draws micro-batch r of the step (EpochSource's deal)
    sums = accumulate_gradients(stage, wrapped, wrapped, mine, len(mine), torch.device("cpu"))
    got, norm, _ = normalize_gradients(wrapped, sums, names, info, grad_clip=0.0)

    worst = 0.0
    named_single = dict(single.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, float((g - named_single[name.replace("_checkpoint_wrapped_module.", "")].grad).abs().max()))
    return {"max_abs_grad_diff": worst, "loss": got["loss"] / got["count"], "ref_loss": ref["loss"] / ref["count"],
            "n": got["count"], "ref_n": ref["count"], "grad_norm": norm, "ref_grad_norm": ref_norm,
            "world_size": info.world_size}


def main(out: str, pairs: list[str]) -> None:
    info = init_distributed("cpu")
    results = {}
    for pair in pairs:
        mode, kind = pair.split(":")
        results[f"{mode}-{kind}"] = one_pair(info, mode, kind)
    if info.rank == 0:
        json.dump(results, open(out, "w"))
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
