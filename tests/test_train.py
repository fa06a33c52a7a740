"""Pretraining: schedules, determinism, exact resume after SIGKILL, corrupt checkpoints, MFU, the speedrun."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kfoundry.config import TrainConfig, resolve
from kfoundry.train import loop
from kfoundry.train.mfu import cpu_peak_flops, cpu_peak_key, cuda_peak_flops
from kfoundry.train.optim import lr_at

ROOT = Path(__file__).resolve().parents[1]
MICRO = ["train.max_steps=24", "train.ckpt_every=4", "train.eval_every=12", "train.log_every=4",
         "train.keep_last=3"]


@pytest.fixture(scope="session")
def prepared(micro_data):
    """A tokenizer and shards for the test-micro preset (conftest's `micro_data`, built once per session)."""
    return micro_data


# Bit-for-bit equality between two processes is what MKL documents under its reproducibility (CNR) conditions: a
# fixed thread count with MKL_DYNAMIC=FALSE, besides the strict CNR mode kfoundry sets. The tests run under them for
# that reason. (An earlier 3-in-10 one-ulp failure of these tests on a loaded machine was not reproduced later, with
# or without the setting, so its cause is not established; the setting is the documented condition, not a fix.)
def exact_env() -> dict[str, str]:
    return {**os.environ, "MKL_DYNAMIC": "FALSE", "OMP_DYNAMIC": "FALSE"}


def cli(out: Path, prepared, *extra: str) -> list[str]:
    tok, shards = prepared
    args = [sys.executable, "-m", "kfoundry", "pretrain", "--out", str(out), "--preset", "test-micro",
            "--tokenizer", str(tok), "--shards", str(shards), "--no-progress"]
    for o in MICRO:
        args += ["--set", o]
    return args + list(extra)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = loop.list_checkpoints(run / "ckpt")[-1]
    return load_file(str(last / "model.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_schedules():
    cos = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.1) and lr_at(9, cos) == pytest.approx(1.0)
    assert lr_at(60, cos) == pytest.approx(0.55)  # halfway through the cosine: mid-point of peak and floor
    assert lr_at(110, cos) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_at(50, TrainConfig(schedule="linear"))


def test_mfu_peaks(tmp_path, monkeypatch):
    assert cuda_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert cuda_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert cuda_peak_flops("NVIDIA H200") == 989e12
    assert cuda_peak_flops("Some Unknown GPU") is None
    monkeypatch.setenv("KFOUNDRY_CACHE", str(tmp_path))
    peak = cpu_peak_flops()  # measured on this machine, then cached: the same figure comes back without a probe
    assert peak > 0 and cpu_peak_flops() == peak == json.loads((tmp_path / "cpu_peak.json").read_text())[cpu_peak_key()]


def test_determinism_and_loss_falls(prepared, tmp_path):
    """Two runs with the same seed end with identical weights; another seed differs."""
    tok, shards = prepared
    results = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = resolve("test-micro", overrides=MICRO + [f"train.seed={seed}"])
        results.append(loop.pretrain(cfg, tmp_path / name, shard_dir=shards, tokenizer_dir=tok, progress=False,
                                     log=lambda m: None))
    a, b, c = (final_weights(tmp_path / n) for n in "abc")
    assert same(a, b) and not same(a, c)
    metrics = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m and m.get("event") is None]
    assert losses[-1] < losses[0] - 0.25  # 24 steps; rows now run through whole documents, not their openings
    ev = results[0]["eval"]
    assert math.isfinite(ev["val_bpb"]) and ev["val_bpb"] > 0
    assert {"val_bpb_ko", "val_bpb_en"} <= ev.keys()  # the starter corpus has both languages
    assert results[0]["mfu"] is not None and 0 < results[0]["mfu"] <= 1  # checked_mfu never reports above the peak
    cfg_written = json.loads((tmp_path / "a" / "run_config.json").read_text())
    assert cfg_written["train"]["seed"] == 1 and cfg_written["preset"] == "test-micro"


def test_z_loss_setting_reaches_the_training_loss(prepared, tmp_path):
    """`train.z_loss` is part of pretraining's loss: the first logged loss grows by about coef * logsumexp^2
    (at initialisation logsumexp is near ln(vocab), so the term is large), and the run still learns."""
    tok, shards = prepared
    first = {}
    for coef in (0.0, 0.5):
        sets = ["train.max_steps=8", "train.eval_every=100", "train.ckpt_every=100", "train.log_every=1",
                f"train.z_loss={coef}"]
        out = loop.pretrain(resolve("test-micro", overrides=sets), tmp_path / str(coef), shard_dir=shards,
                            tokenizer_dir=tok, progress=False, log=lambda m: None)
        first[coef] = out["first_loss"]
        assert out["final_loss"] < out["first_loss"]
    assert first[0.5] - first[0.0] > 0.25 * math.log(512) ** 2, first  # measured 19.6; 0.5 * ln(512)^2 = 19.5


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory) -> Path:
    """The uninterrupted 24-step CLI run (its own process, under `exact_env`) that every resumed run below must end
    bit for bit equal to. Read-only: a test that changes a run works on a copy."""
    ref = tmp_path_factory.mktemp("train-ref") / "ref"
    subprocess.run(cli(ref, prepared), check=True, capture_output=True, timeout=300, env=exact_env())
    return ref


