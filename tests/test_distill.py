"""Distillation: the loss is what the docstring says, a distilled student beats the same student trained without a
teacher for the same steps (validation bits per byte), a run killed with SIGKILL and continued with `--resume auto` ends
with the same weights as one never stopped, and `kfoundry distill --student-preset nano` runs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from safetensors.torch import load_file

from kfoundry.checkpoint import list_checkpoints, load_config, load_tokenizer, read_meta
from kfoundry.cli import main
from kfoundry.post.distill import distill_loss

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread
STUDENT = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
           "train.max_steps=30", "train.warmup_steps=4", "train.eval_every=30", "train.log_every=10"]


@pytest.fixture(scope="module")
def teacher(micro_trained):
    """A test-micro teacher (~107k parameters) trained 200 steps on the starter corpus, and its shards (shared
    with tests/test_gguf.py through conftest's `micro_trained`)."""
    return micro_trained


def test_loss_parts():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 0] = -1  # ignored position
    ce = F.cross_entropy(s.reshape(-1, 11), y.reshape(-1), ignore_index=-1)
    loss, parts = distill_loss(s, t, y, alpha=0.0, temperature=2.0)
    assert torch.allclose(loss, ce) and parts["kl"] == 0.0  # alpha 0 is plain pretraining
    loss_same, parts_same = distill_loss(s, s, y, alpha=1.0, temperature=2.0)
    assert abs(parts_same["kl"]) < 1e-6 and float(loss_same) < 1e-5  # a student equal to its teacher: no KL
    keep = y.reshape(-1) >= 0
    T = 3.0
    p_t = F.softmax(t.reshape(-1, 11)[keep] / T, -1)
    log_p_s = F.log_softmax(s.reshape(-1, 11)[keep] / T, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    loss, parts = distill_loss(s, t, y, alpha=0.25, temperature=T)
    assert math.isclose(parts["kl"], float(kl), rel_tol=1e-5)
    assert torch.allclose(loss, 0.75 * ce + 0.25 * T**2 * kl, rtol=1e-5)


def _distill_cli(teacher, shards, out, *args, capsys):
    rc = main(["distill", "--teacher", str(teacher), "--out", str(out), "--shards", str(shards), "--no-progress",
               *args])
    assert rc == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_student_beats_no_teacher_baseline(teacher, tmp_path, capsys):
    ckpt, shards = teacher
    sets = [a for s in STUDENT for a in ("--set", s)]
    base = _distill_cli(ckpt, shards, tmp_path / "baseline", "--student-preset", "test-micro", "--alpha", "0",
                        *sets, capsys=capsys)
    kd = _distill_cli(ckpt, shards, tmp_path / "kd", "--student-preset", "test-micro", *sets, capsys=capsys)
    assert kd["params"] == base["params"] < kd["teacher_params"] / 3  # a much smaller student, same both runs
    assert kd["step"] == base["step"] == 30
    # Same size, data, order, seed and steps: only the teacher's soft targets differ.
    assert kd["eval"]["val_bpb"] < base["eval"]["val_bpb"] - 0.03, (kd["eval"], base["eval"])
    assert kd["teacher_eval"]["val_bpb"] < kd["eval"]["val_bpb"]  # and the teacher is still better
    meta = read_meta(kd["checkpoint"])
    assert meta["stage"] == "distill" and meta["parent"] == str(Path(ckpt).resolve()) and meta["alpha"] == 0.9


def test_killed_run_resumes_to_the_same_weights(teacher, tmp_path, capsys):
    """A real SIGKILL of a real distillation process, then `--resume auto`: the same bits as an uninterrupted run."""
    ckpt, shards = teacher
    # Two micro-batches per step (tokens_per_step = 2 x 4 x 64), so a kill can land mid-accumulation.
    sets = [a for s in [*STUDENT, "train.max_steps=20", "train.ckpt_every=6", "train.keep_last=10",
                        "train.tokens_per_step=512"] for a in ("--set", s)]
    args = ("--student-preset", "test-micro", "--alpha", "0.5", "--temperature", "2", *sets)
    whole = _distill_cli(ckpt, shards, tmp_path / "whole", *args, capsys=capsys)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kfoundry", "distill", "--teacher", str(ckpt), "--out",
                             str(killed), "--shards", str(shards), "--no-progress", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as this process computes
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(killed / "ckpt"):
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [int(p.name.split("-")[1]) for p in list_checkpoints(killed / "ckpt")]
    assert left and max(left) < 20

    resumed = _distill_cli(ckpt, shards, killed, *args, "--resume", "auto", capsys=capsys)
    assert resumed["step"] == whole["step"] == 20
    a, b = (load_file(str(Path(r["checkpoint"]) / "model.safetensors")) for r in (whole, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit, loader position included
    assert resumed["eval"] == whole["eval"] and resumed["teacher_eval"] == whole["teacher_eval"]
    meta = read_meta(resumed["checkpoint"])
    assert meta["stage"] == "distill" and meta["parent"] == str(Path(ckpt).resolve()) and meta["final"]
    assert meta["alpha"] == 0.5 and meta["teacher_eval"] == whole["teacher_eval"]
    starts = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in starts if r.get("event") == "start"]
    assert starts[0]["resumed_from"] is None and starts[-1]["resumed_from"].endswith(f"step-{max(left):06d}")

    # Resuming on other shards is refused: the loader position would point into different documents.
    other = tmp_path / "other-shards"
    other.mkdir()
    for f in shards.iterdir():
        (other / f.name).symlink_to(f)
    (other / "meta.json").unlink()
    (other / "meta.json").write_text((shards / "meta.json").read_text() + "\n")
    assert main(["distill", "--teacher", str(ckpt), "--out", str(killed), "--shards", str(other),
                 "--no-progress", "--resume", "auto", *args]) == 2
    assert "training data changed" in capsys.readouterr().err


def test_nano_preset_student(teacher, tmp_path, capsys):
    ckpt, shards = teacher
    out = _distill_cli(ckpt, shards, tmp_path / "nano", "--student-preset", "nano", "--set", "train.max_steps=2",
                       "--set", "train.seq_len=64", "--set", "train.micro_batch_size=2", "--set",
                       "train.eval_batches=1", capsys=capsys)
    cfg = load_config(out["checkpoint"])
    teacher_cfg = load_config(ckpt)
    assert (cfg.dim, cfg.n_layers, cfg.ffn_dim) == (128, 4, 384)
    assert cfg.vocab_size == teacher_cfg.vocab_size  # the teacher's tokenizer, hence its vocabulary
    assert load_tokenizer(out["checkpoint"]).hash == load_tokenizer(ckpt).hash
    assert all(d % 32 == 0 for d in (cfg.dim, cfg.ffn_dim))  # exports as Q8_0 / Q4_0 GGUF


def test_bad_input(teacher, tmp_path):
    ckpt, shards = teacher
    assert main(["distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert main(["distill", "--teacher", str(ckpt), "--out", str(tmp_path / "o"), "--shards", str(shards),
                 "--alpha", "1.5", "--no-progress"]) == 2
    assert main(["distill", "--teacher", str(ckpt), "--out", str(tmp_path / "o"), "--shards", str(shards),
                 "--student-preset", "no-such-preset"]) == 2
