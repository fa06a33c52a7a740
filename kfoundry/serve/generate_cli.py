"""`kfoundry generate --model CKPT --prompt TEXT`: sample from any checkpoint."""

from __future__ import annotations

import argparse
import sys

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.model.generate import SamplingParams, generate
from kfoundry.model.quantize import quantize_int8
from kfoundry.text import nfc


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=["int8"], default=None, help="int8 weight-only matrices (CPU decoding)")
    p.set_defaults(func=_generate)


def complete(model, tok, prompts: list[str], params) -> list[str]:
    """Prompts in, continuations out (text). BOS is prepended as in training; generation stops at end-of-text."""
    ids = [tok.encode(nfc(p), bos=True) for p in prompts]
    out = generate(model, ids, params, stop_ids={tok.eos_id, tok.eot_id}, pad_id=tok.pad_id)
    return [tok.decode(o) for o in out]


def _generate(args) -> int:
    model = load_model(args.model, device=args.device)
    if args.quantize == "int8":
        quantize_int8(model)
    tok = load_tokenizer(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    for prompt, text in zip(args.prompt, complete(model, tok, args.prompt, params)):
        sys.stdout.write(f"{prompt}{text}\n")
    return 0
