"""Run under torchrun by tests/test_optim.py (not collected by pytest: no test_ prefix).

Trains test-micro with `train.optimizer=muon` for STEPS steps three ways and writes what it measured to a JSON file:

- `single`: one plain process on the whole global batch (torch.optim.Muon's own step, plain tensors);
- `sharded`: FSDP2 over the torchrun ranks, each rank its rows of the global batch (ShardedMuon's gathered step);
- `resumed`: FSDP2 again, stopped half way, weights and optimizer state saved with DCP, rebuilt from scratch,
  loaded and finished.

The loss curves and final weights of `sharded` and `resumed` are compared with `single` and with each other.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from kfoundry.config import preset
from kfoundry.model.llama import Transformer
from kfoundry.checkpoint.dcp import DCP_DIR, load_sharded
from kfoundry.train.distributed import DistInfo, init_distributed, parallelize, shutdown
from kfoundry.train.loop import lm_loss
from kfoundry.train.trainer import Stage, accumulate_gradients, normalize_gradients, step_sum_names
from kfoundry.train.optim import apply_lr, build_optimizer

STEPS = 8


def batches(vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One fixed batch, seen every step: a model that learns memorises it, so the loss falls fast."""
    x = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    return [(x, torch.roll(x, -1, dims=1))] * STEPS


def train(model, optimizer, data, info: DistInfo, tc, start: int, stop: int) -> list[float]:
    losses = []
    for step in range(start, stop):
        apply_lr(optimizer, step, tc)
        x, y = data[step]
        mine = [(x[info.rank::info.world_size], y[info.rank::info.world_size])]
        stage = Stage("pretrain", lm_loss, None, None)  # the engine's own step: sums, reduce, scale and clip
        sums = accumulate_gradients(stage, model, model, mine, 1, torch.device("cpu"))
        values, _, _ = normalize_gradients(model, sums, step_sum_names(stage), info, tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(values["loss"] / values["count"])
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(out: str, ckpt_dir: str) -> None:
    info = init_distributed("cpu")
    cfg = preset("test-micro")
    cfg.train.optimizer, cfg.train.max_steps, cfg.train.warmup_steps = "muon", STEPS, 2
    tc = cfg.train
    data = batches(cfg.model.vocab_size)

    single = Transformer.build(cfg.model, seed=0)
    single_losses = train(single, build_optimizer(single, tc, "cpu"), data, DistInfo(), tc, 0, STEPS)

    sharded = parallelize(Transformer.build(cfg.model, seed=0), info, mode="fsdp")
    opt = build_optimizer(sharded, tc, "cpu")
    sharded_losses = train(sharded, opt, data, info, tc, 0, STEPS)

    half = STEPS // 2
    first = parallelize(Transformer.build(cfg.model, seed=0), info, mode="fsdp")
    opt = build_optimizer(first, tc, "cpu")
    resumed_losses = train(first, opt, data, info, tc, 0, half)
    model_sd, optim_sd = get_state_dict(first, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(ckpt_dir) / DCP_DIR))
    del first, opt
    second = parallelize(Transformer.build(cfg.model, seed=1), info, mode="fsdp")  # other weights: load must fix them
    opt = build_optimizer(second, tc, "cpu")
    load_sharded(ckpt_dir, second, opt)
    resumed_losses += train(second, opt, data, info, tc, half, STEPS)

    ref, w_sharded, w_resumed = full_weights(single), full_weights(sharded), full_weights(second)
    init = full_weights(Transformer.build(cfg.model, seed=0))
    norm = lambda d: float(torch.sqrt(sum((v.double() ** 2).sum() for v in d.values())))  # noqa: E731
    # How far the sharded run ends from the single one, relative to how far training moved the weights.
    sharded_vs_single = norm({k: w_sharded[k] - ref[k] for k in ref}) / norm({k: ref[k] - init[k] for k in ref})
    resumed_vs_sharded = max(float((w_resumed[k] - w_sharded[k]).abs().max()) for k in ref)
    if info.rank == 0:
        json.dump({"world_size": info.world_size, "single": single_losses, "sharded": sharded_losses,
                   "resumed": resumed_losses, "rel_weight_diff_sharded_vs_single": sharded_vs_single,
                   "max_weight_diff_resumed_vs_sharded": resumed_vs_sharded,
                   "muon_state": sum("momentum_buffer" in s for s in opt.state.values())}, open(out, "w"))
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
