"""`kfoundry provenance audit`: a fine-tuned child and a depth-up-scaled child are "likely derived" (the DUS child
with the right layer pairing), two models trained from different seeds on the same data are "independent", and
the verdict is measured against a chance baseline rather than assumed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kfoundry.checkpoint import load_model, load_tokenizer, read_meta, save_checkpoint
from kfoundry.cli import main
from kfoundry.config import ModelConfig, resolve
from kfoundry.model.llama import Transformer
from kfoundry.convert.upscale import upscale_checkpoint
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.provenance.audit import (INDEPENDENT, LIKELY_DERIVED, NOT_COMPARABLE, audit, compare,
                                       load_weights)
from kfoundry.train import loop

LAYERS = 4
DUS_PLAN = [0, 1, 2, 1, 2, 3]  # SOLAR's plan for 4 layers with 1 dropped at the seam: 2 x (4 - 1) layers


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two independent pretrained models (seeds 1 and 2, same data), a fine-tuned child of the first and a
    depth-up-scaled child of the first that trained a few more steps."""
    base = tmp_path_factory.mktemp("audit")
    cfg = resolve("test-micro")
    tok = ensure_tokenizer(base, cfg)
    shards = ensure_shards(base, cfg, tok)

    def train(name: str, *overrides: str, init: Path | None = None) -> Path:
        run_cfg = resolve("test-micro", overrides=[f"model.n_layers={LAYERS}", "train.eval_every=1000",
                                                   "train.log_every=1000", *overrides])
        s = loop.pretrain(run_cfg, base / name, shard_dir=shards, tokenizer_dir=tok, init=init, progress=False,
                          log=lambda m: None)
        return Path(s["checkpoint"])

    a = train("a", "train.seed=1", "train.max_steps=20")
    b = train("b", "train.seed=2", "train.max_steps=20")
    # fine-tuning: a few steps at a tenth of the pretraining learning rate, as SFT does
    tuned = train("tuned", "train.seed=3", "train.max_steps=6", "train.lr=3e-4", "train.warmup_steps=1", init=a)
    dus = upscale_checkpoint(a, base / "dus-init", drop=1)
    assert read_meta(dus)["upscale"]["plan"] == DUS_PLAN
    dus_trained = train("dus", "train.seed=4", "train.max_steps=4", "train.lr=3e-4", "train.warmup_steps=1",
                        init=dus)
    return {"a": a, "b": b, "tuned": tuned, "dus": dus_trained, "base": base}


def layers_evidence(c):
    return next(e for e in c.evidence if e.name == "layers")


def test_a_fine_tuned_child_is_likely_derived(models):
    c = compare(load_weights(models["tuned"]), load_weights(models["a"]))
    assert c.verdict == LIKELY_DERIVED, c.summary
    ev = layers_evidence(c)
    assert ev.passed and ev.observed > 0.9 and ev.chance_mean < 0.2
    assert [(p["a_layer"], p["b_layer"]) for p in c.pairs] == [(i, i) for i in range(LAYERS)]
    assert next(e for e in c.evidence if e.name == "embeddings").passed
    assert c.shared_tokens == 512


def test_a_depth_upscaled_child_is_derived_with_the_right_layer_pairing(models):
    child, parent = load_weights(models["dus"]), load_weights(models["a"])
    c = compare(child, parent)
    assert c.verdict == LIKELY_DERIVED, c.summary
    assert [p["b_layer"] for p in c.pairs] == DUS_PLAN  # child layer k pairs with the parent layer it copied
    assert min(p["similarity"] for p in c.pairs) > layers_evidence(c).threshold
    # the other way round: each of the deeper child's layers is still paired with its source
    back = compare(parent, child)
    assert [(p["a_layer"], p["b_layer"]) for p in back.pairs] == [(src, k) for k, src in enumerate(DUS_PLAN)]
    assert back.verdict == LIKELY_DERIVED


def test_models_from_different_seeds_on_the_same_data_are_independent(models):
    c = compare(load_weights(models["a"]), load_weights(models["b"]), seeds=4)
    assert c.verdict == INDEPENDENT, c.summary
    ev = layers_evidence(c)
    assert len(c.chance_layer) == 3 * 4  # init vs A, init vs B, B re-ordered: per seed
    assert abs(ev.observed) < ev.threshold and ev.threshold < 0.5
    assert not next(e for e in c.evidence if e.name == "embeddings").passed


