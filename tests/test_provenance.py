"""Provenance: the hash-chained ledger (also against lines cut off its end), what the stages record, `provenance
verify` (tampering is detected and named, in every checkpoint and export of a run and its sub-runs; lineage reaches
random initialisation or external weights), the model card and the speedrun section."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from kfoundry.checkpoint import load_model, load_tokenizer, save_checkpoint
from kfoundry.cli import main
from kfoundry.config import resolve
from kfoundry.pipeline import ensure_shards, ensure_tokenizer
from kfoundry.provenance import ledger
from kfoundry.provenance.record import (find_checkpoint_entry, read_mark, record_checkpoint, record_evaluation,
                                        weights_digest)
from kfoundry.provenance.verify import lineage, verify
from kfoundry.train import loop

STEPS = ["train.max_steps=8", "train.ckpt_every=4", "train.eval_every=8", "train.log_every=4", "train.keep_last=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A pretraining run as `kfoundry pretrain` lays it out: tokenizer, shards and checkpoints inside RUN."""
    out = tmp_path_factory.mktemp("prov") / "run"
    cfg = resolve("test-micro", overrides=STEPS)
    tok = ensure_tokenizer(out, cfg)
    shards = ensure_shards(out, cfg, tok)
    loop.pretrain(cfg, out, shard_dir=shards, tokenizer_dir=tok, progress=False, log=lambda m: None)
    return out


def final_ckpt(run: Path) -> Path:
    return loop.list_checkpoints(run / "ckpt")[-1]


def copy_run(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def flip_byte(path: Path, offset: int = -10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------------- the ledger


def test_chain_holds_and_round_trips_any_text(tmp_path, mixed_texts):
    entries = [ledger.record(tmp_path, "note", text=t, n=i, path=tmp_path / "x") for i, t in enumerate(mixed_texts)]
    assert ledger.check_chain(tmp_path) == []
    read = ledger.read(tmp_path)
    assert [e["text"] for e in read] == mixed_texts  # stored as given (NFD stays NFD: a record, not an entry point)
    assert [e["seq"] for e in read] == list(range(len(mixed_texts)))
    assert read[0]["prev"] is None and all(b["prev"] == a["hash"] for a, b in zip(read, read[1:]))
    assert read[-1]["hash"] == entries[-1]["hash"] == ledger.head(tmp_path)
    assert read[0]["path"] == str(tmp_path / "x")
    with pytest.raises(ledger.LedgerError, match="reserved"):
        ledger.record(tmp_path, "note", hash="forged")


def test_chain_names_the_first_broken_line(tmp_path):
    for i in range(4):
        ledger.record(tmp_path, "note", n=i)
    path = ledger.ledger_path(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()

    edited = json.loads(lines[1])
    edited["n"] = 99  # the hash field is kept: the content no longer matches it
    path.write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]) + "\n", encoding="utf-8")
    problems = ledger.check_chain(tmp_path)
    assert len(problems) == 1 and "line 2" in problems[0] and "edited" in problems[0]
    with pytest.raises(ledger.LedgerError):  # nothing is appended after a damaged tail either
        path.write_text("\n".join(lines[:3]) + "\n" + json.dumps(edited) + "\n", encoding="utf-8")
        ledger.record(tmp_path, "note", n=5)

    # re-hashing the edited line does not help: the next line's link breaks instead
    edited["hash"] = ledger.entry_hash(edited)
    path.write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]) + "\n", encoding="utf-8")
    problems = ledger.check_chain(tmp_path)
    assert "line 3" in problems[0] and "prev" in problems[0]

    path.write_text("\n".join([lines[0], *lines[2:]]) + "\n", encoding="utf-8")  # a line removed
    assert "line 2" in ledger.check_chain(tmp_path)[0]
    path.write_text("\n".join(lines) + "\n" + '{"seq": 4, "kind": "no', encoding="utf-8")  # a torn last write
    assert any("incomplete" in p for p in ledger.check_chain(tmp_path))
    with pytest.raises(ledger.LedgerError, match="incomplete"):
        ledger.record(tmp_path, "note", n=5)


