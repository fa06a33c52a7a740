"""Checkpoint safety, tried as an attacker and as a careless user would (issue: one training engine, part 4).

Each test names the failure it guards against; each failed on the code before the one-engine rewrite."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kfoundry import checkpoint as ckpt_io
from kfoundry.checkpoint import CheckpointError, find_resumable, list_checkpoints, write_manifest
from kfoundry.cli import main
from kfoundry.provenance import ledger

MICRO = ["train.max_steps=12", "train.ckpt_every=4", "train.eval_every=12", "train.log_every=4", "train.keep_last=5"]


def pretrain_args(out: Path, micro_data, *extra: str, sets=MICRO) -> list[str]:
    tok, shards = micro_data
    args = ["pretrain", "--out", str(out), "--preset", "test-micro", "--tokenizer", str(tok), "--shards", str(shards),
            "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args + list(extra)


@pytest.fixture(scope="module")
def finished_run(micro_data, tmp_path_factory):
    """A finished 12-step run with checkpoints at steps 4, 8 and 12 (read-only: copy it to change it)."""
    out = tmp_path_factory.mktemp("safety") / "run"
    assert main(pretrain_args(out, micro_data)) == 0
    assert [p.name for p in list_checkpoints(out / "ckpt")] == ["step-000004", "step-000008", "step-000012"]
    return out


def copy_run(finished_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("kfoundry: error:")]
    assert errors and "Traceback" not in "\n".join(err), err
    return errors[-1]


class Planted:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def plant_dcp_metadata(ckpt: Path, marker: Path) -> None:
    """A checkpoint whose weights are a pickled DCP `.metadata`, with a manifest that lists it correctly."""
    (ckpt / "model.safetensors").unlink()
    (ckpt / "dcp").mkdir()
    (ckpt / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt)


def test_planted_dcp_pickle_never_runs(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    ckpt = list_checkpoints(run / "ckpt")[-1]
    marker = tmp_path / "pwned"
    plant_dcp_metadata(ckpt, marker)
    ckpt_io.verify(ckpt)  # the manifest matches: only the loader's rule keeps the pickle shut
    assert main(["generate", "--model", str(ckpt), "--prompt", "안녕 hello 123 🙂", "--max-new-tokens", "2"]) == 2
    assert "only the shards of a distributed run" in one_line_error(capsys)
    from kfoundry.serve.app import app_from_checkpoint

    with pytest.raises(CheckpointError):
        app_from_checkpoint(ckpt)
    assert main(["export", "hf", "--model", str(ckpt), "--out", str(tmp_path / "hf")]) == 2
    one_line_error(capsys)
    assert not marker.exists(), "the planted pickle ran"


@pytest.mark.parametrize("manifest", [None, {"files": {}}, "unlisted"])
def test_no_manifest_no_load(finished_run, micro_data, tmp_path, capsys, manifest):
    run = copy_run(finished_run, tmp_path)
    ckpt = list_checkpoints(run / "ckpt")[-1]
    if manifest is None:
        (ckpt / "manifest.json").unlink()
    elif manifest == "unlisted":
        (ckpt / "extra.bin").write_bytes(b"planted next to a valid manifest")
    else:
        (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError):
        ckpt_io.load_model(ckpt)
    assert main(["generate", "--model", str(ckpt), "--prompt", "x", "--max-new-tokens", "1"]) == 2
    one_line_error(capsys)
    # --resume PATH is refused the same way, in one line
    assert main(pretrain_args(run, micro_data, "--resume", str(ckpt))) == 2
    one_line_error(capsys)


def test_second_run_into_the_same_out_is_refused(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    before = (run / "ledger.jsonl").read_bytes()
    weights = (list_checkpoints(run / "ckpt")[-1] / "model.safetensors").read_bytes()
    assert main(pretrain_args(run, micro_data)) == 2
    assert "already holds checkpoints" in one_line_error(capsys)
    assert (run / "ledger.jsonl").read_bytes() == before  # no second initialisation recorded
    assert (list_checkpoints(run / "ckpt")[-1] / "model.safetensors").read_bytes() == weights


def test_prune_never_deletes_the_checkpoint_just_written(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for p in list_checkpoints(run / "ckpt")[1:]:
        shutil.rmtree(p)  # the run stopped after step 4
    (run / "ckpt" / "step-000900").mkdir()  # a broken directory with a higher step number
    sets = [s if not s.startswith("train.keep_last") else "train.keep_last=1" for s in MICRO]
    assert main(pretrain_args(run, micro_data, "--resume", "auto", sets=sets)) == 0
    names = [p.name for p in list_checkpoints(run / "ckpt")]
    assert "step-000012" in names, names


def test_resume_auto_with_every_checkpoint_broken_stops(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for p in list_checkpoints(run / "ckpt"):
        (p / "manifest.json").write_bytes(b"\xff\xfe not utf-8")
    assert main(pretrain_args(run, micro_data, "--resume", "auto")) == 2
    assert "every checkpoint" in one_line_error(capsys)
    assert [p.name for p in list_checkpoints(run / "ckpt")] == ["step-000004", "step-000008", "step-000012"]
    assert sum(e["kind"] == "init" for e in ledger.read(run)) == 1  # it did not silently start over


def _break(kind: str, ckpt: Path, tmp_path: Path) -> str:
    """Damage `ckpt` one way; return the file name the refusal should name."""
    if kind == "manifest-not-utf8":
        (ckpt / "manifest.json").write_bytes(b"\xff\xfe\x00garbage")
        return "manifest.json"
    if kind == "manifest-list":
        (ckpt / "manifest.json").write_text("[1, 2, 3]")
        return "manifest.json"
    if kind == "trainer-state-empty":
        (ckpt / "trainer_state.json").write_text("{}")
        (ckpt / "manifest.json").unlink()
        write_manifest(ckpt)  # hashes match: only the content is wrong
        return "trainer_state.json"
    if kind == "optimizer-unsafe":
        torch.save({"state": {}, "param_groups": [], "evil": Planted(tmp_path / "pwned-opt")}, ckpt / "optimizer.pt")
        (ckpt / "manifest.json").unlink()
        write_manifest(ckpt)
        return "optimizer.pt"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["manifest-not-utf8", "manifest-list", "trainer-state-empty", "optimizer-unsafe"])
def test_broken_newest_checkpoint_falls_back_to_the_previous(finished_run, micro_data, tmp_path, capsys, kind):
    run = copy_run(finished_run, tmp_path)
    newest = list_checkpoints(run / "ckpt")[-1]
    name = _break(kind, newest, tmp_path)
    messages: list[str] = []
    assert find_resumable(run / "ckpt", log=messages.append).name == "step-000008"
    assert len(messages) == 1 and name in messages[0] and "\n" not in messages[0]
    assert main(pretrain_args(run, micro_data, "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "refusing checkpoint" in err and "step-000008" in err and "Traceback" not in err
    assert not (tmp_path / "pwned-opt").exists()


def test_step_final_folder_is_passed_over(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    shutil.copytree(list_checkpoints(run / "ckpt")[-1], run / "ckpt" / "step-final")
    messages: list[str] = []
    assert find_resumable(run / "ckpt", log=messages.append).name == "step-000012"
    assert any("step-final" in m for m in messages)
    assert main(pretrain_args(run, micro_data, "--resume", "auto")) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_resume_keeps_the_recorded_settings(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for p in list_checkpoints(run / "ckpt")[1:]:
        shutil.rmtree(p)  # stopped after step 4
    # A different learning rate and length on the command line: refused, naming what would change.
    changed = [s for s in MICRO if not s.startswith("train.max_steps")] + ["train.max_steps=20", "train.lr=1e-3"]
    assert main(pretrain_args(run, micro_data, "--resume", "auto", sets=changed)) == 2
    line = one_line_error(capsys)
    assert "train.lr" in line and "train.max_steps" in line and "--allow-change" in line
    # No settings on the command line: the recorded ones are used (12 steps, lr 3e-3)
    tok, shards = micro_data
    assert main(["pretrain", "--out", str(run), "--tokenizer", str(tok), "--shards", str(shards), "--no-progress",
                 "--resume", "auto"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 12


def test_allowed_change_is_recorded(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for p in list_checkpoints(run / "ckpt")[1:]:
        shutil.rmtree(p)
    changed = [s for s in MICRO] + ["train.lr=1e-3"]
    assert main(pretrain_args(run, micro_data, "--resume", "auto", "--allow-change", sets=changed)) == 0
    capsys.readouterr()
    change = [e for e in ledger.read(run) if e["kind"] == "config_change"]
    assert change and change[-1]["changes"]["train.lr"] == {"from": 0.003, "to": 0.001}
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "config_change" for r in records)
    lrs = {r["step"]: r["lr"] for r in records if r.get("event") is None and "lr" in r}
    assert lrs[12] < 1e-3 + 1e-12  # the new peak applies from the resume on


def test_metrics_count_each_step_once_after_resume(finished_run, micro_data, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    for p in list_checkpoints(run / "ckpt")[1:]:
        shutil.rmtree(p)  # the metrics still hold steps 8 and 12 of the lost attempt
    assert main(pretrain_args(run, micro_data, "--resume", "auto")) == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if r.get("event") is None and "loss" in r]
    assert len(steps) == len(set(steps)) and sorted(steps) == [4, 8, 12]
    assert any(r.get("event") == "resume" and r["replayed_records_dropped"] >= 2 for r in records)


def test_distill_scores_on_the_teacher_split_or_refuses(micro_trained, tmp_path, capsys):
    ckpt, shards = micro_trained
    # The teacher's run keeps its shards elsewhere: without --shards, distill refuses instead of re-splitting.
    teacher_run = tmp_path / "teacher-run"
    shutil.copytree(ckpt, teacher_run / "ckpt" / ckpt.name)
    teacher = teacher_run / "ckpt" / ckpt.name
    sets = ["--set", "train.max_steps=2", "--set", "train.eval_batches=1", "--set", "train.seq_len=64"]
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s1"), "--student-preset",
                 "test-micro", "--no-progress", *sets]) == 2
    assert "validation split" in one_line_error(capsys)
    # With the teacher's run shards in place, those are used: the teacher is scored on its own validation split.
    (teacher_run / "shards").symlink_to(shards, target_is_directory=True)
    assert main(["distill", "--teacher", str(teacher), "--out", str(tmp_path / "s2"), "--student-preset",
                 "test-micro", "--no-progress", *sets]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["teacher_eval"]["val_bpb"] > 0
    cfg = json.loads((tmp_path / "s2" / "run_config.json").read_text())
    assert cfg["train"]["max_steps"] == 2


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
