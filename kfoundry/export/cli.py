"""`kfoundry export hf --model CKPT --out DIR` and `kfoundry export gguf --model CKPT --out FILE --type T`."""

from __future__ import annotations

import argparse

from kfoundry.export.hf import export_hf
from kfoundry.extras import require


def register(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser("export", help="export a checkpoint to ecosystem formats")
    formats = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = formats.add_parser("hf", help="Hugging Face LlamaForCausalLM directory")
    hf.add_argument("--model", required=True, help="checkpoint directory")
    hf.add_argument("--out", required=True, help="output directory")
    hf.add_argument("--overwrite", action="store_true")
    hf.set_defaults(func=_export_hf)
    gg = formats.add_parser("gguf", help="one GGUF file for llama.cpp (f32, f16, q8_0 or q4_0)")
    gg.add_argument("--model", required=True, help="checkpoint directory")
    gg.add_argument("--out", required=True, help="output .gguf file")
    gg.add_argument("--type", default="f16", choices=["f32", "f16", "q8_0", "q4_0"], help="storage of the matrices")
    gg.add_argument("--overwrite", action="store_true")
    gg.set_defaults(func=_export_gguf)


def _export_hf(args) -> int:
    out = export_hf(args.model, args.out, overwrite=args.overwrite)
    print(f"exported Hugging Face model to {out}")
    return 0


def _export_gguf(args) -> int:
    require("export", "kfoundry export gguf")
    from kfoundry.export.gguf import export_gguf  # the [export] extra (gguf)

    res = export_gguf(args.model, args.out, out_type=args.type, overwrite=args.overwrite)
    print(f"exported {res.out_type} GGUF to {res.path} ({res.size_bytes / 1e6:.2f} MB)")
    return 0
