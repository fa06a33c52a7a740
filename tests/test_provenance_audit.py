"""`kfoundry provenance audit` against a skeptic's disguises.

A small model is pretrained here, then disguised every way that keeps its function (each checked on the logits):
residual permutation, SwiGLU unit permutation with up/down scaling, head and key/value-group permutation with
query/key and value/output transforms, an orthogonal rotation of the residual stream with the norms folded,
per-channel rescaling of the norm weights, and all of them at once. On top of the full disguise: continued
training, a merge with an unrelated model, a depth-up-scaled copy, small noise, an extended vocabulary and a
different tokenizer. Every one must be "likely derived" on the invariant fingerprints, while independently
initialised and independently trained models of the same shape (several seeds, same data) are "independent",
with a separation margin measured and checked.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from conftest import MIXED_TEXTS
from kfoundry.checkpoint import load_model, load_tokenizer, model_state, read_meta, save_checkpoint
from kfoundry.cli import main
from kfoundry.config import ModelConfig, resolve
from kfoundry.model.llama import Transformer
from kfoundry.convert.upscale import upscale_checkpoint
from kfoundry.post.merge import merge_states
from kfoundry.provenance import fingerprint_disguise as D
from kfoundry.provenance.audit import (CHANNELS, CIRCUITS, EMBED_ROWS, INDEPENDENT, LIKELY_DERIVED, NOT_COMPARABLE,
                                       RAW_NORMS, TOKEN_GEOMETRY, Comparison, Weights, audit, compare,
                                       load_weights)
from kfoundry.provenance.fingerprint import token_keys
from kfoundry.tokenizer.pipeline import byte_decoder
from kfoundry.train import loop

LAYERS = 4
STEPS = 40  # pretraining steps of every model here: far enough from its initialisation to carry trained structure
SEEDS = (1, 2, 3)  # independently trained models of one shape on the same data; seed 1 is the parent
DUS_PLAN = [0, 1, 2, 1, 2, 3]  # SOLAR's plan for 4 layers with 1 dropped at the seam: 2 x (4 - 1) layers
INVARIANT = (TOKEN_GEOMETRY, CIRCUITS)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def models(micro_data, tmp_path_factory) -> dict[str, Path]:
    """A parent (seed 1), three models trained independently on the same data (seeds 2-4), the parent trained on
    as long again at the full learning rate, and a depth-up-scaled copy of the parent that trained a few steps."""
    tok, shards = micro_data
    base = tmp_path_factory.mktemp("audit")

    def train(name: str, *overrides: str, init: Path | None = None) -> Path:
        run_cfg = resolve("test-micro", overrides=[f"model.n_layers={LAYERS}", "train.eval_every=1000",
                                                   "train.ckpt_every=1000", "train.log_every=1000", *overrides])
        s = loop.pretrain(run_cfg, base / name, shard_dir=shards, tokenizer_dir=tok, init=init, progress=False,
                          log=lambda m: None)
        return Path(s["checkpoint"])

    out = {f"seed{s}": train(f"seed{s}", f"train.seed={s}", f"train.max_steps={STEPS}") for s in SEEDS}
    out["parent"] = out["seed1"]
    out["continued"] = train("continued", "train.seed=5", f"train.max_steps={STEPS}", "train.warmup_steps=1",
                             init=out["parent"])
    dus = upscale_checkpoint(out["parent"], base / "dus-init", drop=1)
    assert read_meta(dus)["upscale"]["plan"] == DUS_PLAN
    out["dus"] = train("dus", "train.seed=6", "train.max_steps=6", "train.lr=3e-4", "train.warmup_steps=1", init=dus)
    out["base"] = base
    return out


@pytest.fixture(scope="module")
def parent(models) -> Weights:
    return load_weights(models["parent"])


def derived(p: Weights, state: dict[str, torch.Tensor], label: str, vocab=None) -> Weights:
    """An in-memory model: `state` with the parent's tokenizer (or `vocab`)."""
    return Weights(label, label, state, p.vocab if vocab is None else vocab, p.heads,
                   p.tokenizer_json if vocab is None else None)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


