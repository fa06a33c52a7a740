"""Distributed training with real torchrun processes on CPU (gloo): FSDP2 and DDP against a single process,
world-size changes across a resume, and a killed rank."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kfoundry.checkpoint import load_model
from kfoundry.provenance import ledger
from kfoundry.train.loop import list_checkpoints

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
STEPS = ["train.max_steps=30", "train.ckpt_every=5", "train.keep_last=10", "train.eval_every=15", "train.log_every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="session")
def prepared(micro_data):
    """A tokenizer and shards for the test-micro preset (conftest's `micro_data`, built once per session)."""
    return micro_data


def pretrain_cmd(out: Path, prepared, nproc: int | None, micro_batch: int, *extra: str) -> list[str]:
    tok, shards = prepared
    launcher = [sys.executable, "-m", "kfoundry"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kfoundry"]
    args = launcher + ["pretrain", "--out", str(out), "--preset", "test-micro", "--tokenizer", str(tok),
                       "--shards", str(shards), "--no-progress", "--set", f"train.micro_batch_size={micro_batch}"]
    for s in STEPS:
        args += ["--set", s]
    return args + list(extra)


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and r.get("event") is None}


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_model(ckpt, check=True).state_dict()


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def references(prepared, tmp_path_factory):
    """Uninterrupted runs on the same global batch of 4 rows: one plain process, 2 ranks x 2 rows, 1 rank x 4."""
    base = tmp_path_factory.mktemp("dist-ref")
    runs = {"single": base / "single", "two": base / "two", "one": base / "one"}
    run(pretrain_cmd(runs["single"], prepared, None, 4))
    run(pretrain_cmd(runs["two"], prepared, 2, 2))
    run(pretrain_cmd(runs["one"], prepared, 1, 4))
    return {**runs, "prepared": prepared}


MODES, GRAD_STAGES = ["fsdp", "ddp"], ["lm", "sft", "dpo"]


@pytest.fixture(scope="module")
def grads(tmp_path_factory) -> dict:
    """Every (mode, stage) pair's gradient check, from one torchrun launch of 2 ranks (a launch costs more than
    the six steps together)."""
    out = tmp_path_factory.mktemp("grads") / "grads.json"
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "dist_worker_grads.py"), str(out), *(f"{m}:{s}" for s in GRAD_STAGES for m in MODES)])
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stage", GRAD_STAGES)
def test_gradients_match_single_process(mode, stage, grads):
    """One optimizer step of pretraining, SFT and DPO: 2 processes (each its share of the global batch) give the
    gradient of one process on the whole batch, through the engine's own step functions."""
    r = grads[f"{mode}-{stage}"]
    assert r["world_size"] == 2 and r["n"] == r["ref_n"]
    assert r["max_abs_grad_diff"] <= 1e-6
    assert abs(r["loss"] - r["ref_loss"]) <= 1e-5


def init_entry(run_dir: Path) -> dict:
    (entry,) = [e for e in ledger.read(run_dir) if e["kind"] == "init"]
    return entry


def test_sharded_init_draws_the_single_process_weights(references):
    """Under FSDP the model is built on the meta device, sharded, and only then initialised (each rank allocates
    its shard only), yet its starting weights are bit for bit those of one process with the same seed: the
    ledger's hash of the initial weights is the same."""
    single, two = init_entry(references["single"]), init_entry(references["two"])
    assert single["init"] == "whole" and two["init"] == "sharded"
    assert two["init_weights_sha256"] == single["init_weights_sha256"]


def test_two_ranks_follow_single_process_loss_curve(references):
    single, two = losses(references["single"]), losses(references["two"])
    assert sorted(single) == sorted(two) == list(range(1, 31))
    assert max(abs(single[s] - two[s]) for s in single) <= 1e-5
    assert two[30] < two[1] - 0.5  # and it learns
    ckpt = list_checkpoints(references["two"] / "ckpt")[-1]
    # the final checkpoint of a sharded run holds its DCP shards (to resume) and consolidated safetensors weights
    # (what generate, serve, eval and export read); intermediate ones hold shards only
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.safetensors").is_file()
    earlier = list_checkpoints(references["two"] / "ckpt")[0]
    assert (earlier / "dcp").is_dir() and not (earlier / "model.safetensors").exists()
    assert max_diff(weights(ckpt), weights(list_checkpoints(references["single"] / "ckpt")[-1])) <= 1e-5


@pytest.mark.parametrize("saved,resumed", [("two", 1), ("one", 2)])
def test_resume_at_a_different_world_size(references, saved, resumed, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(references[saved], run_dir)
    for ckpt in list_checkpoints(run_dir / "ckpt"):
        if int(ckpt.name.split("-")[1]) > 10:
            shutil.rmtree(ckpt)  # as if the run had stopped after step 10
    # the same global batch of 4 rows on another number of ranks: a change of micro-batch size, allowed explicitly
    done = run(pretrain_cmd(run_dir, references["prepared"], resumed, 4 // resumed, "--resume", "auto",
                            "--allow-change"))
    assert "resumed from" in done.stderr and "step-000010" in done.stderr
    final = list_checkpoints(run_dir / "ckpt")[-1]
    assert final.name == "step-000030"
    assert max_diff(weights(final), weights(list_checkpoints(references[saved] / "ckpt")[-1])) <= 1e-5


def test_killed_rank_then_clean_resume(references, tmp_path):
    run_dir = tmp_path / "killed"
    prep = references["prepared"]
    proc = subprocess.Popen(pretrain_cmd(run_dir, prep, 2, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(run_dir / "ckpt"):
        time.sleep(0.05)
    victim = _worker_pid(proc.pid, rank=1)
    assert victim is not None and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0  # torchrun tears the job down when a rank dies
    done = run(pretrain_cmd(run_dir, prep, 2, 2, "--resume", "auto"))
    assert "resumed from" in done.stderr
    final = list_checkpoints(run_dir / "ckpt")[-1]
    assert final.name == "step-000030" and not list((run_dir / "ckpt").glob(".tmp-*"))
    assert max_diff(weights(final), weights(list_checkpoints(references["two"] / "ckpt")[-1])) <= 1e-6


def _worker_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the torchrun worker with RANK=rank among the launcher's descendants (walking /proc)."""
    for _ in range(200):
        parents, envs = {}, {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                envs[int(pid)] = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            parents[int(pid)] = int(stat.rsplit(")", 1)[1].split()[1])  # field 4: ppid (after the command name)
        for pid, env in envs.items():
            if f"RANK={rank}".encode() not in env or f"LOCAL_RANK={rank}".encode() not in env:
                continue
            p = pid
            while p in parents and p != launcher_pid:
                p = parents[p]
            if p == launcher_pid:
                return pid
        time.sleep(0.05)
    return None
