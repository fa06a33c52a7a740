"""`kfoundry upscale` (depth up-scaling) and `kfoundry import hf` (a reference model as a starting point).

    kfoundry upscale --model CKPT --drop M --out DIR           # SOLAR: 2(n - m) layers
    kfoundry upscale --model CKPT --layers 0-23,8-31 --out DIR  # any explicit plan
    kfoundry import hf --model HF_DIR --out DIR [--tokenizer TOK_DIR]

Continue pretraining a grown model with `kfoundry pretrain --init DIR --tokenizer DIR/tokenizer ...`; see
docs/growth.md.
"""

from __future__ import annotations

import argparse
import json
import sys

from kfoundry.checkpoint import read_meta
from kfoundry.convert.import_hf import import_hf
from kfoundry.convert.upscale import upscale_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("upscale", help="grow a checkpoint by depth up-scaling (SOLAR)")
    up.add_argument("--model", required=True, help="parent checkpoint directory")
    plan = up.add_mutually_exclusive_group(required=True)
    plan.add_argument("--drop", type=int, help="SOLAR plan: stack layers 0..n-M-1 and M..n-1 (2(n-M) layers)")
    plan.add_argument("--layers", help="explicit plan of parent layers, inclusive ranges, e.g. 0-23,8-31")
    up.add_argument("--out", required=True, help="output checkpoint directory")
    up.add_argument("--overwrite", action="store_true")
    up.set_defaults(func=_upscale)

    imp = sub.add_parser("import", help="import an outside checkpoint (marked as derived from external weights)")
    kinds = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = kinds.add_parser("hf", help="a local Hugging Face LlamaForCausalLM / MistralForCausalLM directory")
    hf.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    hf.add_argument("--out", required=True, help="output checkpoint directory")
    hf.add_argument("--tokenizer", default=None,
                    help="kfoundry tokenizer directory to attach (default: the source's, when compatible)")
    hf.add_argument("--overwrite", action="store_true")
    hf.set_defaults(func=_import_hf)


def _upscale(args) -> int:
    out = upscale_checkpoint(args.model, args.out, drop=args.drop, layers=args.layers, overwrite=args.overwrite)
    info = read_meta(out)["upscale"]
    print(json.dumps({"checkpoint": str(out), "parent_layers": info["parent_layers"], "layers": info["layers"],
                      "plan": info["plan_text"]}))
    return 0


def _import_hf(args) -> int:
    out, note = import_hf(args.model, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    if note:
        print(f"kfoundry: note: no tokenizer attached: {note}; pass --tokenizer DIR to attach a kfoundry tokenizer",
              file=sys.stderr)
    print(json.dumps({"checkpoint": str(out), "derived_from_external": True}))
    return 0
