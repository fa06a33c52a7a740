"""The speedrun's orchestrator: run the stages in order, time each, and write the report once at the end.

Each stage writes its artefacts into the run directory as it goes (so an interrupted run resumes where it stopped),
and hands back its share of the report; nothing reads or rewrites report.md in between.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from kfoundry.checkpoint import load_model, load_tokenizer
from kfoundry.config import RunConfig, to_dict, write_config
from kfoundry.speedrun import curate, eval as eval_stage, gguf, pretrain, provenance, samples, sft, shards, tokenizer
from kfoundry.speedrun.report import write_report


def speedrun(cfg: RunConfig, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run the whole pipeline into OUT; return what report.json holds."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_config(cfg, out)
    seconds: dict[str, float] = {}

    def timed(name: str, key: str, fn, *args, **kwargs):
        print(f"[speedrun] {name}", file=sys.stderr)
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[key] = time.perf_counter() - t
        return result

    def sample(ckpt: Path):  # the model loaded here is handed on to the eval stage, not read again
        model, tok = load_model(ckpt), load_tokenizer(ckpt)
        return model, tok, samples.run(model, tok, cfg.train.seed)

    curated, data_cfg = timed("data prepare", "data_prepare", curate.run, cfg, out)
    tok_dir = timed("tokenizer", "tokenizer", tokenizer.run, data_cfg, out)
    shard_dir = timed("shards", "shards", shards.run, data_cfg, out, tok_dir)
    trained, ckpt = timed("pretrain", "pretrain", pretrain.run, cfg, out, shard_dir, tok_dir, progress=progress)
    model, tok, sampled = timed("samples", "samples", sample, ckpt)
    evaluation = timed("eval", "eval", eval_stage.run, ckpt, out, model=model, tokenizer=tok)
    chat = timed("sft", "sft", sft.run, ckpt, out, cfg, progress=progress)
    edge = timed("gguf", "gguf", gguf.run, ckpt, out, samples.SAMPLE_PROMPTS[0][1], seed=cfg.train.seed)
    prov = timed("provenance", "provenance", provenance.run, ckpt, out)

    report = {
        "preset": cfg.preset,
        "corpus": cfg.data.corpus,
        "curated_corpus": str(curated),  # data card: out/data/data_card.md
        **trained.fields,  # steps, tokens, losses, val_*, throughput, MFU
        "stage_seconds": seconds,
        **sampled.fields,  # "samples"
        **edge.fields,  # "gguf": path, type, size_bytes, llama_cpp_sample
        **chat.fields,  # "sft" (losses, steps, checkpoint) and "chat_samples" (before/after answers)
        **evaluation.fields,  # eval_bpb_<lang>, eval_kobest_acc/f1, eval_report
        **prov.fields,  # "provenance": ok, origin, lineage, model_card, export_hf
        "paths": {"run_dir": str(out), "tokenizer": str(tok_dir), "shards": str(shard_dir), "checkpoint": str(ckpt),
                  "metrics": str(out / "metrics.jsonl"), "tensorboard": str(out / "tb")},
        "config": to_dict(cfg),
    }
    return write_report(out, report, samples=sampled.markdown,
                        sections=(edge.markdown, chat.markdown, evaluation.markdown, prov.markdown))