def test_sigkill_and_resume_is_bit_exact(prepared, reference_run, tmp_path):
    run = tmp_path / "killed"
    rng = random.Random(os.getpid())
    kills = 0
    for attempt in range(3):  # kill it up to three times at random moments, then let it finish
        proc = subprocess.Popen(cli(run, prepared, "--resume", "auto"), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=exact_env())
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(loop.list_checkpoints(run / "ckpt")) <= attempt:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    done = subprocess.run(cli(run, prepared, "--resume", "auto"), capture_output=True, text=True, timeout=300, env=exact_env())
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stderr or json.loads(done.stdout.splitlines()[-1])["step"] == 24
    assert loop.list_checkpoints(run / "ckpt")[-1].name == "step-000024"
    assert same(final_weights(run), final_weights(reference_run))
    assert not list((run / "ckpt").glob(".tmp-*"))  # leftovers of a killed write are cleaned up


def test_corrupt_checkpoint_is_refused_and_previous_used(prepared, reference_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)  # a finished run; resuming it from step 20 is a new process's work
    newest = loop.list_checkpoints(run / "ckpt")[-1]
    assert newest.name == "step-000024"
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF  # flip bits inside a tensor
    weights.write_bytes(bytes(data))
    # a half-written checkpoint from a killed process, as atomic_dir leaves it: never considered
    (run / "ckpt" / ".tmp-step-000028-xyz").mkdir()
    messages = []
    assert loop.find_resumable(run / "ckpt", log=messages.append).name == "step-000020"
    assert "model.safetensors does not match" in messages[0]
    done = subprocess.run(cli(run, prepared, "--resume", "auto"), capture_output=True, text=True, timeout=300, env=exact_env())
    assert done.returncode == 0, done.stderr
    assert "refusing checkpoint" in done.stderr and "resumed from" in done.stderr and "step-000020" in done.stderr
    assert same(final_weights(run), final_weights(reference_run))


def test_init_from_checkpoint_restarts_schedule(prepared, tmp_path):
    tok, shards = prepared
    cfg = resolve("test-micro", overrides=MICRO + ["train.max_steps=8"])
    first = loop.pretrain(cfg, tmp_path / "a", shard_dir=shards, tokenizer_dir=tok, progress=False, log=lambda m: None)
    cfg2 = resolve("test-micro", overrides=MICRO + ["train.max_steps=4"])
    second = loop.pretrain(cfg2, tmp_path / "b", shard_dir=shards, tokenizer_dir=tok, init=first["checkpoint"],
                           progress=False, log=lambda m: None)
    assert second["step"] == 4  # the schedule restarted from step 0
    meta = json.loads((Path(second["checkpoint"]) / "meta.json").read_text())
    assert meta["parent"] == str(Path(first["checkpoint"]).resolve())


def test_bad_inputs_give_clear_errors(prepared, tmp_path):
    from kfoundry.cli import main

    tok, shards = prepared
    base = ["pretrain", "--out", str(tmp_path / "x"), "--preset", "test-micro", "--tokenizer", str(tok),
            "--shards", str(shards), "--no-progress"]
    assert main(base + ["--set", "train.nope=1"]) == 2
    assert main(base + ["--set", "train.max_steps=abc"]) == 2
    assert main(base + ["--preset", "no-such-preset"]) == 2
    assert main(base + ["--set", "train.seq_len=4096"]) == 2  # longer than the model's context
    assert main(["pretrain", "--out", str(tmp_path / "y"), "--preset", "test-micro", "--corpus",
                 str(tmp_path / "missing.jsonl"), "--no-progress"]) == 2


