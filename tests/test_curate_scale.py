"""`kfoundry data prepare` at scale and under abuse: a killed run (SIGKILL) is never used as a corpus and resumes;
decontamination is never silently off; an index from lm-eval tasks; the same run on a real local Ray cluster;
the Slurm job scripts and commands. (Dedup and quality tests live in tests/test_curate.py.)
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kfoundry.corpus import CorpusError, iter_documents
from kfoundry.corpus.prepared import DONE_FILE
from kfoundry.data.curate import load_recipe, prepare
from kfoundry.data.curate.decontam import build_index

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("배우들의 연기가 음악이 감독의 연출이 결말이 장면마다 대사가 분위기가 영상미가 좋았고 지루했고 놀라웠고 "
         "슬펐고 웃겼고 무서웠고 따뜻했고 아쉬웠고 다시 보고 싶다 추천한다 별로다 최고다 그저 그렇다 movie great "
         "2026년 10점 😀 🎉").split()


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kfoundry", "data", *args]


def write_corpus(path: Path, n: int, seed: int = 3, extra: list[str] = ()) -> Path:
    """Korean reviews (with English, digits, emoji, NFD Hangul and a phone number), one JSON object a line."""
    path.mkdir(parents=True)
    rng = random.Random(seed)
    lines = [{"text": f"{i}번째 리뷰: {' '.join(rng.sample(WORDS, 12))} \u1112\u1161\u11ab NFD 연락처는 010-1234-{1000 + i}"}
             for i in range(n)]
    lines += [{"text": t} for t in extra]
    (path / "a.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n",
                                  encoding="utf-8")
    return path


def read_curated(out: Path) -> list[dict]:
    rows = []
    for f in sorted((out / "curated").glob("*.jsonl.gz")):
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh]
    return rows


# ---------------------------------------------------------------------------------------------------------
# Issue 17 item 7 + 13: SIGKILL in the middle, the half-written output refused, then resumed


@pytest.mark.slow
def test_sigkilled_prepare_is_refused_as_a_corpus_then_resumes(tmp_path):
    src = write_corpus(tmp_path / "src", 400)
    out = tmp_path / "out"
    args = cli("prepare", "--corpus", str(src), "--out", str(out), "--recipe", "clean", "--tasks", "2",
               "--no-decontam", "--vocab-size", "300")
    # its own session, so SIGKILL reaches the datatrove worker processes too, as a real kill -9 of a job would
    proc = subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "logs" / "filter" / "completions").is_dir():
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert killed, "the run finished before it could be killed; make the corpus larger"
    assert not (out / DONE_FILE).exists()

    # every way of using the half-written output as a corpus is refused, in one line that says how to finish
    for spec in (str(out), str(out / "curated"), str(out / "ingest")):
        with pytest.raises(CorpusError, match="unfinished `kfoundry data prepare` output.*--out") as e:
            iter_documents(spec)
        assert "\n" not in str(e.value)
    tok = subprocess.run([sys.executable, "-m", "kfoundry", "tokenizer", "train", "--corpus", str(out / "curated"),
                          "--vocab-size", "300", "--out", str(tmp_path / "tok")], cwd=ROOT, env=env(),
                         capture_output=True, text=True, timeout=120)
    assert tok.returncode == 2 and len(tok.stderr.strip().splitlines()) == 1
    assert "unfinished" in tok.stderr and "kfoundry data prepare --corpus" in tok.stderr
    assert not (tmp_path / "tok").exists()

    done = subprocess.run(args, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "accounting identity holds" in done.stdout
    card = json.loads((out / "data_card.json").read_text(encoding="utf-8"))
    assert card["identity"]["ok"] and card["totals"]["docs_read"] == 400
    assert card["pii"]["phone"] == 400  # each number replaced exactly once, whatever ran twice
    marker = json.loads((out / DONE_FILE).read_text(encoding="utf-8"))
    assert marker["docs"] == card["totals"]["docs_curated"] == len(read_curated(out))
    # finished: the run folder reads as its curated documents (NFC, PII replaced)
    docs = list(iter_documents(str(out)))
    assert len(docs) == marker["docs"] and all("010-1234" not in d.text and "한 NFD" in d.text for d in docs)
    shards = json.loads((out / "shards" / "meta.json").read_text(encoding="utf-8"))
    assert shards["docs"] == marker["docs"]
    # a curated file cut after the run finished is refused as well
    victim = sorted((out / "curated").glob("*.jsonl.gz"))[0]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(CorpusError, match="changed after `data prepare` finished"):
        iter_documents(str(out / "curated"))


# ---------------------------------------------------------------------------------------------------------
# Issue 17 item 8: decontamination is never silently off


def test_missing_decontamination_sets_fail_unless_no_decontam(tmp_path):
    src = write_corpus(tmp_path / "src", 20)
    recipe = tmp_path / "recipe.yaml"
    data = load_recipe("clean").to_dict()  # the clean recipe, with an evaluation set that is not there
    data["name"] = "missing-sets"
    data["decontaminate"]["sets"] = [str(tmp_path / "no-such-eval")]
    recipe.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="no-such-eval.*--no-decontam"):
        prepare(str(src), tmp_path / "out", recipe=str(recipe), shards=False)
    assert not (tmp_path / "out" / "data_card.json").exists()
    proc = subprocess.run(cli("prepare", "--corpus", str(src), "--out", str(tmp_path / "o2"), "--recipe", str(recipe),
                              "--no-shards"), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "--no-decontam" in proc.stderr
    card = prepare(str(src), tmp_path / "out", recipe=str(recipe), decontam=[], shards=False)
    assert card["decontamination"] == {"enabled": False, "note": "decontamination off (--no-decontam)"}

    # a run finished by a kfoundry that wrote no completion marker: refused as a corpus until the same command
    # is run again, which finds it complete and writes the marker
    out = tmp_path / "out"
    (out / DONE_FILE).unlink()
    with pytest.raises(CorpusError, match="unfinished"):
        iter_documents(str(out))
    again = prepare(str(src), out, recipe=str(recipe), decontam=[], shards=False)
    assert again["totals"] == card["totals"] and (out / DONE_FILE).is_file()
    assert len(list(iter_documents(str(out)))) == card["totals"]["docs_curated"] == 20


# ---------------------------------------------------------------------------------------------------------
# Issue 19 part 5: decontamination from lm-eval tasks


@pytest.mark.slow
def test_decontamination_index_from_lm_eval_tasks(tmp_path, shared_data):
    kobest = shared_data / "eval" / "kobest"
    report = build_index([f"lm-eval:kobest_boolq,kobest_copa@{kobest}"], tmp_path / "index", n_grams=13,
                         min_item_words=8)
    assert set(report["tasks"]) == {"kobest_boolq", "kobest_copa"}
    assert report["tasks"]["kobest_boolq"]["items_indexed"] > 500  # the dev passages lm-eval evaluates
    assert report["settings"]["sources"] == [f"lm-eval:kobest_boolq,kobest_copa@{kobest}"]
    # the whole group by its lm-eval name, data folder by default from the shared copy
    group = build_index(["lm-eval:kobest"], tmp_path / "group")
    assert set(group["tasks"]) == {"kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"}
    with pytest.raises(ValueError, match="no task or group 'kobest_nope'"):
        build_index(["lm-eval:kobest_nope"], tmp_path / "nope")

    with open(kobest / "boolq" / "dev.tsv", encoding="utf-8") as f:
        next(f)
        passage = next(f).split("\t")[1]
    sentence = next(s for s in passage.split(". ") if len(s.split()) >= 14)
    src = write_corpus(tmp_path / "src", 30, extra=[f"오늘 본 영화 후기 😀\n{sentence}.\n끝 2026"])
    card = prepare(str(src), tmp_path / "out", recipe="clean", decontam=[f"lm-eval:kobest_boolq@{kobest}"],
                   shards=False)
    dc = card["decontamination"]
    assert dc["enabled"] and dc["n_grams"] == 13 and dc["removed"] == 1
    assert dc["removed_by_task"] == {"kobest_boolq": 1}
    (example,) = dc["examples"]
    assert example["task"] == "kobest_boolq" and example["id"].endswith("a.jsonl#31")
    assert len(example["ngram"].split()) == 13 and "오늘 본 영화 후기" in example["text"]
    md = (tmp_path / "out" / "data_card.md").read_text(encoding="utf-8")
    assert "13-word n-grams" in md and "(kobest_boolq): shared 13-gram" in md and example["ngram"] in md


@pytest.mark.slow
def test_lm_eval_hub_task_needs_its_cached_data(tmp_path):
    """kmmlu is read from the Hugging Face cache; offline without it, one line says so (with it, it indexes)."""
    try:
        report = build_index(["lm-eval:kmmlu_accounting"], tmp_path / "index")
    except FileNotFoundError as e:
        assert "kmmlu_accounting" in str(e) and "Hugging Face cache" in str(e) and "\n" not in str(e)
    else:
        assert report["tasks"]["kmmlu_accounting"]["items_indexed"] > 0


# ---------------------------------------------------------------------------------------------------------
# Issue 19 part 4: Ray for real, Slurm scripts


def comparable(card: dict) -> dict:
    """A data card without what differs by executor (the executor's name, timings)."""
    return {k: v for k, v in card.items() if k not in ("executor", "stage_seconds", "wall_seconds")}


@pytest.mark.slow
def test_prepare_on_a_real_local_ray_cluster_matches_local(tmp_path):
    import ray  # noqa: F401  (in the test extra: a missing package fails here, it is not skipped)
    src = write_corpus(tmp_path / "src", 120, extra=["The quick brown fox 😀 jumps over 12 lazy dogs."] * 3)
    common = ["--corpus", str(src), "--recipe", "clean", "--tasks", "2", "--workers", "2", "--no-decontam",
              "--vocab-size", "300"]
    # Both runs write to the same path (the local one is moved aside after), because document ids, and so the
    # train/validation split of the shards, name the curated files by their path.
    run = tmp_path / "run"
    local = subprocess.run(cli("prepare", "--out", str(run), *common), cwd=ROOT, env=env(),
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-2000:]
    run.rename(tmp_path / "local")

    ray_env = {**env(), "RAY_USAGE_STATS_ENABLED": "0"}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp = Path("/tmp") / f"kf-ray-{os.getpid()}"  # Ray's socket paths must stay short
    port = str(20000 + os.getpid() % 20000)  # the machine is shared: not Ray's default 6379
    start = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--include-dashboard", "false",
                            "--temp-dir", str(temp), "--port", port],
                           env=ray_env, capture_output=True, text=True, timeout=180)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        on_ray = subprocess.run(cli("prepare", "--out", str(run), *common, "--executor", "ray",
                                    "--executor-opt", "mem_per_cpu_gb=0.25"),
                                cwd=ROOT, env={**ray_env, "RAY_ADDRESS": f"127.0.0.1:{port}"},
                                capture_output=True, text=True, timeout=480)
        assert on_ray.returncode == 0, on_ray.stderr[-3000:]
        assert "ray: 2 CPUs in the cluster" in on_ray.stderr
    finally:
        subprocess.run([ray_bin, "stop", "--force"], env=ray_env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    a = json.loads((tmp_path / "local" / "data_card.json").read_text(encoding="utf-8"))
    b = json.loads((run / "data_card.json").read_text(encoding="utf-8"))
    assert b["executor"] == "ray" and a["executor"] == "local"
    assert comparable(a) == comparable(b)
    assert read_curated(tmp_path / "local") == read_curated(run)
    shards = sorted(p.name for p in (run / "shards").iterdir())
    assert "train-00000.bin" in shards and shards == sorted(p.name for p in (tmp_path / "local" / "shards").iterdir())
    for name in shards:  # the token shards too, byte for byte
        assert (tmp_path / "local" / "shards" / name).read_bytes() == (run / "shards" / name).read_bytes(), name
    assert (run / DONE_FILE).is_file()
    for stage in ("ingest", "filter", "final", "finalize", "encode", "shards"):  # each stage ran as Ray tasks
        assert (run / "logs" / stage / "stats.json").is_file()
        ran = json.loads((run / "logs" / stage / "executor.json").read_text(encoding="utf-8"))
        assert ran["mem_per_cpu_gb"] == 0.25 and ran["cpus_per_task"] == 1  # datatrove's RayPipelineExecutor


SBATCH = """#!/bin/sh
# Records how it was called (arguments, then the job script) and answers like sbatch does.
n=$(($(ls "$SBATCH_LOG" | wc -l) + 1001))
{ echo "$@"; echo "----"; cat "$(eval echo \\${$#})"; } > "$SBATCH_LOG/$n.txt"
echo "Submitted batch job $n"
"""


def test_slurm_job_scripts_and_commands(tmp_path):
    """No Slurm here: `sbatch` is a recorder on PATH, and the test reads what datatrove asked Slurm to run."""
    src = write_corpus(tmp_path / "src", 20)
    bin_dir, log = tmp_path / "bin", tmp_path / "sbatch-calls"
    bin_dir.mkdir()
    log.mkdir()
    (bin_dir / "sbatch").write_text(SBATCH)
    (bin_dir / "sbatch").chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    proc = subprocess.run(cli("prepare", "--corpus", str(src), "--out", str(out), "--recipe", "clean", "--tasks", "4",
                              "--workers", "8", "--no-decontam", "--executor", "slurm",
                              "--executor-opt", "partition=cpu", "--executor-opt", "time=04:00:00",
                              "--executor-opt", f"venv_path={ROOT / '.venv' / 'bin' / 'activate'}"),
                          cwd=ROOT, env={**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_LOG": str(log)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = ["ingest", "filter", "exact_find", "dedup", "buckets", "cluster", "final", "finalize", "encode", "shards"]
    assert proc.stdout.strip() == f"prepare: submitted {len(stages)} stages -> {out}"
    calls = [(p.stem, *p.read_text().split("----\n")) for p in sorted(log.iterdir())]
    jobs = [(job, args.split(), script) for job, args, script in calls if "launch_pickled_pipeline" in script]
    assert [s.split("--job-name=kf-")[1].split()[0] for _, _, s in jobs] == stages
    tasks = {"ingest": 1, "exact_find": 1, "buckets": 14, "cluster": 1, "finalize": 1, "shards": 1}
    previous = None
    for (job, args, script), stage in zip(jobs, stages):
        n = tasks.get(stage, 4)
        assert f"#SBATCH --array=0-{n - 1}%8" in script and "#SBATCH --partition=cpu" in script
        assert "#SBATCH --time=04:00:00" in script and f"source {ROOT / '.venv' / 'bin' / 'activate'}" in script
        assert f"launch_pickled_pipeline {out / 'logs' / stage / 'executor.pik'}" in script
        assert (out / "logs" / stage / "executor.pik").is_file()
        assert (out / "logs" / stage / "launch_script.slurm").read_text() == script
        # each stage waits for the one before it to succeed
        dep = [a for a in args if a.startswith("--dependency=")]
        assert dep == ([f"--dependency=afterok:{previous}"] if previous else [])
        previous = job
    assert not (out / "data_card.json").exists()  # nothing ran here