def test_lines_cut_off_the_end_are_detected_and_not_appended_to(tmp_path):
    """Every link of a shortened chain still holds; the head file beside the ledger says where it ended."""
    entries = [ledger.record(tmp_path, "note", n=i) for i in range(4)]
    assert json.loads(ledger.head_path(tmp_path).read_text()) == {"lines": 4, "hash": entries[-1]["hash"]}
    path = ledger.ledger_path(tmp_path)
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    problems = ledger.check_chain(tmp_path)
    assert len(problems) == 1 and "lines 3-4 were cut off the end" in problems[0], problems
    with pytest.raises(ledger.LedgerError, match="cut off the end"):  # appending would bless the cut
        ledger.record(tmp_path, "note", n=9)

    # a different last line where the head points: the end was rewritten (same length, other content)
    forged = ledger.record(tmp_path / "other", "note", n=7)
    path.write_text("\n".join(lines[:3]) + "\n" + json.dumps({**forged, "seq": 3, "prev": entries[2]["hash"]})
                    + "\n", encoding="utf-8")
    assert any("line 4: not the line ledger.head.json recorded" in p for p in ledger.check_chain(tmp_path))

    # removing the head file as well does not pass silently
    path.write_text("\n".join(lines[:2]) + "\n", encoding="utf-8")
    ledger.head_path(tmp_path).unlink()
    assert any("ledger.head.json: missing" in p for p in ledger.check_chain(tmp_path))


# ------------------------------------------------------------------------------------------------- what stages record


def test_pretraining_records_init_data_and_every_checkpoint(run):
    entries = ledger.read(run)
    kinds = [e["kind"] for e in entries]
    assert kinds == ["data", "init", "checkpoint", "checkpoint"], kinds
    data, init, c4, c8 = entries
    assert {s["source"] for s in data["sources"]} >= {"starter:kolaw", "starter:pydoc"}
    assert all(s["licence"] for s in data["sources"])  # the starter parts declare their licences
    assert set(data["shards"]["files"]) >= {"meta.json", "train-00000.bin", "val-00000.bin"}
    assert init["seed"] == 1337 and init["model_config"]["dim"] == 64 and init["code_version"]["kfoundry"]
    assert (c4["step"], c8["step"]) == (4, 8) and c8["tokens"] == 2 * c4["tokens"] > 0
    assert c4["parent"] == init["hash"] and c8["parent"] == c4["hash"] and c8["data"] == data["hash"]
    assert c8["weights_sha256"] == weights_digest(final_ckpt(run))
    # the checkpoint carries the line that recorded it, and the head file where the ledger ended
    assert read_mark(final_ckpt(run)) == {"ledger": "../../ledger.jsonl", "line": 4, "hash": c8["hash"]}
    assert json.loads(ledger.head_path(run).read_text()) == {"lines": 4, "hash": c8["hash"]}


def test_verify_a_run_and_its_lineage_from_random_init(run, capsys):
    report = verify(run)
    assert report.ok, report.problems
    assert [n.kind for n in report.lineage] == ["checkpoint", "checkpoint", "init"]
    assert report.origin == "init"
    assert any("re-derived" in n and "matches" in n for n in report.notes)  # the init weights were rebuilt
    assert any("step-000004" in m for m in report.missing)  # pruned by keep_last=1: reported, not a failure

    assert main(["provenance", "verify", str(final_ckpt(run))]) == 0
    out = capsys.readouterr().out
    assert out.startswith("provenance of") and "OK:" in out and "not a failure" in out
    out = out[out.index("lineage (origin first)"):]
    assert out.index("random initialisation (seed 1337") < out.index("step-000004") < out.index("step-000008")


