"""The GPU path on a CPU-only machine: no collective sees a tensor of the wrong device (NCCL's restriction,
emulated: tests/dist_worker_devices.py), with 2 real torchrun processes through pretraining steps, evaluation, a
sharded checkpoint, a resume, and DPO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent


def test_no_collective_sees_a_tensor_off_the_training_device(micro_data, tiny_checkpoint, tmp_path):
    tok, shards = micro_data
    texts = ["안녕하세요! 😀", "5입니다.", "What is NFC?", "\u1112\u1161\u11ab\u1100\u1173\u11af 12,345원"]
    ckpt, _ = tiny_checkpoint(texts * 60, 400)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({"prompt": f"{t} #{i}", "chosen": texts[(i + 1) % 4],
                                         "rejected": texts[(i + 2) % 4]}, ensure_ascii=False) + "\n"
                             for i in range(8) for t in texts[:1]), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    for stage in ("pretrain", "resume", "dpo"):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(HERE / "dist_worker_devices.py"), stage, str(tok), str(shards), str(ckpt),
                               str(prefs), str(out)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert "No backend type associated" not in done.stderr
    assert (out / "pretrain.done").read_text() == "6" and (out / "resume.done").read_text() == "9"
    assert (out / "dpo.done").read_text() == "2"
