"""`kfoundry speedrun`: the whole pipeline on one machine, end to end, as a demo and a first lesson.

    corpus -> data/ (curated) -> tokenizer/ -> shards/ -> pretrain (ckpt/) -> samples -> validation bits per byte -> report

Each stage writes into the run directory and is timed; `report.md` / `report.json` say what ran, how long each
stage took, how far the loss fell, and where every artefact is. Later stages (SFT, evaluation, export,
provenance) join this same command as they are built.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

SAMPLE_PROMPTS = [
    ("ko", "대한민국은"),
    ("ko", "모든 국민은"),
    ("en", "The function"),
    ("en", "In Python,"),
]


def register(sub: argparse._SubParsersAction) -> None:
    from kfoundry.train.cli import add_config_args

    p = sub.add_parser("speedrun", help="run the whole pipeline end to end and write a report")
    p.add_argument("--out", required=True, help="run directory")
    add_config_args(p)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget for pretraining (minutes)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_speedrun)


def _speedrun(args) -> int:
    from kfoundry.train.cli import resolve_config

    cfg = resolve_config(args)
    if args.minutes is not None:
        if args.minutes <= 0:
            raise ValueError("--minutes must be positive")
        cfg.train.max_minutes = args.minutes
    report = speedrun(cfg, Path(args.out), progress=not args.no_progress)
    print(f"\nspeedrun done in {sum(report['stage_seconds'].values()):.0f} s: "
          f"validation {report.get('val_bpb', float('nan')):.3f} bits/byte")
    print(f"  report:     {Path(args.out) / 'report.md'}")
    print(f"  checkpoint: {report['paths']['checkpoint']}")
    print(f"  try:        kfoundry generate --model {report['paths']['checkpoint']} --prompt '대한민국은'")
    return 0


def speedrun(cfg, out: Path, progress: bool = True) -> dict:
    from kfoundry.checkpoint import load_model, load_tokenizer
    from kfoundry.config import to_dict, write_config
    from kfoundry.serve.generate_cli import complete
    from kfoundry.model.generate import SamplingParams
    from kfoundry.pipeline import ensure_curated, ensure_shards, ensure_tokenizer
    from kfoundry.report.run_report import read_metrics, write_report
    from kfoundry.train.loop import pretrain

    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    seconds: dict[str, float] = {}

    def stage(name):
        print(f"[speedrun] {name}", file=sys.stderr)
        return time.perf_counter()

    t = stage("data prepare")  # curation into out/data; the tokenizer and shards then read the curated corpus
    curated = ensure_curated(out, cfg)
    data_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, corpus=str(curated)))
    seconds["data_prepare"] = time.perf_counter() - t

    t = stage("tokenizer")
    tok_dir = ensure_tokenizer(out, data_cfg)
    seconds["tokenizer"] = time.perf_counter() - t

    t = stage("shards")
    shard_dir = ensure_shards(out, data_cfg, tok_dir)
    seconds["shards"] = time.perf_counter() - t

    t = stage("pretrain")
    summary = pretrain(cfg, out, shard_dir=shard_dir, tokenizer_dir=tok_dir, resume="auto", progress=progress)
    seconds["pretrain"] = time.perf_counter() - t

    t = stage("samples")
    ckpt = Path(summary["checkpoint"])
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    params = SamplingParams(max_new_tokens=48, temperature=0.8, top_k=50, top_p=0.95, seed=cfg.train.seed)
    texts = complete(model, tok, [p for _, p in SAMPLE_PROMPTS], params)
    samples = [{"lang": lang, "prompt": p, "completion": c} for (lang, p), c in zip(SAMPLE_PROMPTS, texts)]
    seconds["samples"] = time.perf_counter() - t

    t = stage("eval")  # bits per byte + the offline KoBEST pack at a small limit (`kfoundry eval` for the full set)
    from kfoundry.eval.report import append_eval_section
    from kfoundry.eval.runner import speedrun_eval

    evaluation = speedrun_eval(ckpt, out, limit=20, model=model, tokenizer=tok)
    seconds["eval"] = time.perf_counter() - t

    t = stage("sft")  # fine-tune on the starter chat set; the report shows answers before and after
    from kfoundry.post.stage import append_chat_section, speedrun_sft

    chat = speedrun_sft(ckpt, out, cfg, progress=progress)
    seconds["sft"] = time.perf_counter() - t

    t = stage("gguf")  # the edge format: one GGUF file for llama.cpp, and a llama.cpp sample when it is installed
    from kfoundry.export.gguf import append_gguf_section, speedrun_gguf

    edge = speedrun_gguf(ckpt, out, SAMPLE_PROMPTS[0][1], seed=cfg.train.seed)
    seconds["gguf"] = time.perf_counter() - t

    t = stage("provenance")  # HF export with the model card (EN/KO), ledger verification, lineage
    from kfoundry.provenance.report import append_provenance_section, speedrun_provenance

    prov = speedrun_provenance(ckpt, out)
    seconds["provenance"] = time.perf_counter() - t

    metrics = read_metrics(out)
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("event") is None]
    ev = summary.get("eval") or {}
    report = {
        "preset": cfg.preset,
        "corpus": cfg.data.corpus,
        "curated_corpus": str(curated),  # data card: out/data/data_card.md
        "steps": summary["step"],
        "tokens_seen": summary["tokens_seen"],
        "params": summary["params"],
        "first_loss": losses[0] if losses else None,
        "final_loss": summary["final_loss"],
        **{k: v for k, v in ev.items() if k.startswith("val_")},
        "tokens_per_sec": summary["tokens_per_sec"],
        "mfu": summary["mfu"],
        "peak_source": summary["peak_source"],
        "stage_seconds": seconds,
        "samples": samples,
        **edge,  # "gguf": path, type, size_bytes, llama_cpp_sample
        **chat,  # "sft" (losses, steps, checkpoint) and "chat_samples" (before/after answers)
        **evaluation,  # eval_bpb_<lang>, eval_kobest_acc/f1, eval_report
        **prov,  # "provenance": ok, origin, lineage, model_card, export_hf
        "paths": {"run_dir": str(out), "tokenizer": str(tok_dir), "shards": str(shard_dir), "checkpoint": str(ckpt),
                  "metrics": str(out / "metrics.jsonl"), "tensorboard": str(out / "tb")},
        "config": to_dict(cfg),
    }
    write_report(out, report)
    append_gguf_section(out / "report.md", report)
    append_chat_section(out / "report.md", report)
    append_eval_section(out / "report.md", report)
    append_provenance_section(out / "report.md", report)
    return report