@pytest.mark.slow
def test_speedrun_end_to_end(tmp_path):
    out = tmp_path / "speedrun"
    proc = subprocess.run([sys.executable, "-m", "kfoundry", "speedrun", "--out", str(out), "--preset", "test-micro",
                           "--set", "train.max_steps=60", "--set", "train.eval_every=30", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["final_loss"] < report["first_loss"] - 0.5
    assert math.isfinite(report["val_bpb"]) and 0 < report["val_bpb"] < 20
    assert report["tokens_per_sec"] > 0 and report["steps"] == 60
    assert set(report["stage_seconds"]) >= {"tokenizer", "shards", "pretrain", "samples"}
    for key in ("tokenizer", "shards", "checkpoint", "metrics", "loss_plot"):
        assert Path(report["paths"][key]).exists(), key
    langs = {s["lang"] for s in report["samples"]}
    assert langs == {"ko", "en"} and all(isinstance(s["completion"], str) for s in report["samples"])
    md = (out / "report.md").read_text()
    assert "loss.png" in md and "val_bpb" in md and "report.md" in proc.stdout
    # one report, written once at the end by kfoundry/speedrun/report.py: the frame, then each later stage's section
    heads = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["Result", "Stages", "Loss curve", "Samples", "Where everything is", "Config",
                     "Edge export (GGUF for llama.cpp)", "Chat before and after SFT", "Evaluation", "Provenance"]
    assert list(report["stage_seconds"]) == ["data_prepare", "tokenizer", "shards", "pretrain", "samples", "eval",
                                             "sft", "gguf", "provenance"]
    assert {"gguf", "sft", "chat_samples", "eval_report", "provenance"} <= set(report)
    # the checkpoint it points at is enough to generate on its own
    gen = subprocess.run([sys.executable, "-m", "kfoundry", "generate", "--model", report["paths"]["checkpoint"],
                          "--prompt", "대한민국은", "--max-new-tokens", "8", "--seed", "0"],
                         capture_output=True, text=True, timeout=120)
    assert gen.returncode == 0 and gen.stdout.startswith("대한민국은")


@pytest.mark.slow
def test_compiled_training_matches_eager(prepared, tmp_path):
    """`train.compile=true` (torch.compile; inductor's C++ backend on CPU) trains the same model as eager mode:
    fused kernels reorder float operations, so the losses agree closely but not bit for bit."""
    tok, shards = prepared
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = resolve("test-micro", overrides=MICRO + ["train.max_steps=6", "train.log_every=1", "train.eval_every=6",
                                                       f"train.compile={flag}"])
        loop.pretrain(cfg, tmp_path / name, shard_dir=shards, tokenizer_dir=tok, progress=False, log=lambda m: None)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [r["loss"] for r in rows if "loss" in r and r.get("event") is None]
    assert len(losses["eager"]) == len(losses["compiled"]) == 6
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=2e-3)
    assert losses["compiled"][-1] < losses["compiled"][0]


def test_tensorboard_logs_and_a_clear_wandb_error(prepared, tmp_path):
    """The run directory's tb/ holds the same scalars as metrics.jsonl; asking for W&B without the package installed
    is a one-line error, not a traceback."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tok, shards = prepared
    cfg = resolve("test-micro", overrides=MICRO + ["train.max_steps=8", "train.eval_every=8"])
    # progress=False (as --no-progress): that silences the terminal only, the logs are still written
    loop.pretrain(cfg, tmp_path / "tb-run", shard_dir=shards, tokenizer_dir=tok, progress=False, log=lambda m: None)
    events = EventAccumulator(str(tmp_path / "tb-run" / "tb"))
    events.Reload()
    assert {"loss", "tokens_per_sec", "val_bpb"} <= set(events.Tags()["scalars"])
    rows = [json.loads(x) for x in (tmp_path / "tb-run" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("event") is None}
    assert {e.step: pytest.approx(e.value, rel=1e-6) for e in events.Scalars("loss")} == logged

    try:
        import wandb  # noqa: F401
    except ImportError:
        code = subprocess.run(cli(tmp_path / "wandb-run", prepared, "--set", "train.wandb=true"),
                              capture_output=True, text=True, timeout=300)
        assert code.returncode == 2 and "pip install 'kfoundry[wandb]'" in code.stderr
        assert "Traceback" not in code.stderr
