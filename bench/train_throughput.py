"""Training throughput and MFU: our model vs Hugging Face LlamaForCausalLM, same run, same machine.

Both models get the same configuration, the same initial weights, the same batches and the same AdamW settings
(weight decay on matrices only, via our build_optimizer for both). Rounds alternate between the two so that a
background load on the machine hits both alike. MFU is against the fp32 matmul peak measured on this CPU.

`--compile` adds a third engine, our model under `torch.compile` (what `--set train.compile=true` does in
`kfoundry pretrain`): inductor fuses RMSNorm, rotary embedding, SwiGLU and the loss into generated C++ loops.

The speed of a shared or virtual 2-core machine drifts by 10-20 % within minutes, and a matmul probe taken at one
moment does not describe another. So each round starts with its own probe (`measure_cpu_peak`, the one the
training loop uses), the engines' order flips every round, and MFU is reported two ways: per round against that round's probe (median over rounds),
and against the best probe of the whole run (the conservative figure).

    .venv/bin/python bench/train_throughput.py [--width 512] [--layers 4] [--steps 10] [--rounds 3] [--compile]
        [--accum 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def step_fn(model, opt, is_hf: bool, compiled: bool = False, accum: int = 1):
    """One micro-batch forward/backward per call; clipping and the optimizer step every `accum` calls."""
    fwd = torch.compile(model) if compiled else model
    calls = 0

    def step(x, y):
        nonlocal calls
        if is_hf:
            loss = model(input_ids=x, labels=None).logits
            loss = torch.nn.functional.cross_entropy(loss.float().flatten(0, 1), y.flatten())
        else:
            loss = fwd(x, y)
        (loss / accum).backward()
        calls += 1
        if calls % accum == 0:
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
    ap.add_argument("--compile", action="store_true", help="also time our model under torch.compile")
    ap.add_argument("--accum", type=int, default=1,
                    help="micro-batches per optimizer step (gradient accumulation); --steps counts micro-batches")
    args = ap.parse_args()
    torch.manual_seed(0)
    heads = args.width // 64
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.width, n_layers=args.layers, n_heads=heads, n_kv_heads=heads,
                      ffn_dim=int(args.width * 8 / 3) // 64 * 64, max_seq_len=args.seq)
    ours, hf = make_models(cfg)
    tc = TrainConfig()
    if args.steps % args.accum:
        raise SystemExit("--steps must be a multiple of --accum")
    steps = {"kfoundry": step_fn(ours, build_optimizer(ours, tc, "cpu"), False, accum=args.accum),
             "transformers": step_fn(hf, build_optimizer(hf, tc, "cpu"), True, accum=args.accum)}
    if args.compile:
        compiled = Transformer.build(cfg, seed=0).train()
        steps["kfoundry + torch.compile"] = step_fn(compiled, build_optimizer(compiled, tc, "cpu"), False, True,
                                                    accum=args.accum)
    batches = [(torch.randint(0, args.vocab, (args.batch, args.seq)),) * 2 for _ in range(args.steps)]
    batches = [(x, torch.roll(x, -1, 1)) for x, _ in batches]
    for name, step in steps.items():  # warm-up: allocator, thread pool, first-call overheads, compilation
        timed(step, batches[:args.accum] * max(1, 2 // args.accum))
    tokens = args.steps * args.batch * args.seq
    fpt = ours.flops_per_token(args.seq)
    secs: dict[str, list[float]] = {name: [] for name in steps}
    peaks: list[float] = []
    for r in range(args.rounds):
        peaks.append(measure_cpu_peak(seconds=2.0))
        order = list(steps) if r % 2 == 0 else list(reversed(steps))  # nobody always runs right after the probe
        for name in order:
            secs[name].append(timed(steps[name], batches))
        print(f"round {r}: probe {peaks[-1] / 1e9:.0f} GFLOP/s | " + " | ".join(
            f"{name} {tokens / s[-1]:,.0f} tok/s (MFU {fpt * tokens / s[-1] / peaks[-1]:.1%})" for name, s in secs.items()),
            flush=True)
    best_peak = max(peaks)
    cpu_peak_flops(refresh=True)  # let the training loop's cache see this run's probes too
    result = {"config": vars(args), "params": ours.num_params(), "flops_per_token": fpt, "peaks": peaks,
              "threads": torch.get_num_threads()}
    for name, s in secs.items():
        per_round = [fpt * tokens / t / p for t, p in zip(s, peaks)]
        result[name] = {"tokens_per_sec": tokens / min(s), "mfu_vs_best_probe": fpt * tokens / min(s) / best_peak,
                        "mfu_median_vs_round_probe": statistics.median(per_round), "seconds": s}
    result["ratio_tokens_per_sec"] = result["kfoundry"]["tokens_per_sec"] / result["transformers"]["tokens_per_sec"]
    print(json.dumps(result, indent=2))
    print(f"\nbest probe {best_peak / 1e9:.0f} GFLOP/s; ratio kfoundry / transformers "
          f"{result['ratio_tokens_per_sec']:.2f}x")
    for name in steps:
        r = result[name]
        print(f"{name}: {r['tokens_per_sec']:,.0f} tok/s (best round) | MFU {r['mfu_vs_best_probe']:.1%} of the best "
              f"probe | median per-round MFU {r['mfu_median_vs_round_probe']:.1%} of the round's probe")


if __name__ == "__main__":
    main()
