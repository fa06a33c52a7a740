"""Post-training commands: `kfoundry sft`, `dpo`, `merge` and `chat`. Each is a thin call into its module."""

from __future__ import annotations

import argparse
import json

from kfoundry.config import STAGE_PRESETS, settings_table, stage_options
from kfoundry.model.generate import SamplingParams
from kfoundry.post.chat import chat_main
from kfoundry.post.dpo import dpo, dpo_train_config
from kfoundry.post.merge import merge
from kfoundry.post.sft import sft, sft_train_config
from kfoundry.train.cli import SETTINGS_EPILOG, add_resume_args, launch_torchrun
from kfoundry.train.distributed import env_rank


def _train_args(p: argparse.ArgumentParser, stage: str) -> None:
    epochs = stage_options(stage)["epochs"]
    p.add_argument("--model", required=True, help="checkpoint to start from")
    p.add_argument("--data", action="append", required=True, metavar="FILE",
                   help="training data file, or 'starter' for the bundled set (repeatable)")
    p.add_argument("--out", required=True, help="run directory (checkpoints in OUT/ckpt/step-N)")
    p.add_argument("--val-data", action="append", default=[], metavar="FILE",
                   help="held-out data (default: a seeded --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=float, default=None,
                   help=f"passes over the data, unless train.max_steps is set (default {epochs})")
    p.add_argument("--preset", default=None, help="batch shape and device from this preset (default "
                                                   f"{STAGE_PRESETS[stage]['base']}), under the {stage} preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="train.KEY=VALUE",
                   help="override a training setting, e.g. --set train.lr=5e-4 (repeatable; the settings and "
                        "their meanings are listed below)")
    add_resume_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar or TensorBoard")
    p.add_argument("--nproc", type=int, default=None,
                   help="launch N processes on this machine with torchrun (FSDP2 by default; see docs/distributed.md)")
    p.set_defaults(default_epochs=epochs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat data (loss on assistant tokens only)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings("sft"))
    _train_args(p, "sft")
    p.set_defaults(func=_sft)

    p = sub.add_parser("dpo", help="direct preference optimization on prompt/chosen/rejected pairs",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_settings("dpo"))
    _train_args(p, "dpo")
    p.add_argument("--beta", type=float, default=None, help="how far the policy may move from the reference "
                                                            f"(default {stage_options('dpo')['beta']})")
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


def _settings(stage: str) -> str:
    """The --help epilog: every train.* setting with the stage preset's value and its meaning."""
    return SETTINGS_EPILOG.format(table=settings_table(stage=stage, sections=("train",)))


def _print_summary(summary: dict, keys: tuple[str, ...]) -> None:
    print(json.dumps({k: summary.get(k) for k in keys}, ensure_ascii=False))


def _explicit(args, *options: str) -> bool:
    """Did the command line name a setting? If not, a resumed run keeps its recorded settings."""
    return bool(args.preset or args.overrides or any(getattr(args, o) is not None for o in options))


def _common(args) -> dict:
    return {"val_data": args.val_data, "val_fraction": args.val_fraction,
            "epochs": args.epochs if args.epochs is not None else args.default_epochs, "resume": args.resume,
            "progress": not args.no_progress, "explicit": _explicit(args, "epochs"),
            "allow_change": args.allow_change}


def _sft(args) -> int:
    if args.nproc is not None:
        return launch_torchrun(args.nproc, args.argv)
    tc = sft_train_config(args.preset, args.overrides)
    summary = sft(args.model, args.data, args.out, tc, **_common(args))
    if env_rank() == 0:
        _print_summary(summary, ("step", "first_loss", "final_loss", "val_loss", "checkpoint", "data"))
    return 0


def _dpo(args) -> int:
    if args.nproc is not None:
        return launch_torchrun(args.nproc, args.argv)
    tc = dpo_train_config(args.preset, args.overrides)
    common = _common(args)
    common["explicit"] = common["explicit"] or args.beta is not None
    beta = args.beta if args.beta is not None else stage_options("dpo")["beta"]
    summary = dpo(args.model, args.data, args.out, tc, beta=beta, **common)
    if env_rank() != 0:
        return 0
    ev = summary.get("eval") or {}
    _print_summary({**summary, **{k: ev.get(k) for k in ("val_reward_acc", "val_reward_margin")},
                    **{f"train_{k}": summary["last_train"].get(k) for k in ("reward_acc", "reward_margin")}},
                   ("step", "final_loss", "train_reward_acc", "train_reward_margin", "val_reward_acc",
                    "val_reward_margin", "checkpoint", "data"))
    return 0


def _merge(args) -> int:
    meta = merge(args.models, args.out, method=args.method, weights=args.weights, overwrite=args.overwrite)
    print(json.dumps({"checkpoint": args.out, "method": meta["method"], "weights": meta["weights"]}))
    return 0


def _chat(args) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    params.validate()
    return chat_main(args.model, system=args.system, params=params, device=args.device)