def test_a_tampered_ledger_line_is_named(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    path = ledger.ledger_path(run)
    lines = path.read_text(encoding="utf-8").splitlines()
    entry = json.loads(lines[2])
    entry["tokens"] = 1  # claim fewer tokens than were trained on
    lines[2] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = verify(run)
    assert not report.ok and "ledger.jsonl line 3" in report.problems[0] and "edited" in report.problems[0]
    assert main(["provenance", "verify", str(run)]) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_a_tampered_checkpoint_file_is_named(run, tmp_path):
    run = copy_run(run, tmp_path)
    weights = final_ckpt(run) / "model.safetensors"
    flip_byte(weights)
    report = verify(final_ckpt(run))
    assert not report.ok and any("step-000008" in p and "model.safetensors" in p for p in report.problems)

    # rewriting the checkpoint's own manifest to match does not help: the ledger recorded the original
    from kfoundry.fileio import atomic_write_json, sha256_file

    manifest = final_ckpt(run) / "manifest.json"
    files = json.loads(manifest.read_text())["files"]
    files["model.safetensors"] = sha256_file(weights)
    atomic_write_json(manifest, {"files": files})
    problems = verify(run).problems
    assert any(str(weights) in p and "differ from those recorded" in p for p in problems), problems
    assert any("manifest.json" in p for p in problems)


def add_sub_run(run: Path, stage: str, steps: tuple[int, ...] = (5, 10)) -> Path:
    """A post-training run inside RUN, where `speedrun` puts its SFT (RUN/sft): checkpoints written and recorded
    as the post-training loop does (save_checkpoint, then record_checkpoint). Returns the last one."""
    parent = final_ckpt(run)
    model, tok = load_model(parent), load_tokenizer(parent)
    for step in steps:
        with torch.no_grad():
            model.model.norm.weight.add_(0.01)
        path = save_checkpoint(run / stage / "ckpt" / f"step-{step:06d}", model, tok,
                               trainer_state={"step": step, "tokens_seen": 10 * step},
                               meta={"stage": stage, "parent": str(parent.resolve()), "final": step == steps[-1]})
        record_checkpoint(path)
    return path


def test_verify_a_run_checks_every_checkpoint_and_export_in_it(run, tmp_path):
    """`verify RUN` covers the sub-runs (sft/, dpo/) and exports inside RUN, not only RUN's own ledger."""
    from kfoundry.export.gguf import export_gguf

    run = copy_run(run, tmp_path).resolve()
    sft_final, dpo_final = add_sub_run(run, "sft"), add_sub_run(run, "dpo", steps=(3,))
    gguf = export_gguf(final_ckpt(run), run / "export" / "model-f32.gguf", out_type="f32").path  # recorded
    report = verify(run)
    assert report.ok, report.problems
    assert {str(sft_final), str(dpo_final), str(gguf), str(final_ckpt(run))} <= set(report.checked)
    assert {str(run / "sft"), str(run / "dpo")} <= set(report.ledgers)

    flip_byte(sft_final / "model.safetensors")  # the final SFT model of a speedrun-like run
    problems = verify(run).problems
    assert any(str(sft_final) in p and "model.safetensors" in p for p in problems), problems
    assert not verify(final_ckpt(run)).problems  # the pretraining line itself is intact
    shutil.copy(final_ckpt(run) / "model.safetensors", sft_final / "model.safetensors")  # a swapped model
    assert any(str(sft_final) in p and "model.safetensors" in p for p in verify(run).problems)
    shutil.rmtree(sft_final)

    # a checkpoint or an export that no ledger records is a failure: nothing shows it was not swapped in
    shutil.copytree(dpo_final, run / "distill" / "ckpt" / "step-000001")
    flip_byte(gguf, offset=-3)
    (run / "export" / "other.gguf").write_bytes(gguf.read_bytes())
    problems = verify(run).problems
    assert any("distill/ckpt/step-000001: a checkpoint in the run that no ledger records" in p for p in problems)
    assert any(str(gguf) in p and "changed since it was recorded" in p for p in problems), problems
    assert any("other.gguf: an export in the run that no ledger records" in p for p in problems), problems


def test_a_ledger_cut_before_a_checkpoint_is_seen_from_the_checkpoint(run, tmp_path):
    """Cutting the last lines and rewriting the head file to match: the checkpoints still name their lines."""
    from kfoundry.export.hf import export_hf

    run = copy_run(run, tmp_path).resolve()
    export_hf(final_ckpt(run), run / "export" / "hf")
    path = ledger.ledger_path(run)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["kind"] for x in lines][-2:] == ["checkpoint", "export"]

    path.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # the export's line
    problems = verify(run).problems
    assert any("cut off the end" in p for p in problems), problems
    assert any("export/hf: an export in the run that no ledger records" in p for p in problems), problems

    kept = lines[:-2]  # the last checkpoint's line too, with a head file that agrees with the cut
    path.write_text("\n".join(kept) + "\n", encoding="utf-8")
    ledger.head_path(run).write_text(json.dumps({"lines": len(kept), "hash": json.loads(kept[-1])["hash"]}))
    assert ledger.check_chain(run) == []  # the chain and the head alone cannot tell
    want = f"{len(kept)} line(s), but {final_ckpt(run)} was recorded at line {len(kept) + 1}"
    assert any(want in p for p in verify(run).problems), verify(run).problems
    assert any(want in p for p in verify(final_ckpt(run)).problems)