DISGUISES = {
    "residual permutation": lambda s, h: D.permute_residual(s, gen(1)),
    "SwiGLU unit permutation and scaling": lambda s, h: D.permute_mlp(s, gen(2)),
    "head and KV-group permutation": lambda s, h: D.permute_heads(s, *h, gen(3)),
    "residual rotation, norms folded": lambda s, h: D.rotate_residual(s, gen(4)),
    "rotation and per-channel norm rescaling": lambda s, h: D.rescale_norms(D.rotate_residual(s, gen(5)), gen(6)),
    "all of them": lambda s, h: D.full_disguise(s, *h, gen(7)),
}


@pytest.mark.parametrize("name", list(DISGUISES))
def test_each_disguise_keeps_the_function_and_is_still_derived(models, parent, name):
    """The disguise is real (same logits), it fools the per-channel fingerprints once the residual basis moves, and
    the invariant fingerprints still find the parent far above chance."""
    model = load_model(models["parent"]).eval()
    state = DISGUISES[name](model_state(model), parent.heads)
    twin = Transformer.build(dataclasses.replace(model.cfg, tie_embeddings=False), seed=0).eval()
    twin.load_state_dict(state)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 48), generator=gen(0))
    with torch.no_grad():
        want, got = model(ids), twin(ids)
    assert (want - got).abs().max() < 1e-4 * want.abs().max(), name

    c = compare(derived(parent, state, name), parent)
    assert c.verdict == LIKELY_DERIVED, c.summary
    for fingerprint in INVARIANT:
        e = c.get(fingerprint)
        assert e.passed and e.observed > 0.99, (name, e)
    assert [(p["a_layer"], p["b_layer"]) for p in c.pairs] == [(i, i) for i in range(LAYERS)]
    if "residual" in name or name == "all of them":  # the basis moved: the old fingerprints see nothing
        assert not c.get(CHANNELS).passed and not c.get(EMBED_ROWS).passed, name


def test_a_global_scale_of_the_residual_stream_changes_no_invariant_fingerprint(parent):
    """RMSNorm divides a global scale out (up to its eps, so the logits are not checked): both invariant
    fingerprints read exactly 1 against the parent, on top of a rotation."""
    state = D.scale_residual(D.rotate_residual(parent.state, gen(8)), 7.5)
    c = compare(derived(parent, state, "scaled"), parent, seeds=2)
    assert all(abs(c.get(f).observed - 1) < 1e-6 for f in INVARIANT), [c.get(f) for f in INVARIANT]


def test_the_old_audit_was_fooled_by_a_permutation(models, parent):
    """The issue's reproduction: a residual permutation made the per-channel fingerprints read 'independent'."""
    c = compare(derived(parent, D.permute_residual(parent.state, gen(9)), "perm"), parent)
    assert abs(c.get(CHANNELS).observed) < c.get(CHANNELS).threshold
    assert c.get(CIRCUITS).observed > 0.99 and c.verdict == LIKELY_DERIVED


