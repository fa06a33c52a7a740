"""`kfoundry eval --model CKPT_OR_HF_DIR --tasks LIST [--num-fewshot K] [--limit N] [--task-dir DIR] --out FILE`.

Writes FILE (eval.json) and, beside it, eval.md, eval.html and eval.png. `--install-lm-eval-plugin` instead
writes the start-up hook that lets a bare `lm_eval --model kfoundry` find the adapter (see eval/plugin.py).
"""

from __future__ import annotations

import argparse

from kfoundry.errors import ConfigError
from kfoundry.eval.plugin import install_startup_hook
from kfoundry.extras import require


def _tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError("--tasks needs at least one task name")
    return tasks


def _limit(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("--limit must be positive (a count, or a fraction below 1)")
    return int(value) if value >= 1 and value.is_integer() else value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="benchmarks (lm-eval), bits per byte, contamination and the frontier gap")
    p.add_argument("--model", help="kfoundry checkpoint directory or Hugging Face model directory")
    p.add_argument("--tasks", type=_tasks, default=[],
                   help="comma-separated lm-eval task or group names (kobest, haerae, kmmlu, click, ...)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per question (task default)")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (a count, or a fraction < 1)")
    p.add_argument("--task-dir", default=None,
                   help="KoBEST TSV directory: runs the offline KoBEST pack instead of the hub version")
    p.add_argument("--out", help="report path (eval.json; .md, .html and .png are written beside it)")
    p.add_argument("--backend", choices=["auto", "kfoundry", "hf"], default="auto")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--batch-size", type=int, default=64, help="rows per forward pass")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to prompts")
    p.add_argument("--bpb", action="append", default=[], metavar="LANG=PATH",
                   help="held-out text for bits per byte, one text per line (repeatable; default: FLORES-200 dev)")
    p.add_argument("--bpb-limit", type=int, default=200, help="texts per language for bits per byte")
    p.add_argument("--no-bpb", action="store_true")
    p.add_argument("--shards", default=None, help="training shards for the contamination check (default: the run's)")
    p.add_argument("--ngram", type=int, default=13, help="n-gram length (tokens) for the contamination check")
    p.add_argument("--no-contamination", action="store_true")
    p.add_argument("--frontier", default=None, help="frontier table YAML (default: the packaged frontier.yaml)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--install-lm-eval-plugin", action="store_true",
                   help="install the start-up hook for `lm_eval --model kfoundry` and exit")
    p.set_defaults(func=_eval)


def _eval(args) -> int:
    if args.install_lm_eval_plugin:
        print(f"installed {install_startup_hook()}: `lm_eval --model kfoundry --model_args model=CKPT` now works")
        return 0
    if not args.model or not args.out:
        raise ConfigError("kfoundry eval needs --model and --out")
    if args.ngram < 1:
        raise ConfigError("--ngram must be at least 1")
    if args.tasks or args.backend == "hf":
        require("eval", "kfoundry eval --tasks")
    from kfoundry.eval.runner import EvalSpec, run_eval

    spec = EvalSpec(model=args.model, tasks=args.tasks, out=args.out, num_fewshot=args.num_fewshot, limit=args.limit,
                    task_dir=args.task_dir, backend=args.backend, device=args.device, batch_size=args.batch_size,
                    apply_chat_template=args.chat, bpb=args.bpb, bpb_limit=args.bpb_limit, skip_bpb=args.no_bpb,
                    shards=args.shards, contamination_n=args.ngram, skip_contamination=args.no_contamination,
                    frontier=args.frontier, seed=args.seed)
    payload = run_eval(spec)
    for row in payload["tasks"]:
        pct = f"  {row['percent_of_frontier']:.1f}% of frontier" if row["percent_of_frontier"] is not None else ""
        se = f" ± {100 * row['stderr']:.1f}" if row["stderr"] is not None else ""
        score = "n/a" if row["score"] is None else f"{100 * row['score']:.1f}{se}"
        print(f"{row['task']:<24} {row['metric']:<12} {score}{pct}")
    for lang, b in payload["bpb"].items():
        if b.get("bpb") is not None:
            print(f"bits/byte {lang:<14} {b['bpb']:.4f}")
    print(f"report: {payload['files']['md']}")
    return 0
