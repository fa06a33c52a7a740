"""Training throughput and MFU: our model vs Hugging Face LlamaForCausalLM, same run, same machine.

Both models get the same configuration, the same initial weights, the same batches and the same AdamW settings
(weight decay on matrices only, via our build_optimizer for both). Rounds alternate between the two so that a
background load on the machine hits both alike. MFU is against the fp32 matmul peak measured on this CPU.

    .venv/bin/python bench/train_throughput.py [--width 512] [--layers 4] [--steps 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kfoundry.config import ModelConfig, TrainConfig
from kfoundry.export.hf import hf_config
from kfoundry.model.llama import Transformer
from kfoundry.train.mfu import cpu_peak_flops, measure_cpu_peak
from kfoundry.train.optim import build_optimizer


class Ids:
    bos_id, eos_id, pad_id = 1, 2, 0


def make_models(cfg: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = Transformer.build(cfg, seed=0).train()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, Ids), attn_implementation="sdpa")).train()
    hf.load_state_dict(ours.state_dict(), strict=False)
    return ours, hf


def step_fn(model, opt, is_hf: bool):
    def step(x, y):
        if is_hf:
            loss = model(input_ids=x, labels=None).logits
            loss = torch.nn.functional.cross_entropy(loss.float().flatten(0, 1), y.flatten())
        else:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def timed(step, batches) -> float:
    t0 = time.perf_counter()
    for x, y in batches:
        step(x, y)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    heads = args.width // 64
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.width, n_layers=args.layers, n_heads=heads, n_kv_heads=heads,
                      ffn_dim=int(args.width * 8 / 3) // 64 * 64, max_seq_len=args.seq)
    ours, hf = make_models(cfg)
    tc = TrainConfig()
    steps = {"kfoundry": step_fn(ours, build_optimizer(ours, tc, "cpu"), False),
             "transformers": step_fn(hf, build_optimizer(hf, tc, "cpu"), True)}
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq)),) * 2 for _ in range(args.steps)]
    batches = [(x, torch.roll(x, -1, 1)) for x, _ in batches]
    for name, step in steps.items():  # warm-up: allocator, thread pool, first-call overheads
        timed(step, batches[:2])
    secs = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            secs[name].append(timed(step, batches))
    peak = measure_cpu_peak(seconds=2.0)
    cpu_peak_flops(refresh=True)  # refresh the cached probe too, with the same threads
    tokens = args.steps * args.batch * args.seq
    fpt = ours.flops_per_token(args.seq)
    result = {"config": vars(args), "params": ours.num_params(), "flops_per_token": fpt, "peak_flops": peak,
              "threads": torch.get_num_threads()}
    for name, s in secs.items():
        best = min(s)
        result[name] = {"tokens_per_sec": tokens / best, "mfu": fpt * tokens / best / peak, "seconds": s}
    result["ratio_tokens_per_sec"] = result["kfoundry"]["tokens_per_sec"] / result["transformers"]["tokens_per_sec"]
    print(json.dumps(result, indent=2))
    print(f"\nkfoundry {result['kfoundry']['tokens_per_sec']:,.0f} tok/s (MFU {result['kfoundry']['mfu']:.1%}) | "
          f"transformers {result['transformers']['tokens_per_sec']:,.0f} tok/s (MFU {result['transformers']['mfu']:.1%})"
          f" | ratio {result['ratio_tokens_per_sec']:.2f}x | peak {peak / 1e9:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