def robust_cases(models, parent) -> dict[str, Weights]:
    """Disguised derivatives that also changed the function: training, merging, up-scaling, noise, vocabulary."""
    h = parent.heads
    other = load_weights(models["seed2"])
    merged = merge_states([D.untied(parent.state), D.untied(other.state)], "linear", [0.5, 0.5])
    dus = load_weights(models["dus"])
    keys = parent.keys
    # vocabulary extension: 256 new tokens, the ids shuffled (matching goes by text, never by id)
    extra = [f"새토큰{i}🎉" for i in range(256)]
    order = torch.randperm(len(keys) + len(extra), generator=gen(10)).tolist()
    names = sorted(parent.vocab, key=parent.vocab.get) + extra
    ext_vocab = {t: order[i] for i, t in enumerate(names)}
    extended = D.remap_vocab(parent.state, parent.keys, token_keys(ext_vocab), gen(11))
    # layer pruning: drop the parent's layer 2 and renumber the rest
    keep = [0, 1, 3]
    pruned = {k: v for k, v in parent.state.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(keep):
        pre = f"model.layers.{old}."
        pruned.update({f"model.layers.{new}." + k[len(pre):]: v for k, v in parent.state.items() if k.startswith(pre)})
    return {
        "pruned layer": derived(parent, D.full_disguise(pruned, *h, gen(18)), "pruned"),
        "continued training": derived(parent, D.full_disguise(load_weights(models["continued"]).state, *h, gen(12)),
                                      "continued"),
        "merge with an unrelated model": derived(parent, D.full_disguise(merged, *h, gen(13)), "merge"),
        "depth up-scaled": derived(dus, D.full_disguise(dus.state, *h, gen(14)), "dus"),
        "small noise": derived(parent, D.add_noise(D.full_disguise(parent.state, *h, gen(15)), gen(16), 0.1), "noise"),
        "extended vocabulary": derived(parent, D.full_disguise(extended, *h, gen(17)), "ext", ext_vocab),
    }


@pytest.fixture(scope="module")
def robust(models, parent) -> dict[str, Comparison]:
    """Each robust case audited against the parent, once."""
    return {name: compare(w, parent, seeds=3) for name, w in robust_cases(models, parent).items()}


@pytest.mark.parametrize("name", ["continued training", "merge with an unrelated model", "depth up-scaled",
                                  "pruned layer", "small noise", "extended vocabulary"])
def test_disguised_derivatives_that_changed_are_still_derived(robust, parent, name):
    c = robust[name]
    assert c.verdict == LIKELY_DERIVED, (name, c.summary)
    assert all(c.get(f).passed for f in INVARIANT), (name, [(f, c.get(f)) for f in INVARIANT])
    if name == "depth up-scaled":  # each child layer pairs with the parent layer it copied, through the disguise
        assert [p["b_layer"] for p in c.pairs] == DUS_PLAN
    if name == "pruned layer":  # the parent's layers pair with what is left of them (2 with its neighbour 1 or 3)
        assert [(p["a_layer"], p["b_layer"]) for p in c.pairs if p["b_layer"] != 2] == [(0, 0), (1, 1), (2, 3)]
    if name == "extended vocabulary":
        assert c.shared_tokens == len(parent.vocab) and c.shared_fraction["of_model"] == pytest.approx(
            len(parent.vocab) / (len(parent.vocab) + 256))


def test_a_different_tokenizer_is_matched_by_token_text(models, parent, tiny_tokenizer):
    """The parent moved onto a tokenizer trained on other texts: rows are matched by the text each token stands
    for, the shared fraction is reported, and the disguised copy is still derived."""
    other = tiny_tokenizer(MIXED_TEXTS * 40, 400)
    vocab = other.hf.get_vocab(with_added_tokens=True)
    state = D.full_disguise(D.remap_vocab(parent.state, parent.keys, token_keys(vocab), gen(20)), *parent.heads,
                            gen(21))
    c = compare(derived(parent, state, "retok", vocab), parent)
    common = set(token_keys(vocab)) & set(parent.keys)
    assert c.shared_tokens == len(common) and 0.3 < c.shared_fraction["of_model"] < 1
    assert c.shared_fraction["of_against"] == pytest.approx(len(common) / len(parent.vocab))
    assert c.verdict == LIKELY_DERIVED and all(c.get(f).passed for f in INVARIANT), c.summary


def test_independent_models_are_independent_and_the_margin_is_wide(models, parent, robust):
    """Seeds trained on the same data, and fresh initialisations, are independent of each other; the lowest
    derived score sits far above the highest independent one (the separation margin)."""
    seeds = [load_weights(models[f"seed{s}"]) for s in SEEDS]
    cfg = load_model(models["parent"]).cfg
    fresh = [derived(parent, model_state(Transformer.build(cfg, seed=s)), f"init{s}") for s in (101, 102)]
    indep = [compare(x, y, seeds=3) for i, x in enumerate(seeds) for y in seeds[i + 1:]]
    indep += [compare(f, s, seeds=3) for f in fresh for s in seeds[:2]]
    for c in indep:
        assert c.verdict == INDEPENDENT, (c.model, c.against, c.summary)
    worst_derived = {f: min(c.get(f).observed for c in robust.values()) for f in INVARIANT}
    best_indep = {f: max(c.get(f).observed for c in indep) for f in INVARIANT}
    margin = {f: worst_derived[f] - best_indep[f] for f in INVARIANT}
    print(f"\nseparation margin (lowest derived - highest independent): {margin}; "
          f"derived min {worst_derived}, independent max {best_indep}")
    assert all(m > 0.3 for m in margin.values()), margin


def test_independently_trained_references_join_the_chance_baseline(models, parent):
    ref = [load_weights(models["seed3"])]
    c = compare(load_weights(models["seed2"]), parent, seeds=2, references=ref)
    assert c.verdict == INDEPENDENT
    for f in (*INVARIANT, CHANNELS, EMBED_ROWS):
        assert len(c.get(f).chance["reference"]) == 2, f  # the reference against each side
    d = compare(derived(parent, D.full_disguise(parent.state, *parent.heads, gen(30)), "d"), parent, references=ref)
    assert d.verdict == LIKELY_DERIVED and d.get(CIRCUITS).passed


def test_raw_norm_cosine_is_at_chance_level_and_does_not_decide(models, parent):
    """The measure of the 2026 public claim: near 1 for unrelated models because norms start at 1."""
    c = compare(parent, load_weights(models["seed2"]))
    raw = c.get(RAW_NORMS)
    assert raw.observed > 0.9 and raw.chance_mean > 0.9 and not raw.used
    assert c.verdict == INDEPENDENT


def test_other_widths(models, parent, tmp_path):
    cfg = load_model(models["parent"]).cfg
    tok = load_tokenizer(models["parent"])
    # same MLP width, other hidden size: token geometry still compares (it is width-free); the circuits cannot
    narrow = save_checkpoint(tmp_path / "narrow", Transformer.build(ModelConfig(**{**cfg.__dict__, "dim": 32}), seed=5),
                             tok)
    c = compare(parent, load_weights(narrow))
    assert c.verdict == INDEPENDENT and c.get(TOKEN_GEOMETRY) is not None and c.get(CIRCUITS) is None
    assert set(c.pairs[0]) == {"a_layer", "b_layer", "similarity", "mlp_units"}
    # no shared tokens and nothing of one width: nothing lines up
    wide = Transformer.build(ModelConfig(**{**cfg.__dict__, "dim": 96, "ffn_dim": 192}), seed=5)
    c = compare(parent, Weights("wide", "wide", model_state(wide), {"only": 0}, parent.heads))
    assert c.verdict == NOT_COMPARABLE and "hidden sizes differ" in c.summary and not c.pairs


def test_token_keys_match_text_across_spellings(tmp_path):
    """Byte-level stand-ins, SentencePiece's ▁ and <0x..> bytes and NFD text all reduce to the same NFC text."""
    stand_in = {b: ch for ch, b in byte_decoder().items()}

    def spelled(text: str) -> str:  # how a byte-level BPE writes `text`
        return "".join(stand_in[b] for b in text.encode("utf-8"))

    assert spelled(" 2026") == "Ġ2026" and spelled("😀") == "ðŁĺĢ"
    byte_level = {spelled(" 대한민국"): 0, "hello": 1, "Ġ2026": 2, "ðŁĺĢ": 3, "<|begin_of_text|>": 4,
                  spelled("한")[:2]: 5}
    keys = token_keys(byte_level)
    assert {"t: 대한민국", "t:hello", "t: 2026", "t:😀", "t:<|begin_of_text|>"} <= set(keys)
    assert "b:ed95" in keys  # a cut UTF-8 sequence keeps a byte key
    tj = tmp_path / "tokenizer.json"  # a SentencePiece-style tokenizer: Metaspace, no byte-level stand-ins
    tj.write_text(json.dumps({"decoder": {"type": "Metaspace"}, "pre_tokenizer": None}), encoding="utf-8")
    sp = token_keys({"▁대한민국": 7, "hello": 8, "<0x41>": 9, "\u1112\u1161\u11ab\u1100\u1173\u11af": 10}, tj)
    assert sp == {"t: 대한민국": 7, "t:hello": 8, "t:A": 9, "t:한글": 10}
    assert set(sp) & set(keys) == {"t: 대한민국", "t:hello"}
    # an NFC token and its NFD twin in one vocabulary: ambiguous, so both are dropped
    assert token_keys({"한글": 0, "\u1112\u1161\u11ab\u1100\u1173\u11af": 1, "x": 2}) == {"t:x": 2}


def test_cli_audits_several_models_and_writes_a_reproducible_report(models, tmp_path, capsys):
    from kfoundry.export.hf import export_hf

    hf = export_hf(models["continued"], tmp_path / "hf-continued")  # a Hugging Face directory works too
    out = tmp_path / "audit"
    rc = main(["provenance", "audit", "--model", str(models["parent"]), "--against", str(hf), str(models["seed2"]),
               "--reference", str(models["seed3"]), "--out", str(out), "--seeds", "2"])
    assert rc == 0
    text = capsys.readouterr().out
    assert re.search(r"verdict: LIKELY DERIVED", text) and re.search(r"verdict: INDEPENDENT", text)
    report = json.loads((out / "audit.json").read_text(encoding="utf-8"))
    assert [c["verdict"] for c in report["comparisons"]] == [LIKELY_DERIVED, INDEPENDENT]
    for c in report["comparisons"]:
        assert Path(c["plot"]).is_file() and Path(c["plot"]).stat().st_size > 10_000
        assert len(c["matrix"]) == LAYERS and c["layer_fingerprint"] == CIRCUITS
        assert c["shared_fraction"] == {"of_model": 1.0, "of_against": 1.0}
    assert set(report["invariant_to"]) >= set(INVARIANT) and report["method"]
    assert all(h for h in report["reproduce"]["weights_sha256"].values())
    md = (out / "audit.md").read_text(encoding="utf-8")
    assert "## against" in md and "## Reproduce" in md and report["reproduce"]["command"] in md
    # the recorded command, run again, gives the same numbers
    again = shlex.split(report["reproduce"]["command"])
    assert again[:3] == ["kfoundry", "provenance", "audit"]
    assert main(again[1:-1] + [str(tmp_path / "again")]) == 0
    rerun = json.loads((tmp_path / "again" / "audit.json").read_text(encoding="utf-8"))
    assert [[e["observed"] for e in c["evidence"]] for c in rerun["comparisons"]] == \
        [[e["observed"] for e in c["evidence"]] for c in report["comparisons"]]
    assert main(["provenance", "audit", "--model", str(models["parent"]), "--against", str(tmp_path / "none")]) == 2


def test_audit_function_returns_one_comparison_per_model(models):
    results = audit(models["dus"], [models["parent"], models["continued"]], seeds=2)
    assert [c.verdict for c in results] == [LIKELY_DERIVED, LIKELY_DERIVED]  # siblings share the parent's weights
    with pytest.raises(ValueError, match="at least one"):
        audit(models["parent"], [])


def test_the_upscaled_line_is_recorded_back_to_random_init(models):
    """`upscale` and `pretrain --init` write the ledger themselves: the DUS child's lineage is complete."""
    from kfoundry.provenance.verify import verify

    report = verify(models["dus"])
    assert report.ok, report.problems
    kinds = [(n.kind, n.info.get("stage")) for n in report.lineage]
    assert kinds[0] == ("checkpoint", "pretrain") and kinds[-1] == ("init", None)
    assert ("derivation", "upscale") in kinds
    up = next(n for n in report.lineage if n.kind == "derivation" and n.info.get("stage") == "upscale")
    assert up.info["details"]["upscale"]["plan"] == DUS_PLAN
