"""`kfoundry export hf --model CKPT --out DIR` (GGUF joins this group later)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a checkpoint to ecosystem formats")
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = formats.add_parser("hf", help="Hugging Face LlamaForCausalLM directory")
    hf.add_argument("--model", required=True, help="checkpoint directory")
    hf.add_argument("--out", required=True, help="output directory")
    hf.add_argument("--overwrite", action="store_true")
    hf.set_defaults(func=_export_hf)


def _export_hf(args) -> int:
    from kfoundry.export.hf import export_hf

    out = export_hf(args.model, args.out, overwrite=args.overwrite)
    print(f"exported Hugging Face model to {out}")
    return 0
