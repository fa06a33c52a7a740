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


# ---------------------------------------------------------------------------------------------------------
# One rule per constraint (config.validate), one line naming the key (issue 16, part 3)

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

from kfoundry.cli import is_user_error, main  # noqa: E402
from kfoundry.config import (STAGE_PRESETS, RunConfig, complete, from_dict, settings_table,  # noqa: E402
                             stage_options, validate)
from kfoundry.errors import ConfigError  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _one_line_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kfoundry: error: ") and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override,key", [
    ("train.lr=[1", "train.lr"),                 # unreadable YAML value
    ("train.max_steps=1e400", "train.max_steps"),  # overflows an integer
    ("train.ckpt_every=0", "train.ckpt_every"),  # used to divide by zero mid-run
    ("train.max_steps=-5", "train.max_steps"),   # used to write step-000000 with a NaN loss and exit 0
    ("model.dim=0", "model.dim"),                # used to train a 0-parameter model
    ("train.seq_len=512", "train.seq_len"),      # longer than model.max_seq_len=256
    ("train.lr=nan", "train.lr"),
])
def test_bad_settings_on_the_command_line_are_one_line_naming_the_key(capsys, tmp_path, override, key):
    err = _one_line_error(capsys, ["pretrain", "--out", str(tmp_path / "run"), "--set", override])
    assert key in err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_invalid_yaml_recipe_is_one_line_from_the_real_cli(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("preset: test-micro\ntrain:\n  lr: [1\n", encoding="utf-8")
    res = subprocess.run([sys.executable, "-m", "kfoundry", "pretrain", "--out", str(tmp_path / "r"), "--config",
                          str(recipe)], capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "invalid YAML at line" in res.stderr and str(recipe) in res.stderr


@pytest.mark.parametrize("section,values,key", [
    ("model", dict(n_layers=0), "model.n_layers"),
    ("model", dict(n_heads=5), "model.dim=256 is not divisible by model.n_heads=5"),
    ("model", dict(n_kv_heads=3), "model.n_heads=4 is not a multiple of model.n_kv_heads=3"),
    ("model", dict(dim=12, n_heads=4), "head_dim=3 must be even"),
    ("model", dict(vocab_size=100), "model.vocab_size=100 < data.vocab_size=4096"),
    ("train", dict(micro_batch_size=0), "train.micro_batch_size"),
    ("train", dict(lr=-1e-3), "train.lr"),
    ("train", dict(eval_every=-1), "train.eval_every"),
    ("train", dict(tokens_per_step=-8), "train.tokens_per_step"),
    ("train", dict(max_minutes=-1.0), "train.max_minutes"),
    ("train", dict(warmup_steps=-1), "train.warmup_steps"),
    ("train", dict(min_lr_ratio=1.5), "train.min_lr_ratio"),
    ("train", dict(beta2=1.0), "train.beta2"),
    ("train", dict(optimizer="sgd"), "train.optimizer"),
    ("train", dict(schedule="linear"), "train.schedule"),
    ("train", dict(parallel="tp"), "train.parallel"),
    ("train", dict(keep_last=-1), "train.keep_last"),
    ("train", dict(log_every=0), "train.log_every"),
    ("data", dict(val_fraction=1.0), "data.val_fraction"),
    ("data", dict(split_chars=-5), "data.split_chars"),
])
def test_validate_names_the_key(section, values, key):
    cfg = RunConfig()
    from_dict(getattr(cfg, section), values, prefix=f"{section}.")
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace(".", r"\.")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_max_steps_null_only_where_epochs_define_the_length():
    cfg = RunConfig()
    cfg.train.max_steps = None
    with pytest.raises(ConfigError, match="train.max_steps=null"):
        validate(cfg)  # pretraining and distillation need a number
    for stage in ("sft", "dpo"):
        validate(cfg, stage=stage)


def test_seq_len_is_one_rule_in_every_stage(tiny_checkpoint, tmp_path):
    """seq_len beyond the model's context is refused the same way in pretraining, SFT, DPO and distillation."""
    from kfoundry.post import dpo, sft

    ckpt, _ = tiny_checkpoint(["안녕하세요 hello 123 😀"] * 20, 300)  # context 64
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n", encoding="utf-8")
    msg = r"train\.seq_len=65 exceeds model\.max_seq_len=64"
    with pytest.raises(ConfigError, match=msg):
        resolve("test-micro", overrides=["train.seq_len=65"])
    with pytest.raises(ConfigError, match=msg):
        sft.sft(ckpt, [data], tmp_path / "s", sft.sft_train_config("test-micro", ["train.seq_len=65"]),
                progress=False, log=lambda m: None)
    with pytest.raises(ConfigError, match=msg):
        dpo.dpo(ckpt, [data], tmp_path / "d", dpo.dpo_train_config("test-micro", ["train.seq_len=65"]),
                progress=False, log=lambda m: None)
    student = resolve("test-micro")
    student.train.seq_len = 65
    with pytest.raises(ConfigError, match=msg):
        complete(student, stage="distill")
    # null = the model's own context (the SFT and DPO presets' default)
    tc = sft.sft_train_config("test-micro")
    assert tc.seq_len is None and tc.max_steps is None
    cfg = RunConfig(model=resolve("test-micro").model, train=tc)
    assert complete(cfg, stage="sft").train.seq_len == 64


def test_none_means_off_and_old_zero_sentinels_still_load(tmp_path):
    cfg = preset("cpu-tiny")
    assert cfg.train.tokens_per_step is None and cfg.train.max_minutes is None and cfg.train.head_lr is None
    old = tmp_path / "old.yaml"  # a recipe written when 0 meant "off"
    old.write_text("preset: test-micro\ntrain:\n  tokens_per_step: 0\n  max_minutes: 0\n  embed_lr: 0.0\n"
                   "  grad_clip: 0\n  keep_last: 0\ndata:\n  split_chars: 0\n", encoding="utf-8")
    t = resolve(recipe=old)
    assert (t.train.tokens_per_step, t.train.max_minutes, t.train.embed_lr, t.train.grad_clip, t.train.keep_last,
            t.data.split_chars) == (None, None, None, None, None, None)
    assert resolve("test-micro", overrides=["train.eval_every=null"]).train.eval_every is None


def test_stage_presets_hold_the_post_training_defaults():
    assert set(STAGE_PRESETS) == {"sft", "dpo", "distill"}
    assert stage_options("sft") == {"epochs": 3.0} and stage_options("dpo")["beta"] == 0.1
    assert stage_options("distill") == {"alpha": 0.9, "temperature": 1.0}
    assert resolve(stage="distill").preset == "nano"
    sft_cfg = resolve(stage="sft")
    assert sft_cfg.train.optimizer == "adamw" and sft_cfg.train.lr == 1e-3 and sft_cfg.train.weight_decay == 0.0
    assert sft_cfg.train.micro_batch_size == preset("cpu-tiny").train.micro_batch_size  # the base's batch shape


def test_help_shows_what_each_setting_means(capsys):
    table = settings_table()
    for f in ("train.lr", "train.ckpt_every", "model.n_kv_heads", "data.split_chars"):
        assert f in table
    assert "null = only at the end" in table  # ckpt_every's meaning, from the field's own help
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "train.max_minutes" in out and "null = no limit" in out
    assert main(["config", "--stage", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "train.lr" in out and "0.0002" in out and "model.dim" not in out


# ---------------------------------------------------------------------------------------------------------
# Typed errors: ours in one line, anything else keeps its traceback (issue 16, part 4)


def test_unexpected_exceptions_keep_their_traceback(tmp_path):
    """A stage whose code hits a ValueError inside numpy: the real CLI shows the traceback (it is a bug), while a
    ConfigError from the same stage is one line."""
    (tmp_path / "bugstage.py").write_text(
        "import numpy as np\nfrom kfoundry.errors import ConfigError\n\n"
        "def register(sub):\n"
        "    sub.add_parser('bug').set_defaults(func=lambda a: np.linspace(0, 1, -1))\n"
        "    sub.add_parser('mine').set_defaults(func=_mine)\n\n"
        "def _mine(args):\n    raise ConfigError('train.lr: a message for the user')\n", encoding="utf-8")
    script = "import sys; from kfoundry import cli; cli.STAGE_MODULES.append('bugstage'); sys.exit(cli.main(sys.argv[1:]))"
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}"}
    bug = subprocess.run([sys.executable, "-c", script, "bug"], capture_output=True, text=True, env=env, timeout=120)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "must be non-negative" in bug.stderr
    assert "numpy" in bug.stderr and "bugstage.py" in bug.stderr  # every frame is shown, the library's too
    mine = subprocess.run([sys.executable, "-c", script, "mine"], capture_output=True, text=True, env=env, timeout=120)
    assert mine.returncode == 2 and mine.stderr == "kfoundry: error: train.lr: a message for the user\n"


def test_which_errors_are_printed_in_one_line():
    try:
        np.zeros(4).reshape(3)
    except ValueError as e:
        assert not is_user_error(e)  # raised inside numpy
    try:
        int("x")
    except ValueError as e:
        assert not is_user_error(e)  # a failing call, not a message we wrote
    assert not is_user_error(ValueError("a plain ValueError is a bug, wherever it was raised"))
    with pytest.raises(ConfigError) as e:
        resolve("huge")
    assert is_user_error(e.value)
