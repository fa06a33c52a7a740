"""The speedrun's report writer (kfoundry/speedrun/report.py): report.json and report.md written once, at the end,
with each stage's markdown where it belongs. Fast: no training, a hand-made metrics.jsonl."""

from __future__ import annotations

import json
import unicodedata

from kfoundry.speedrun.report import write_report
from kfoundry.speedrun.stage import Section


def test_report_is_written_once_with_each_stage_section_in_place(tmp_path):
    nfd = unicodedata.normalize("NFD", "한국어 text 42 😀")  # sections are written as the stages made them
    rows = [{"event": "start", "step": 0}, {"step": 5, "loss": 6.0}, {"step": 10, "loss": 5.0, "val_loss": 5.2}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    samples = Section({"samples": []}, "\n## Samples\n\n**ko** prompt: `대한민국은`\n")
    later = (Section({"gguf": {}}, "\n## Edge export (GGUF for llama.cpp)\n\nF16\n"),
             Section({"sft": {}}, "\n## Chat before and after SFT\n\n" + nfd + "\n"),
             Section({}, ""),  # a stage with nothing to show adds nothing
             Section({"provenance": {}}, "\n## Provenance\n\nok\n"))
    report = {"steps": 10, "first_loss": 6.0, "final_loss": 5.0, "mfu": 0.25,
              "stage_seconds": {"pretrain": 1.5, "samples": 0.5}, "paths": {"run_dir": str(tmp_path)},
              "config": {"preset": "test-micro"}}
    written = write_report(tmp_path, report, samples=samples.markdown, sections=tuple(s.markdown for s in later))

    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.png", "metrics.jsonl", "report.json", "report.md"]
    on_disk = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert on_disk == written and on_disk["paths"]["loss_plot"] == str(tmp_path / "loss.png")
    assert list(on_disk) == list(report)  # the stages' field order is kept
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    heads = [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert heads == ["Result", "Stages", "Loss curve", "Samples", "Where everything is", "Config",
                     "Edge export (GGUF for llama.cpp)", "Chat before and after SFT", "Provenance"]
    assert "| mfu | 25.0% |" in md and "| **total** | 2.0 |" in md and nfd in md
    assert md.endswith("\n## Provenance\n\nok\n")
