"""kfoundry.eval end to end, offline: parity with lm-eval's own Hugging Face model on KoBEST documents,
`kfoundry eval` on the KoBEST pack (checkpoint and exported Hugging Face directory), and a bare
`lm_eval --model kfoundry` run through the start-up hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kfoundry.checkpoint import save_checkpoint
from kfoundry.cli import main
from kfoundry.config import resolve
from kfoundry.model.llama import Transformer
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.tokenizer import KTokenizer

LIMIT = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    """A run directory as pretraining leaves it (tokenizer/, shards/, ckpt/step-N) plus its Hugging Face export.

    The weights are a random initialisation with a large init scale, so choices get clearly different
    log-likelihoods; what is tested is the evaluation, not the model. The context (128) is shorter than many
    KoBEST paragraphs, so left truncation is exercised too.
    """
    from kfoundry.export.hf import export_hf

    base = tmp_path_factory.mktemp("evalrun")
    cfg = resolve("test-micro", overrides=["model.max_seq_len=128", "model.init_std=0.1"])
    tok_dir = ensure_tokenizer(base, cfg, log=lambda m: None)
    ensure_shards(base, cfg, tok_dir, log=lambda m: None)
    tok = KTokenizer.load(tok_dir)
    cfg.model.vocab_size = tok.vocab_size
    model = Transformer.build(cfg.model, seed=0)
    ckpt = save_checkpoint(base / "ckpt" / "step-000000", model, tok)
    hf = export_hf(ckpt, base / "hf")
    return {"base": base, "ckpt": ckpt, "hf": hf, "kobest": shared_data / "eval" / "kobest"}


def _evaluate(lm, kobest_dir, tasks=("kobest",)):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from kfoundry.eval.runner import pack_dir

    tm = TaskManager(include_path=str(pack_dir()), include_defaults=False, metadata={"task_dir": str(kobest_dir)})
    return simple_evaluate(model=lm, tasks=list(tasks), limit=LIMIT, task_manager=tm, log_samples=True,
                           bootstrap_iters=0)


@pytest.mark.slow
def test_parity_with_lm_eval_hf_model(run):
    """The exported model under lm-eval's `hf` model and the checkpoint under our adapter: the same requests,
    log-likelihoods within 1e-4, the same greedy flags, identical accuracy and F1 on every KoBEST task."""
    from lm_eval.models.huggingface import HFLM

    from kfoundry.eval.lm import KFoundryLM

    ours = _evaluate(KFoundryLM(model=str(run["ckpt"]), device="cpu"), run["kobest"])
    theirs = _evaluate(HFLM(pretrained=str(run["hf"]), device="cpu", dtype="float32", batch_size=4), run["kobest"])
    worst, requests = 0.0, 0
    for task in ("kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"):
        a, b = ours["samples"][task], theirs["samples"][task]
        assert len(a) == len(b) == LIMIT
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]  # same prompts and choices
            for (la, ga), (lb, gb) in zip((r[0] for r in sa["resps"]), (r[0] for r in sb["resps"])):
                worst = max(worst, abs(la - lb))
                assert ga == gb
                requests += 1
        for metric in ("acc,none", "f1,none"):
            assert ours["results"][task][metric] == theirs["results"][task][metric], (task, metric)
    assert requests >= 5 * LIMIT * 2 and worst < 1e-4, worst
    assert ours["results"]["kobest"]["acc,none"] == theirs["results"]["kobest"]["acc,none"]


def test_kfoundry_eval_end_to_end(run, tmp_path):
    out = tmp_path / "eval" / "eval.json"
    rc = main(["eval", "--model", str(run["ckpt"]), "--tasks", "kobest", "--limit", "3", "--task-dir",
               str(run["kobest"]), "--out", str(out), "--bpb-limit", "5"])
    assert rc == 0
    for suffix in (".json", ".md", ".html", ".png"):
        assert out.with_suffix(suffix).is_file(), suffix
    report = json.loads(out.read_text(encoding="utf-8"))
    rows = {r["task"]: r for r in report["tasks"]}
    assert set(rows) == {"kobest", "kobest_boolq", "kobest_copa", "kobest_hellaswag", "kobest_sentineg", "kobest_wic"}
    for name, r in rows.items():
        assert 0 <= r["score"] <= 1 and r["n"] == (15 if name == "kobest" else 3)
        assert r["chance"] is not None and r["chance_corrected"] is not None
    assert rows["kobest_hellaswag"]["chance"] == 0.25 and rows["kobest"]["chance"] == pytest.approx(0.45)
    assert "f1" in rows["kobest_boolq"]["other_metrics"]
    assert report["protocol"]["limit"] == 3 and report["protocol"]["mode"] == "base"
    assert report["bpb"]["ko"]["texts"] == 5 and 0 < report["bpb"]["ko"]["bpb"] < 20
    assert report["bpb"]["en"]["bpb"] > 0
    cont = report["contamination"]
    assert cont["shards"] == str(run["base"] / "shards") and cont["tasks"]["kobest_copa"]["documents"] == 3
    assert cont["tasks"]["kobest"]["documents"] == 15
    md = out.with_suffix(".md").read_text(encoding="utf-8")
    assert "| kobest_copa |" in md.replace("↳ ", "") and "dev split" in md and "Bits per byte" in md


@pytest.mark.slow
def test_hf_directory_through_the_same_command(run, tmp_path):
    """An exported Hugging Face directory runs through lm-eval's `hf` model with the same report; its bits per
    byte equal the checkpoint's (same weights, same text), and the contamination check finds the run's shards
    through kfoundry_source.json."""
    outs = {}
    for name in ("ckpt", "hf"):
        out = tmp_path / name / "eval.json"
        assert main(["eval", "--model", str(run[name]), "--tasks", "kobest_copa", "--limit", "3", "--task-dir",
                     str(run["kobest"]), "--out", str(out), "--bpb-limit", "4"]) == 0
        outs[name] = json.loads(out.read_text(encoding="utf-8"))
    assert outs["ckpt"]["backend"] == "kfoundry" and outs["hf"]["backend"] == "hf"
    for lang in ("ko", "en"):
        assert outs["hf"]["bpb"][lang]["bpb"] == pytest.approx(outs["ckpt"]["bpb"][lang]["bpb"], abs=1e-4)
    a, b = (next(r for r in o["tasks"] if r["task"] == "kobest_copa") for o in (outs["ckpt"], outs["hf"]))
    assert a["score"] == b["score"]
    assert outs["hf"]["contamination"]["shards"] == str(run["base"] / "shards")


@pytest.mark.slow
def test_lm_eval_cli_runs_the_kfoundry_model(run, tmp_path):
    """`lm_eval --model kfoundry --model_args model=CKPT` with the start-up hook installed (here into a scratch
    site directory, processed the way site-packages is)."""
    from kfoundry.eval.plugin import install_startup_hook
    from kfoundry.eval.runner import pack_dir

    site = tmp_path / "site"
    site.mkdir()
    install_startup_hook(site)
    argv = ["lm_eval", "--model", "kfoundry", "--model_args", f"model={run['ckpt']}", "--tasks", "kobest_sentineg",
            "--include_path", str(pack_dir()), "--metadata", json.dumps({"task_dir": str(run["kobest"])}),
            "--limit", "4", "--output_path", str(tmp_path / "out")]
    code = ("import site, sys; site.addsitedir(sys.argv[1]); sys.argv = sys.argv[2:]\n"
            "from lm_eval.__main__ import cli_evaluate; cli_evaluate()\n")
    res = subprocess.run([sys.executable, "-c", code, str(site), *argv], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kobest_sentineg" in res.stdout and "acc" in res.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and json.loads(results[0].read_text())["n-samples"]["kobest_sentineg"]["effective"] == 4


def test_eval_errors_are_one_line(run, tmp_path, capsys):
    assert main(["eval", "--tasks", "kobest", "--out", str(tmp_path / "e.json")]) == 2
    assert "needs --model and --out" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path), "--tasks", "kobest", "--out", str(tmp_path / "e.json")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["eval", "--model", str(run["ckpt"]), "--tasks", "kobest", "--task-dir", str(tmp_path / "missing"),
                 "--out", str(tmp_path / "e.json"), "--no-bpb"]) == 2
    assert "--task-dir not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", str(run["ckpt"]), "--tasks", "kobest", "--limit", "0", "--out", "x"])


def test_speedrun_eval_stage(run, tmp_path):
    """The speedrun's eval stage (kfoundry/speedrun/eval.py): bits per byte and KoBEST at a small limit, as report fields and a report."""
    from kfoundry.checkpoint import load_model, load_tokenizer
    from kfoundry.speedrun import eval as eval_stage

    ckpt = run["ckpt"]
    section = eval_stage.run(ckpt, tmp_path, limit=2, bpb_limit=5, model=load_model(ckpt),
                             tokenizer=load_tokenizer(ckpt))
    fields = section.fields
    assert fields["eval_bpb_ko"] > 0 and fields["eval_bpb_en"] > 0
    assert 0 <= fields["eval_kobest_acc"] <= 1 and fields["eval_kobest_f1"] is not None
    assert (tmp_path / "eval" / "eval.md").is_file() and fields["eval_report"].endswith("eval.md")
    text = section.markdown
    assert text.startswith("\n## Evaluation") and "| eval_kobest_acc |" in text and "eval.md" in text
    assert f"| eval_kobest_acc | {100 * fields['eval_kobest_acc']:.1f}% |" in text