def test_a_tampered_shard_is_named(run, tmp_path):
    run = copy_run(run, tmp_path)
    shard = run / "shards" / "train-00000.bin"
    flip_byte(shard, offset=100)
    report = verify(final_ckpt(run))
    assert not report.ok
    assert any(str(shard) in p and "changed since it was recorded" in p for p in report.problems), report.problems


def test_derivations_chain_across_ledgers(run, tmp_path):
    """A fine-tuned line in its own run: its first checkpoint descends from the parent's ledger entry, the next
    from the one before it (also after a rewrite at the same step), and lineage crosses into the parent run."""
    parent = final_ckpt(run)
    model, tok = load_model(parent), load_tokenizer(parent)
    sft = tmp_path / "sft"

    def save(step: int, bump: float) -> dict:
        with torch.no_grad():
            model.model.norm.weight.add_(bump)
        path = save_checkpoint(sft / "ckpt" / f"step-{step:06d}", model, tok, overwrite=True,
                               trainer_state={"step": step, "tokens_seen": 100 * step},
                               meta={"stage": "sft", "parent": str(parent.resolve()), "final": False})
        return record_checkpoint(path)

    e10, e20 = save(10, 0.01), save(20, 0.01)
    e20b = save(20, 0.02)  # resumed from step 10 and wrote step 20 again, differently
    entries = ledger.read(sft)
    root = next(e for e in entries if e["kind"] == "derivation")
    assert e10["parent"] == root["hash"] and e20["parent"] == e10["hash"] and e20b["parent"] == e10["hash"]
    assert root["parents"][0]["entry"] == find_checkpoint_entry(run, parent)["hash"]
    assert record_checkpoint(sft / "ckpt" / "step-000020")["hash"] == e20b["hash"]  # idempotent

    nodes = lineage(sft / "ckpt" / "step-000020")
    assert [n.kind for n in nodes] == ["checkpoint", "checkpoint", "derivation", "checkpoint", "checkpoint", "init"]
    report = verify(sft / "ckpt" / "step-000020")
    assert report.ok, report.problems
    assert set(report.ledgers) == {str(sft.resolve()), str(run.resolve())}


def test_an_unrecorded_checkpoint_is_reported(run, tmp_path):
    model, tok = load_model(final_ckpt(run)), load_tokenizer(final_ckpt(run))
    loose = save_checkpoint(tmp_path / "loose", model, tok, meta={"stage": "sft", "parent": str(final_ckpt(run))})
    report = verify(loose)
    assert not report.ok and "not recorded in any ledger" in report.problems[0]
    assert report.lineage[0].kind == "unrecorded" and report.origin == "init"  # meta.json leads back to a ledger


