"""Which attention kernels do pretraining and SFT run? Exit 1 if either runs SDPA's math kernel or no fused one.

    python scripts/check_attention_kernels.py                       # the GPU, gpu-124m shape, bf16 autocast
    python scripts/check_attention_kernels.py --device cpu --preset test-micro

One training forward and backward of the preset's model, once as pretraining runs it (causal rows, no mask) and
once as SFT runs it (conversations packed into rows by `kfoundry.post.sft.collate`, attention confined to each
conversation by a `DocumentMask`), under torch.profiler. The attention operators that ran are sorted into fused
kernels (flash, cuDNN, memory-efficient, FlashAttention varlen; the CPU's flash kernel) and the math kernel,
which materialises the [B, H, T, T] score matrix and is what an explicit dense mask falls back to on a GPU with
grouped-query attention. Prints one JSON object; `scripts/gpu_check.sh` runs it.
"""

from __future__ import annotations

import argparse
import json
import random
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from kfoundry.config import preset
from kfoundry.model.llama import Transformer
from kfoundry.post.sft import Example, collate, pack, packed_loss_sum

FUSED = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
         "_scaled_dot_product_efficient_attention", "_flash_attention_forward", "_flash_attention_backward",
         "_scaled_dot_product_fused_attention_overrideable", "_efficient_attention_forward", "_cudnn_attention")
MATH = ("_scaled_dot_product_attention_math",)


def attention_ops(run) -> dict[str, list[str]]:
    """The aten attention operators `run()` dispatches, sorted into fused and math."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        run()
    names = {e.key for e in prof.key_averages()}
    return {"fused": sorted(n for n in names if any(f in n for f in FUSED)),
            "math": sorted(n for n in names if any(m in n for m in MATH))}


def conversations(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[Example]:
    """Random conversations of 8 .. seq_len/4 tokens with an assistant half: only their lengths matter here."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(8, max(9, seq_len // 4))
        ids = tuple(rng.randrange(vocab) for _ in range(length + 1))
        out.append(Example(ids, tuple(i > length // 2 for i in range(length + 1))))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="gpu-124m")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    device = torch.device(args.device)
    cfg = preset(args.preset)
    T = cfg.train.seq_len
    model = Transformer.build(cfg.model, device=device, seed=0)
    # bf16 autocast on a GPU (the fused kernels need 16-bit inputs there); fp32 on a CPU, as training runs it.
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    x = torch.randint(0, cfg.model.vocab_size, (args.batch_size, T), device=device)

    def pretrain_step():
        with amp:
            loss = model(x, x)
        loss.backward()

    rows = pack(conversations(args.batch_size * T // 20, T, cfg.model.vocab_size), T)[: args.batch_size]
    batch = collate(rows, pad_id=0).to(device)

    def sft_step():
        with amp:
            loss = packed_loss_sum(model, batch) / batch.n_targets
        loss.backward()

    pretrain_step(), sft_step()  # warm-up: first-call kernel selection and allocation stay out of the profile
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "shape": [args.batch_size, T], "pretrain": attention_ops(pretrain_step), "sft": attention_ops(sft_step)}
    ok = all(report[k]["fused"] and not report[k]["math"] for k in ("pretrain", "sft"))
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
