"""The one training engine under torchrun for post-training: real processes on CPU (gloo).

- A 2-process SFT run killed with SIGKILL (a real kill of a real rank) resumes to the same bits as an
  uninterrupted 2-process run.
- A 2-process DPO run resumes on 1 process, at the same global batch, and ends where the 2-process run ends.
(Gradient parity of one step, SFT and DPO, FSDP2 and DDP: tests/test_distributed.py::test_gradients_match_...)
"""

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
from safetensors.torch import load_file

from kfoundry.checkpoint import list_checkpoints, load_model

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

USERS = ["안녕?", "2+3은?", "What is NFC?", "\u1112\u1161\u11ab\u1100\u1173\u11af 알아?", "Tell me a joke 🙂",
         "서울의 인구는?", "Name a prime.", "오늘 날씨 어때?"]
REPLIES = ["안녕하세요! 😀", "5입니다.", "Unicode normalization form C.", "네, 한글입니다.", "Why did the 🐔 cross?",
           "약 940만 명입니다.", "7 is prime.", "맑아요 ☀️"]


@pytest.fixture(scope="module")
def base(tiny_checkpoint, tmp_path_factory):
    texts = USERS + REPLIES + ["The quick brown fox.", "대한민국은 민주공화국이다. 12,345원"]
    ckpt, tok = tiny_checkpoint(texts * 30, 400)
    d = tmp_path_factory.mktemp("engine")
    chats = d / "chats.jsonl"
    prefs = d / "prefs.jsonl"
    with chats.open("w", encoding="utf-8") as f, prefs.open("w", encoding="utf-8") as g:
        for i in range(24):  # 24 distinct conversations and pairs
            u, a = USERS[i % 8] + f" #{i}", REPLIES[(i * 3) % 8]
            f.write(json.dumps({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]},
                               ensure_ascii=False) + "\n")
            g.write(json.dumps({"prompt": u, "chosen": a, "rejected": REPLIES[(i * 3 + 1) % 8] + f" {i}"},
                               ensure_ascii=False) + "\n")
    return ckpt, chats, prefs


def cmd(stage: str, nproc: int | None, ckpt: Path, data: Path, out: Path, *sets: str) -> list[str]:
    launcher = [sys.executable, "-m", "kfoundry"] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "kfoundry"]
    args = launcher + [stage, "--model", str(ckpt), "--data", str(data), "--out", str(out), "--preset", "test-micro",
                       "--no-progress", "--val-fraction", "0.2"]
    for s in sets:
        args += ["--set", s]
    return args


def run(args: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(list_checkpoints(out / "ckpt")[-1] / "model.safetensors"))


SFT_SETS = ["train.max_steps=40", "train.ckpt_every=4", "train.keep_last=20", "train.eval_every=20",
            "train.log_every=4", "train.micro_batch_size=2", "train.lr=1e-2"]


def test_two_process_sft_killed_resumes_bit_exactly(base, tmp_path):
    from test_distributed import _worker_pid

    ckpt, chats, _ = base
    ref = tmp_path / "ref"
    run(cmd("sft", 2, ckpt, chats, ref, *SFT_SETS))
    assert (list_checkpoints(ref / "ckpt")[-1] / "model.safetensors").is_file()  # a consolidated final checkpoint

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd("sft", 2, ckpt, chats, out, *SFT_SETS), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list_checkpoints(out / "ckpt")) < 2:
        time.sleep(0.02)
    victim = _worker_pid(proc.pid, rank=1)
    assert victim is not None and proc.poll() is None, "the run ended before a rank could be killed"
    os.kill(victim, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    done_steps = [int(p.name.split("-")[1]) for p in list_checkpoints(out / "ckpt")]
    assert done_steps and max(done_steps) < 40

    done = run(cmd("sft", 2, ckpt, chats, out, *SFT_SETS) + ["--resume", "auto"])
    assert "resumed from" in done.stderr
    assert list_checkpoints(out / "ckpt")[-1].name == "step-000040"
    a, b = final_weights(ref), final_weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x) and json.loads(x).get("event") is None]
    assert len(steps) == len(set(steps))  # replayed steps are counted once


DPO_SETS = ["train.max_steps=8", "train.ckpt_every=4", "train.keep_last=5", "train.eval_every=100",
            "train.log_every=1", "train.micro_batch_size=2", "train.seq_len=64", "train.tokens_per_step=256"]


def test_two_process_dpo_resumes_on_one_process(base, tmp_path):
    ckpt, _, prefs = base
    ref = tmp_path / "ref"
    run(cmd("dpo", 2, ckpt, prefs, ref, *DPO_SETS))
    out = tmp_path / "resized"
    shutil.copytree(ref, out)
    for p in list_checkpoints(out / "ckpt")[1:]:
        shutil.rmtree(p)  # as if the 2-process run had stopped after step 4
    assert (list_checkpoints(out / "ckpt")[0] / "dcp").is_dir()
    done = run(cmd("dpo", None, ckpt, prefs, out, *DPO_SETS) + ["--resume", "auto"])
    assert "resumed from" in done.stderr and "step-000004" in done.stderr
    assert list_checkpoints(out / "ckpt")[-1].name == "step-000008"
    # tokens_per_step keeps the global batch the same (2 ranks x 1 micro-batch = 1 rank x 2): same training
    a, b = final_weights(ref), final_weights(out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    # and the model a DPO run ends with loads for inference as any checkpoint does
    assert load_model(list_checkpoints(out / "ckpt")[-1]).num_params() > 0
