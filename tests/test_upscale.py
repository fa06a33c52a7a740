"""Depth up-scaling: the plan maps weight for weight, the child exports to HF with parity, bad plans are refused,
and continued pretraining from the child restarts the schedule with a fresh optimizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEXTS, assert_hf_logits_match
from kfoundry.checkpoint import load_config, load_model, load_tokenizer, read_meta, save_checkpoint, verify
from kfoundry.cli import main
from kfoundry.config import ModelConfig
from kfoundry.model.llama import Transformer
from kfoundry.convert.upscale import upscale_checkpoint
from kfoundry.model.upscale import (
    dus_plan,
    format_plan,
    parse_layer_plan,
    upscale_config,
    upscale_state_dict,
)



@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer(TINY_TEXTS, 360)


def make_parent(tok, path: Path, *, tie: bool, n_layers: int = 4) -> Path:
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=n_layers, n_heads=4, n_kv_heads=2, ffn_dim=64,
                      max_seq_len=64, tie_embeddings=tie, rope_theta=50000.0)
    model = Transformer.build(cfg, seed=3)
    with torch.no_grad():  # non-trivial norms: a norm copied from the wrong layer cannot hide
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return save_checkpoint(path, model, tok, meta={"stage": "pretrain", "parent": None})


@pytest.fixture(scope="module")
def parents(tok, tmp_path_factory):
    base = tmp_path_factory.mktemp("parents")
    return {tie: make_parent(tok, base / f"tied-{tie}", tie=tie) for tie in (True, False)}


def layer_tensors(state: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{k}."
    return {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}


# -- plans ---------------------------------------------------------------------------------------------------


def test_solar_plan():
    assert dus_plan(4, 1) == [0, 1, 2, 1, 2, 3]
    solar = dus_plan(32, 8)  # SOLAR-10.7B: 32-layer parent, 8 dropped on each side of the seam -> 48 layers
    assert len(solar) == 48 and solar[:24] == list(range(24)) and solar[24:] == list(range(8, 32))
    assert dus_plan(3, 0) == [0, 1, 2, 0, 1, 2]  # drop 0: plain duplication
    assert parse_layer_plan("0-23,8-31", 32) == solar
    assert parse_layer_plan(" 0 , 2-3,1 ", 4) == [0, 2, 3, 1]
    for plan in (solar, [0, 2, 3, 1], [5], [1, 1, 1]):
        assert parse_layer_plan(format_plan(plan), 32) == plan
    assert format_plan([0, 1, 2, 1, 2, 3]) == "0-2,1-3"


@pytest.mark.parametrize("n, drop, message", [
    (4, 4, "leaves no layers"),
    (4, 7, "leaves no layers"),
    (4, -1, ">= 0"),
])
def test_bad_drop_is_refused(n, drop, message):
    with pytest.raises(ValueError, match=message):
        dus_plan(n, drop)


@pytest.mark.parametrize("text, message", [
    ("0-4", "exceeds the parent, which has 4 layers"),
    ("0-1,7", "exceeds the parent"),
    ("", "empty"),
    ("0-1,,2", "empty"),
    ("3-1", "runs backwards"),
    ("a-b", "not an index or a range"),
    ("-1", "not an index or a range"),
])
def test_bad_layer_plan_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_plan(text, 4)


def test_state_dict_mapping_is_pure_and_exact():
    cfg = ModelConfig(vocab_size=50, dim=16, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=16)
    parent = Transformer.build(cfg, seed=0).state_dict()
    child = upscale_state_dict(parent, [2, 0, 2])
    assert upscale_config(cfg, [2, 0, 2]).n_layers == 3
    for k, src in enumerate([2, 0, 2]):
        a, b = layer_tensors(child, k), layer_tensors(parent, src)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # Repeated layers are independent copies, so training can move them apart.
    up = "mlp.up_proj.weight"
    assert child[f"model.layers.0.{up}"].data_ptr() != child[f"model.layers.2.{up}"].data_ptr()
    assert child[f"model.layers.0.{up}"].data_ptr() != parent[f"model.layers.2.{up}"].data_ptr()
    with pytest.raises(ValueError, match="parent has 3 layers"):
        upscale_state_dict(parent, [0, 3])
    with pytest.raises(ValueError, match="no layers"):
        upscale_config(cfg, [])


# -- checkpoints ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie, args, plan", [
    (True, ["--drop", "1"], [0, 1, 2, 1, 2, 3]),
    (False, ["--layers", "0-2,1-3,3"], [0, 1, 2, 1, 2, 3, 3]),
])
def test_child_layer_k_is_parent_layer_plan_k(parents, tmp_path, capsys, tie, args, plan):
    parent = parents[tie]
    out = tmp_path / "child"
    assert main(["upscale", "--model", str(parent), *args, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["layers"] == len(plan) and printed["parent_layers"] == 4
    verify(out)  # a complete checkpoint with a manifest

    p_state = load_file(str(parent / "model.safetensors"))
    c_state = load_file(str(out / "model.safetensors"))
    for k, src in enumerate(plan):
        a, b = layer_tensors(c_state, k), layer_tensors(p_state, src)
        assert len(a) == 9 and a.keys() == b.keys()  # 7 projections + 2 norms
        for name in a:
            assert torch.equal(a[name], b[name]), f"child layer {k} {name} != parent layer {src}"
    outside = {k for k in p_state if not k.startswith("model.layers.")}
    assert outside == {k for k in c_state if not k.startswith("model.layers.")}
    assert ("lm_head.weight" in outside) == (not tie)
    assert all(torch.equal(c_state[k], p_state[k]) for k in outside)

    p_cfg, c_cfg = load_config(parent), load_config(out)
    assert c_cfg.n_layers == len(plan)
    assert {**vars(c_cfg), "n_layers": 0} == {**vars(p_cfg), "n_layers": 0}
    assert load_tokenizer(out).hash == load_tokenizer(parent).hash
    meta = read_meta(out)
    assert meta["stage"] == "upscale" and meta["parent"] == str(parent.resolve())
    assert meta["upscale"]["plan"] == plan and meta["parent_manifest_sha256"]
    assert not (out / "optimizer.pt").exists() and not (out / "trainer_state.json").exists()


def test_identity_plan_reproduces_parent_logits(parents, tok, tmp_path, mixed_texts):
    """A plan that copies every layer once, in order, must be the parent: embeddings, final norm and head kept."""
    for tie, parent in parents.items():
        out = upscale_checkpoint(parent, tmp_path / f"same-{tie}", layers="0-3")
        a_model, b_model = load_model(parent).eval(), load_model(out).eval()
        ids = torch.tensor([tok.encode(" ".join(mixed_texts), bos=True)])
        with torch.no_grad():
            assert torch.equal(a_model(ids), b_model(ids))


def test_upscaled_model_exports_to_hf_with_parity(parents, tok, tmp_path, mixed_texts):
    from kfoundry.export.hf import export_hf

    child = upscale_checkpoint(parents[False], tmp_path / "child", drop=1)
    hf_dir = export_hf(child, tmp_path / "hf")
    hf = assert_hf_logits_match(child, hf_dir, tok, mixed_texts)
    assert hf.config.num_hidden_layers == 6


def test_cli_refuses_bad_plans_and_paths(parents, tmp_path, capsys):
    parent = str(parents[True])
    cases = [
        (["--drop", "4"], "leaves no layers"),
        (["--layers", "0-5"], "exceeds the parent"),
        (["--layers", "2-1"], "runs backwards"),
    ]
    for args, message in cases:
        out = tmp_path / "bad"
        assert main(["upscale", "--model", parent, *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert main(["upscale", "--model", str(tmp_path / "missing"), "--drop", "1", "--out", str(tmp_path / "x")]) == 2
    assert "not a checkpoint directory" in capsys.readouterr().err
    done = tmp_path / "done"
    assert main(["upscale", "--model", parent, "--drop", "1", "--out", str(done)]) == 0
    assert main(["upscale", "--model", parent, "--drop", "2", "--out", str(done)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert load_config(done).n_layers == 6  # untouched by the refused run
    assert main(["upscale", "--model", parent, "--drop", "2", "--out", str(done), "--overwrite"]) == 0
    assert load_config(done).n_layers == 4
    with pytest.raises(SystemExit) as e:  # --drop and --layers are mutually exclusive; one is required
        main(["upscale", "--model", parent, "--drop", "1", "--layers", "0-3", "--out", str(tmp_path / "y")])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["upscale", "--model", parent, "--out", str(tmp_path / "y")])
    assert e.value.code == 2


def test_external_mark_is_carried_to_the_child(tok, tmp_path):
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=32,
                      max_seq_len=32)
    mark = {"derived_from_external": True, "external_source": {"path": "/somewhere", "config_sha256": "ab"}}
    parent = save_checkpoint(tmp_path / "p", Transformer.build(cfg, seed=0), tok,
                             meta={"stage": "import", "parent": None, **mark})
    meta = read_meta(upscale_checkpoint(parent, tmp_path / "c", drop=0))
    assert {k: meta[k] for k in mark} == mark


# -- continued pretraining -------------------------------------------------------------------------------------


def test_continued_pretraining_from_upscaled_child(micro_data, tmp_path, capsys):
    """train 4 layers -> upscale to 6 -> `pretrain --init`: the child trains, the schedule restarts from warmup."""
    tok_dir, shards = micro_data  # conftest's shared test-micro tokenizer and shards (read-only)
    common = ["--preset", "test-micro", "--shards", str(shards), "--no-progress",
              "--set", "train.log_every=1", "--set", "train.eval_every=100", "--set", "train.ckpt_every=100"]
    parent_run = tmp_path / "parent"
    assert main(["pretrain", "--out", str(parent_run), "--tokenizer", str(tok_dir), *common,
                 "--set", "model.n_layers=4", "--set", "train.max_steps=6"]) == 0
    parent = Path(json.loads(capsys.readouterr().out)["checkpoint"])

    child = tmp_path / "child"
    assert main(["upscale", "--model", str(parent), "--drop", "1", "--out", str(child)]) == 0
    capsys.readouterr()
    cont = tmp_path / "cont"
    assert main(["pretrain", "--out", str(cont), "--init", str(child), "--tokenizer", str(child / "tokenizer"),
                 *common, "--set", "train.max_steps=5", "--set", "train.warmup_steps=3", "--set", "train.lr=1e-3"]) == 0
    done = Path(json.loads(capsys.readouterr().out)["checkpoint"])

    assert load_config(done).n_layers == 6
    assert read_meta(done)["parent"] == str(child.resolve())
    records = [json.loads(line) for line in (cont / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r.get("event") == "start")
    assert start["step"] == 0 and start["params"] == load_model(child).num_params()
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # a fresh warmup, not the parent's schedule
    losses = [r["loss"] for r in records if "loss" in r]
    assert all(torch.isfinite(torch.tensor(losses)))
    # The child moved away from its initial weights, and its repeated layers moved apart.
    before, after = load_file(str(child / "model.safetensors")), load_file(str(done / "model.safetensors"))
    assert not torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(before["model.layers.1.mlp.up_proj.weight"], before["model.layers.3.mlp.up_proj.weight"])
    assert not torch.equal(after["model.layers.1.mlp.up_proj.weight"], after["model.layers.3.mlp.up_proj.weight"])