def test_an_imported_model_lineage_ends_at_the_external_source(run, tmp_path):
    from kfoundry.export.hf import export_hf
    from kfoundry.convert.import_hf import import_hf

    hf_dir = export_hf(final_ckpt(run), tmp_path / "someone-elses-model")
    imported, _ = import_hf(hf_dir, tmp_path / "imported", tokenizer=run / "tokenizer")  # records itself
    report = verify(imported)
    assert report.ok, report.problems
    assert [n.kind for n in report.lineage] == ["checkpoint", "derivation", "external"]
    assert report.lineage[-1].info["path"] == str(hf_dir.resolve())
    assert any("not a from-scratch model" in n for n in report.notes)

    # a model fine-tuned from the import still ends at the external weights, not at our own run
    model, tok = load_model(imported), load_tokenizer(imported)
    child = save_checkpoint(tmp_path / "child" / "ckpt" / "step-000005", model, tok,
                            trainer_state={"step": 5, "tokens_seen": 50},
                            meta={"stage": "sft", "parent": str(imported.resolve())})
    record_checkpoint(child)
    nodes = lineage(child)
    assert nodes[-1].kind == "external" and "someone-elses-model" in nodes[-1].label
    assert "init" not in [n.kind for n in nodes]

    # merging our own model with the import: one branch reaches external weights, so the merge does too
    from kfoundry.post.merge import merge

    merge([final_ckpt(run), imported], tmp_path / "merged")
    merged = verify(tmp_path / "merged")
    assert merged.ok, merged.problems
    assert merged.lineage[1].kind == "derivation" and len(merged.lineage[1].branches) == 1
    assert merged.lineage[-1].kind == "init" and merged.lineage[1].branches[0][-1].kind == "external"
    assert merged.origin == "external"

    from kfoundry.provenance.card import model_card

    card = model_card(child)
    meta = yaml.safe_load(card.split("---\n")[1])
    assert "derived-from-external-weights" in meta["tags"] and meta["kfoundry"]["origin"] == "external"
    assert "not a from-scratch model" in card and "처음부터 학습한 모델이 아닙니다" in card


# ------------------------------------------------------------------------------------------------- the model card


def test_export_writes_a_bilingual_model_card_and_is_recorded(run, tmp_path):
    from kfoundry.export.hf import export_hf

    run = copy_run(run, tmp_path)
    ckpt = final_ckpt(run)
    payload = {"tasks": [{"task": "kobest_boolq", "metric": "acc", "score": 0.55, "stderr": 0.02,
                          "percent_of_frontier": 12.5}],
               "summary": {"benchmarks_with_anchor": 1, "mean_percent_of_frontier": 12.5},
               "bpb": {"ko": {"bpb": 2.5}}, "protocol": {"tasks": ["kobest_boolq"], "limit": 20}}
    assert record_evaluation(ckpt, payload)["weights_sha256"] == weights_digest(ckpt)
    out = export_hf(ckpt, run / "export" / "hf")
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["language"] == ["ko", "en"] and meta["library_name"] == "transformers"
    assert "from-scratch" in meta["tags"] and meta["kfoundry"]["weights_sha256"] == weights_digest(ckpt)
    assert meta["kfoundry"]["ledger_intact"] is True
    for heading in ("## Intended use", "## Training data", "## Training compute", "## Evaluation", "## Provenance",
                    "## Limitations", "## 사용 목적", "## 학습 데이터", "## 학습 연산량", "## 평가",
                    "## 출처 증명(프로비넌스)", "## 한계"):
        assert heading in card, heading
    assert "PSF License" in card and "starter:kolaw" in card  # sources with their licences
    assert "kobest_boolq" in card and "12.5% of the frontier" in card and "87.5" in card  # the frontier gap
    assert "random initialisation (seed 1337" in card

    last = ledger.read(run)[-1]
    assert last["kind"] == "export" and last["files"]["README.md"]
    flip_byte(out / "model.safetensors")
    assert any("model.safetensors" in p and "export" in p for p in verify(run).problems)


def test_speedrun_section_shows_lineage_and_links_the_card(run, tmp_path):
    """The speedrun's provenance stage (kfoundry/speedrun/provenance.py): fields and its report section."""
    from kfoundry.speedrun import provenance as provenance_stage

    run = copy_run(run, tmp_path)
    section = provenance_stage.run(final_ckpt(run), run)
    fields = section.fields["provenance"]
    assert fields["ok"] and fields["origin"] == "init"
    assert Path(fields["model_card"]) == run / "export" / "hf" / "README.md"
    text = section.markdown
    assert text.startswith("\n## Provenance") and "[export/hf/README.md](export/hf/README.md)" in text
    assert "random initialisation (seed 1337" in text and "step-000008" in text


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["provenance", "verify", str(tmp_path / "nope")]) == 2
    assert main(["provenance", "verify", str(tmp_path)]) == 2  # neither a run nor a checkpoint
    err = capsys.readouterr().err
    assert err.count("kfoundry: error:") == 2 and "neither a checkpoint" in err
