"""Post-training commands: `kfoundry sft`, `dpo`, `merge` and `chat`. Each is a thin call into its module."""

from __future__ import annotations

import argparse
import json


def _train_args(p: argparse.ArgumentParser, epochs: float) -> None:
    p.add_argument("--model", required=True, help="checkpoint to start from")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="training data file, or 'starter' for the bundled set (repeatable)")
    p.add_argument("--out", required=True, help="run directory (checkpoints in OUT/ckpt/step-N)")
    p.add_argument("--val-data", action="append", default=[], metavar="FILE",
                   help="held-out data (default: a seeded --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=float, default=epochs, help="passes over the data, unless train.max_steps is set")
    p.add_argument("--preset", default=None, help="batch shape and device from this preset (default cpu-tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                   help="override a training setting, e.g. --set train.lr=5e-4 (repeatable)")
    p.add_argument("--resume", default=None, help="'auto' = newest complete checkpoint under OUT/ckpt, or a path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or TensorBoard")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)")
    _train_args(p, epochs=3.0)
    p.set_defaults(func=_sft)

    p = sub.add_parser("dpo", help="direct preference optimization on prompt/chosen/rejected pairs")
    _train_args(p, epochs=2.0)
    p.add_argument("--beta", type=float, default=0.1, help="how far the policy may move from the reference")
    p.set_defaults(func=_dpo)

    p = sub.add_parser("merge", help="merge checkpoints of one architecture (linear or SLERP)")
    p.add_argument("--models", nargs="+", required=True, metavar="CKPT")
    p.add_argument("--weights", nargs="+", type=float, default=None,
                   help="one weight per model (normalised to sum to 1); slerp also takes a single t in [0, 1]")
    p.add_argument("--method", choices=["linear", "slerp"], default="linear")
    p.add_argument("--out", required=True, help="merged checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out checkpoint")
    p.set_defaults(func=_merge)

    p = sub.add_parser("chat", help="chat with a checkpoint in the terminal (streaming, multi-turn)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_chat)


def _print_summary(summary: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: summary.get(k) for k in keys}, ensure_ascii=False))


def _sft(args) -> int:
    from kfoundry.post.sft import sft, sft_train_config

    tc = sft_train_config(args.preset, args.overrides)
    summary = sft(args.model, args.data, args.out, tc, val_data=args.val_data, val_fraction=args.val_fraction,
                  epochs=args.epochs, resume=args.resume, progress=not args.no_progress)
    _print_summary(summary, ("step", "first_loss", "final_loss", "val_loss", "checkpoint", "data"))
    return 0


def _dpo(args) -> int:
    from kfoundry.post.dpo import dpo, dpo_train_config

    tc = dpo_train_config(args.preset, args.overrides)
    summary = dpo(args.model, args.data, args.out, tc, beta=args.beta, val_data=args.val_data,
                  val_fraction=args.val_fraction, epochs=args.epochs, resume=args.resume,
                  progress=not args.no_progress)
    ev = summary.get("eval") or {}
    _print_summary({**summary, **{k: ev.get(k) for k in ("val_reward_acc", "val_reward_margin")},
                    **{f"train_{k}": summary["last_train"].get(k) for k in ("reward_acc", "reward_margin")}},
                   ("step", "final_loss", "train_reward_acc", "train_reward_margin", "val_reward_acc",
                    "val_reward_margin", "checkpoint", "data"))
    return 0


def _merge(args) -> int:
    from kfoundry.post.merge import merge

    meta = merge(args.models, args.out, method=args.method, weights=args.weights, overwrite=args.overwrite)
    print(json.dumps({"checkpoint": args.out, "method": meta["method"], "weights": meta["weights"]}))
    return 0


def _chat(args) -> int:
    from kfoundry.model.generate import SamplingParams
    from kfoundry.post.chat import chat_main

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    params.validate()
    return chat_main(args.model, system=args.system, params=params, device=args.device)