def test_raw_norm_cosine_is_at_chance_level_and_does_not_decide(models):
    """The measure of the 2026 public claim: near 1 for unrelated models because norms start at 1."""
    c = compare(load_weights(models["a"]), load_weights(models["b"]))
    raw = next(e for e in c.evidence if e.name == "norm weights, raw cosine")
    assert raw.observed > 0.9 and raw.chance_mean > 0.9 and not raw.used
    assert c.verdict == INDEPENDENT


def test_fresh_random_models_and_other_widths(models, tmp_path):
    a = load_weights(models["a"])
    cfg = load_model(models["a"]).cfg
    fresh = save_checkpoint(tmp_path / "fresh", Transformer.build(cfg, seed=99), load_tokenizer(models["a"]))
    assert compare(a, load_weights(fresh)).verdict == INDEPENDENT
    # same MLP width, other hidden size: only the per-unit fingerprint lines up, and it finds nothing
    narrow = ModelConfig(**{**cfg.__dict__, "dim": 32})
    other = save_checkpoint(tmp_path / "narrow", Transformer.build(narrow, seed=5), load_tokenizer(models["a"]))
    c = compare(a, load_weights(other))
    assert c.verdict == INDEPENDENT and set(c.pairs[0]) == {"a_layer", "b_layer", "similarity", "mlp_units"}
    wide = ModelConfig(**{**cfg.__dict__, "dim": 96, "ffn_dim": 192})
    other = save_checkpoint(tmp_path / "wide", Transformer.build(wide, seed=5), load_tokenizer(models["a"]))
    c = compare(a, load_weights(other))
    assert c.verdict == NOT_COMPARABLE and "hidden sizes differ" in c.summary and not c.pairs


def test_cli_audits_several_models_and_writes_report_and_plots(models, tmp_path, capsys):
    from kfoundry.export.hf import export_hf

    hf = export_hf(models["tuned"], tmp_path / "hf-tuned")  # a Hugging Face directory works too
    out = tmp_path / "audit"
    rc = main(["provenance", "audit", "--model", str(models["a"]), "--against", str(hf), str(models["b"]),
               "--out", str(out), "--seeds", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"verdict: LIKELY DERIVED", text) and re.search(r"verdict: INDEPENDENT", text)
    report = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert [c["verdict"] for c in report["comparisons"]] == [LIKELY_DERIVED, INDEPENDENT]
    for c in report["comparisons"]:
        assert Path(c["plot"]).is_file() and Path(c["plot"]).stat().st_size > 10_000
        assert len(c["matrix"]) == LAYERS and len(c["matrix"][0]) == LAYERS
    assert "## against" in (out / "audit.md").read_text(encoding="utf-8")
    assert main(["provenance", "audit", "--model", str(models["a"]), "--against", str(tmp_path / "none")]) == 2


def test_audit_function_returns_one_comparison_per_model(models):
    results = audit(models["dus"], [models["a"], models["tuned"]], seeds=2)
    assert [c.verdict for c in results] == [LIKELY_DERIVED, LIKELY_DERIVED]  # the DUS child is the tuned's sibling
    with pytest.raises(ValueError, match="at least one"):
        audit(models["a"], [])


def test_the_upscaled_line_is_recorded_back_to_random_init(models):
    """`upscale` and `pretrain --init` write the ledger themselves: the DUS child's lineage is complete."""
    from kfoundry.provenance.verify import verify

    report = verify(models["dus"])
    assert report.ok, report.problems
    kinds = [(n.kind, n.info.get("stage")) for n in report.lineage]
    assert kinds == [("checkpoint", "pretrain"), ("derivation", "pretrain"), ("checkpoint", "upscale"),
                     ("derivation", "upscale"), ("checkpoint", "pretrain"), ("checkpoint", "pretrain"),
                     ("init", None)], kinds
    assert report.lineage[3].info["details"]["upscale"]["plan"] == DUS_PLAN
