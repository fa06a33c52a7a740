"""Decode speed at batch 1 with a KV cache: our generator vs `transformers` `generate` on the same weights.

Greedy decoding of a fixed number of new tokens (no early stop), alternating rounds between the two so machine
load affects both alike; the best round of each counts.

    .venv/bin/python bench/decode_speed.py [--new-tokens 256] [--width 512] [--layers 8] [--rounds 3]
    .venv/bin/python bench/decode_speed.py --preset cpu-tiny     # a preset's model shape instead

At batch 1 on the CPU our `generate` decodes through kfoundry/model/decode.py (matrix-vector products, fused
and folded weights); `transformers` runs its general forward. Weights are random (seeded): speed does not depend
on their values, and both engines must still agree on every greedy token.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kfoundry.config import ModelConfig
from kfoundry.export.hf import hf_config
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.llama import Transformer


class Ids:
    bos_id, eos_id, pad_id = 1, 2, 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--preset", default=None, help="take the model shape from this preset (cpu-tiny, nano, ...)")
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.preset:
        from dataclasses import replace

        from kfoundry.config import preset
        cfg = replace(preset(args.preset).model, max_seq_len=args.prompt + args.new_tokens)
    else:
        heads = args.width // 64
        cfg = ModelConfig(vocab_size=args.vocab, dim=args.width, n_layers=args.layers, n_heads=heads,
                          n_kv_heads=args.kv_heads, ffn_dim=int(args.width * 8 / 3) // 64 * 64,
                          max_seq_len=args.prompt + args.new_tokens)
    ours = Transformer.build(cfg, seed=0).eval()
    hf = LlamaForCausalLM(LlamaConfig(**hf_config(cfg, Ids), attn_implementation="sdpa")).eval()
    hf.load_state_dict(ours.state_dict(), strict=False)
    prompt = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens

    def run_ours():
        return generate(ours, [prompt[0].tolist()], SamplingParams(max_new_tokens=n))[0]

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        return out[0, args.prompt:].tolist()

    a, b = run_ours(), run_hf()  # warm-up, and a check that both decode the same tokens
    same_prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    secs = {"kfoundry": [], "transformers": []}
    for _ in range(args.rounds):
        for name, fn in (("kfoundry", run_ours), ("transformers", run_hf)):
            t0 = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - t0)
    result = {"config": vars(args), "model": vars(cfg), "params": ours.num_params(), "threads": torch.get_num_threads(),
              "identical_greedy_tokens": same_prefix}
    for name, s in secs.items():
        result[name] = {"tokens_per_sec": n / min(s), "seconds": s}
    result["ratio"] = result["kfoundry"]["tokens_per_sec"] / result["transformers"]["tokens_per_sec"]
    print(json.dumps(result, indent=2))
    print(f"\nkfoundry {result['kfoundry']['tokens_per_sec']:,.1f} tok/s | transformers "
          f"{result['transformers']['tokens_per_sec']:,.1f} tok/s | ratio {result['ratio']:.2f}x | "
          f"greedy tokens identical for the first {same_prefix} of {n}")


if __name__ == "__main__":
    main()
