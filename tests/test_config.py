"""Configuration: presets, recipes, dotted overrides, type checking, and the written config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kfoundry.config import PRESETS, parse_override, preset, resolve, write_config

ROOT = Path(__file__).resolve().parents[1]


def test_presets_are_valid():
    for name in PRESETS:
        cfg = preset(name)
        cfg.model.validate()
        assert cfg.train.seq_len <= cfg.model.max_seq_len
        assert cfg.model.vocab_size >= cfg.data.vocab_size


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")))
def test_recipes_resolve(recipe):
    cfg = resolve(recipe=recipe)
    assert cfg.preset in PRESETS


def test_overrides_typed_and_nested():
    cfg = resolve("cpu-tiny", overrides=["train.lr=1e-4", "model.tie_embeddings=false", "train.max_steps=12",
                                         "data.corpus=a.jsonl:0.7,b.txt:0.3"])
    assert cfg.train.lr == 1e-4 and cfg.model.tie_embeddings is False and cfg.train.max_steps == 12
    assert cfg.data.corpus == "a.jsonl:0.7,b.txt:0.3"
    assert parse_override("a.b.c=3") == {"a": {"b": {"c": 3}}}


def test_recipe_then_override_order(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("preset: test-micro\ntrain:\n  lr: 0.5\n  max_steps: 7\n")
    cfg = resolve(recipe=recipe, overrides=["train.max_steps=9"])
    assert cfg.preset == "test-micro" and cfg.train.lr == 0.5 and cfg.train.max_steps == 9


@pytest.mark.parametrize("bad,msg", [
    ("train.nope=1", "unknown config key 'train.nope'"),
    ("train.max_steps=1.5", "expected an integer"),
    ("train.lr=fast", "expected a number"),
    ("model.tie_embeddings=maybe", "expected true/false"),
    ("model.n_kv_heads=5", "not a multiple"),
    ("justakey", "key=value"),
])
def test_bad_overrides_are_clear_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        resolve("cpu-tiny", overrides=[bad])


def test_unknown_preset_and_missing_recipe(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        resolve("huge")
    with pytest.raises(FileNotFoundError):
        resolve(recipe=tmp_path / "none.yaml")


def test_write_config_round_trip(tmp_path):
    cfg = resolve("test-micro", overrides=["train.seed=5"])
    path = write_config(cfg, tmp_path)
    data = json.loads(path.read_text())
    assert data["train"]["seed"] == 5 and data["model"]["dim"] == cfg.model.dim
