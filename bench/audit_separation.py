"""Bench: how far the originality audit separates disguised derivatives from independent models.

Trains a test-micro model (4 layers, width 64) on the starter corpus, independent models of the same shape from
other seeds on the same data, and derivatives of the first: continued pretraining (1x and 3x its own training at
the full learning rate), a fine-tune at a tenth of the learning rate, a depth-up-scaled copy trained on, a 50/50
merge with an independent model, noise, an extended vocabulary and a different tokenizer. Every derivative is then
disguised with every function-preserving reparametrization at once (kfoundry/provenance/fingerprint_disguise.py).

Prints, per case, the invariant fingerprints (token geometry, aligned circuits) and the peer measured in the same
run: the basis-dependent per-channel fingerprint the audit used alone before (what a disguise defeats). The
separation margin is the lowest derived score minus the highest independent one, per fingerprint.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/audit_separation.py [--steps 200] [--seeds 4] [--out DIR]

The machine's load average is printed before and after. A JSON copy of everything printed goes to DIR/bench.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kfoundry.checkpoint import load_model, model_state  # noqa: E402
from kfoundry.config import resolve  # noqa: E402
from kfoundry.model.llama import Transformer  # noqa: E402
from kfoundry.convert.upscale import upscale_checkpoint  # noqa: E402
from kfoundry.pipeline import ensure_shards, ensure_tokenizer  # noqa: E402
from kfoundry.post.merge import merge_states  # noqa: E402
from kfoundry.provenance import fingerprint_disguise as D  # noqa: E402
from kfoundry.provenance.audit import (CHANNELS, CIRCUITS, EMBED_ROWS, LIKELY_DERIVED, TOKEN_GEOMETRY,  # noqa: E402
                                       Weights, compare, load_weights, shared_tokens)
from kfoundry.provenance.fingerprint import MAX_TOKENS, gram_correlation, spectrum_similarity, token_keys  # noqa: E402
from kfoundry.tokenizer import train_tokenizer  # noqa: E402
from kfoundry.train import loop  # noqa: E402

SPECTRA = "spectra (not used)"
KEPT = "token geometry, top directions kept (not used)"
SHOWN = (TOKEN_GEOMETRY, CIRCUITS, CHANNELS)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="pretraining steps of the parent and each independent model")
    ap.add_argument("--seeds", type=int, default=4, help="independently trained models, the parent included")
    ap.add_argument("--out", default=None, help="folder for the models and bench.json (default: a temporary one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out or tempfile.mkdtemp(prefix="audit-bench-"))
    load_before = os.getloadavg()
    t0 = time.time()
    cfg = resolve("test-micro")
    tok = ensure_tokenizer(out, cfg, log=lambda m: None)
    shards = ensure_shards(out, cfg, tok, log=lambda m: None)

    def train(name: str, *overrides: str, init: Path | None = None) -> Path:
        run = resolve("test-micro", overrides=["model.n_layers=4", "train.eval_every=100000",
                                               "train.ckpt_every=100000", "train.log_every=100000", *overrides])
        return Path(loop.pretrain(run, out / name, shard_dir=shards, tokenizer_dir=tok, init=init, progress=False,
                                  log=lambda m: None)["checkpoint"])

    n = args.steps
    seeds = [train(f"seed{s}", f"train.seed={s}", f"train.max_steps={n}") for s in range(1, args.seeds + 1)]
    parent_dir = seeds[0]
    cont1 = train("continued-1x", "train.seed=101", f"train.max_steps={n}", "train.warmup_steps=1", init=parent_dir)
    cont3 = train("continued-3x", "train.seed=102", f"train.max_steps={3 * n}", "train.warmup_steps=1",
                  init=parent_dir)
    tuned = train("tuned", "train.seed=103", f"train.max_steps={n // 2}", "train.lr=3e-4", "train.warmup_steps=1",
                  init=parent_dir)
    dus = train("dus", "train.seed=104", f"train.max_steps={n // 2}", "train.warmup_steps=1",
                init=upscale_checkpoint(parent_dir, out / "dus-init", drop=1, overwrite=True))
    train_s = time.time() - t0

    parent = load_weights(parent_dir)
    heads = parent.heads
    g = torch.Generator().manual_seed(0)

    def disguised(state: dict, label: str, like: Weights | None = None, vocab=None) -> Weights:
        like = like or parent
        return Weights(label, label, D.full_disguise(state, *heads, g), vocab or like.vocab, heads,
                       None if vocab else like.tokenizer_json)

    other = load_weights(seeds[1])
    ext_vocab = dict(parent.vocab)
    ext_vocab.update({f"새토큰{i}": len(parent.vocab) + i for i in range(256)})
    retok = train_tokenizer(["The quick brown fox jumps over the lazy dog. 대한민국 헌법 2026년 😀"] * 50, 400)
    retok_vocab = retok.hf.get_vocab(with_added_tokens=True)
    derived = {
        "the parent itself, disguised": disguised(parent.state, "itself"),
        f"continued pretraining, {n} steps (1x)": disguised(load_weights(cont1).state, "cont1"),
        f"continued pretraining, {3 * n} steps (3x)": disguised(load_weights(cont3).state, "cont3"),
        f"fine-tune at lr/10, {n // 2} steps": disguised(load_weights(tuned).state, "tuned"),
        f"depth up-scaled (6 layers) + {n // 2} steps": disguised(load_weights(dus).state, "dus",
                                                                   like=load_weights(dus)),
        "50/50 merge with an independent model": disguised(
            merge_states([D.untied(parent.state), D.untied(other.state)], "linear", [0.5, 0.5]), "merge"),
        "noise 10% of each matrix's std": Weights("noise10", "noise10", D.add_noise(
            D.full_disguise(parent.state, *heads, g), g, 0.1), parent.vocab, heads, parent.tokenizer_json),
        "noise 30% of each matrix's std": Weights("noise30", "noise30", D.add_noise(
            D.full_disguise(parent.state, *heads, g), g, 0.3), parent.vocab, heads, parent.tokenizer_json),
        "vocabulary extended by 256 tokens": disguised(
            D.remap_vocab(parent.state, parent.keys, token_keys(ext_vocab), g), "ext", vocab=ext_vocab),
        "moved onto another tokenizer": disguised(
            D.remap_vocab(parent.state, parent.keys, token_keys(retok_vocab), g), "retok", vocab=retok_vocab),
    }
    model_cfg = load_model(parent_dir).cfg
    fresh = [Weights(f"init{s}", f"init{s}", model_state(Transformer.build(model_cfg, seed=s)), parent.vocab, heads,
                     parent.tokenizer_json) for s in (1001, 1002)]
    others = [load_weights(p) for p in seeds]

    rows = []

    def row(kind: str, name: str, c, a: Weights, b: Weights) -> None:
        vals = {f: (c.get(f).observed if c.get(f) else None) for f in SHOWN}
        vals[SPECTRA] = spectrum_similarity(a.folded(), b.folded())
        t = shared_tokens(a, b, MAX_TOKENS)  # what token geometry reads without setting the data's directions aside
        vals[KEPT] = 0.5 * sum(gram_correlation(x[t.rows_a], y[t.rows_b], k=0) for x, y in
                               ((a.folded().embed, b.folded().embed), (a.folded().head, b.folded().head)))
        thr = {f: (c.get(f).threshold if c.get(f) else None) for f in SHOWN}
        old = any(c.get(f) and c.get(f).passed for f in (CHANNELS, EMBED_ROWS))
        rows.append({"kind": kind, "case": name, "values": vals, "thresholds": thr, "verdict": c.verdict,
                     "old_verdict": LIKELY_DERIVED if old else "independent", "shared_tokens": c.shared_tokens,
                     "shared_fraction": c.shared_fraction})

    t1 = time.time()
    for name, w in derived.items():
        row("derived", name, compare(w, parent), w, parent)
    for i, x in enumerate(others):
        for j in range(i + 1, len(others)):
            row("independent", f"seed {i + 1} vs seed {j + 1} (same data)", compare(x, others[j]), x, others[j])
    for f in fresh:
        row("independent", f"fresh init {f.label} vs parent", compare(f, parent), f, parent)
    audit_s = time.time() - t1

    def fmt(v):
        return "—" if v is None else f"{v:.3f}"

    cols = (*SHOWN, SPECTRA, KEPT)
    print(f"| case | {' | '.join(cols)} | verdict | before (per-channel only) |")
    print("|---|" + "---:|" * len(cols) + "---|---|")
    for r in rows:
        print(f"| {r['case']} | " + " | ".join(fmt(r["values"][f]) for f in cols) + f" | {r['verdict']} | "
              f"{r['old_verdict']} |")
    margin = {}
    for f in cols:
        d = [r["values"][f] for r in rows if r["kind"] == "derived" and r["values"][f] is not None]
        i = [r["values"][f] for r in rows if r["kind"] == "independent" and r["values"][f] is not None]
        thr = [r["thresholds"][f] for r in rows if r["thresholds"].get(f) is not None]
        margin[f] = {"lowest_derived": min(d), "highest_independent": max(i), "margin": min(d) - max(i),
                     "highest_threshold": max(thr) if thr else None}
    print("\nseparation (lowest derived - highest independent):")
    for f, m in margin.items():
        shown = f"(highest evidence threshold {m['highest_threshold']:.3f})" if m["highest_threshold"] else ""
        print(f"  {f:<20} {m['lowest_derived']:.3f} - {m['highest_independent']:.3f} = {m['margin']:+.3f}   {shown}")
    retok_row = next(r for r in rows if r["case"] == "moved onto another tokenizer")
    print(f"another tokenizer: {retok_row['shared_tokens']} shared tokens, "
          f"{retok_row['shared_fraction']['of_model']:.1%} of its vocabulary, "
          f"{retok_row['shared_fraction']['of_against']:.1%} of the parent's")
    load_after = os.getloadavg()
    print(f"\ntraining {train_s:.0f} s, {len(rows)} audits {audit_s:.1f} s; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    (out / "bench.json").write_text(json.dumps({
        "steps": n, "seeds": args.seeds, "rows": rows, "margin": margin, "train_s": train_s, "audit_s": audit_s,
        "load_before": load_before, "load_after": load_after}, indent=2, ensure_ascii=False), encoding="utf-8")
    print(f"bench.json: {out / 'bench.json'}")


if __name__ == "__main__":
    main()
