"""The run report, written once at the end: `report.json` for machines, `report.md` for people, `loss.png`.

report.md is the run's frame (result, stage times, loss curve, where everything is, config) with each stage's own
section in it: the samples before the artefact table, the later stages' sections after the config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfoundry.fileio import atomic_write_json, atomic_write_text
from kfoundry.train.metrics import read_records

RESULT_KEYS = ("val_bpb", "val_bpb_ko", "val_bpb_en", "val_loss", "first_loss", "final_loss", "steps",
               "tokens_seen", "params", "tokens_per_sec", "mfu")


def plot_loss(metrics: list[dict[str, Any]], out_png: Path) -> Path | None:
    """Training (and validation) loss against step; None when the run logged no training loss."""
    import matplotlib  # heavy: only when a report is written

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m and m.get("event") is None]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def render_markdown(run_dir: Path, report: dict[str, Any], png: Path | None, *, samples: str = "",
                    sections: tuple[str, ...] = ()) -> str:
    """report.md's text: the frame built from REPORT, SAMPLES inside it, SECTIONS appended in order."""
    lines = [f"# kfoundry run report: {run_dir.name}", ""]
    lines += ["## Result", "", "| metric | value |", "|---|---|"]
    for key in RESULT_KEYS:
        if key in report:
            v = report[key]
            shown = f"{v * 100:.1f}%" if key == "mfu" and isinstance(v, float) else _fmt(v)
            lines.append(f"| {key} | {shown} |")
    if report.get("peak_source"):
        lines += ["", f"MFU is measured against: {report['peak_source']}."]
    lines += ["", "## Stages", "", "| stage | seconds |", "|---|---|"]
    for stage, sec in report.get("stage_seconds", {}).items():
        lines.append(f"| {stage} | {sec:.1f} |")
    lines.append(f"| **total** | {sum(report.get('stage_seconds', {}).values()):.1f} |")
    if png:
        lines += ["", "## Loss curve", "", f"![loss curve]({png.name})"]
    if samples:
        lines.append(samples)
    lines += ["", "## Where everything is", "", "| artefact | path |", "|---|---|"]
    for name, path in report.get("paths", {}).items():
        if path:
            lines.append(f"| {name} | `{path}` |")
    if report.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2, ensure_ascii=False), "```"]
    return "\n".join(lines) + "\n" + "".join(sections)


def write_report(run_dir: str | Path, report: dict[str, Any], *, samples: str = "",
                 sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """Plot the loss, write report.json (REPORT plus the plot's path) and report.md, once; return what was written."""
    run_dir = Path(run_dir)
    png = plot_loss(read_records(run_dir / "metrics.jsonl"), run_dir / "loss.png")
    report = {**report, "paths": {**report.get("paths", {}), "loss_plot": str(png) if png else None}}
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(run_dir, report, png, samples=samples,
                                                             sections=sections))
    return report
