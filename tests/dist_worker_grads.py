"""Run under torchrun by tests/test_distributed.py (not collected by pytest: no test_ prefix).

Computes one step's gradients with our distributed step (FSDP2 or DDP, each rank its rows of the global batch) and
with a single process on the whole global batch, and writes the largest absolute difference to a JSON file.
"""

import json
import sys

import torch

from kfoundry.config import preset
from kfoundry.model.llama import Transformer
from kfoundry.train.distributed import init_distributed, parallelize, shutdown
from kfoundry.train.loop import forward_backward


def main(mode: str, out: str) -> None:
    info = init_distributed("cpu")
    cfg = preset("test-micro").model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (8, 32), generator=gen)  # the global batch: 2 micro-batches of 4 rows
    y = torch.randint(0, cfg.vocab_size, (8, 32), generator=gen)
    y[3, 5:] = -1  # uneven token counts across ranks: the loss must be token-weighted, not a mean of means
    y[6, :20] = -1
    micro_global = [(x[:4], y[:4]), (x[4:], y[4:])]

    single = Transformer.build(cfg, seed=0)
    ref_loss, ref_n = forward_backward(single, single, micro_global, type(info)(), torch.device("cpu"))

    model = Transformer.build(cfg, seed=0)
    wrapped = parallelize(model, info, mode=mode)
    mine = [(bx[info.rank::info.world_size], by[info.rank::info.world_size]) for bx, by in micro_global]
    loss, n = forward_backward(wrapped, wrapped, mine, info, torch.device("cpu"))

    worst = 0.0
    named_single = dict(single.named_parameters())
    for name, p in model.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        worst = max(worst, float((g - named_single[name.replace("_checkpoint_wrapped_module.", "")].grad).abs().max()))
    if info.rank == 0:
        json.dump({"max_abs_grad_diff": worst, "loss": loss, "ref_loss": ref_loss, "n": n, "ref_n": ref_n,
                   "world_size": info.world_size}, open(out, "w"))
    shutdown(info)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
