"""The run report: `report.md` for people, `report.json` for machines, `loss.png` for the curve.

Everything in it is read from what the run wrote (metrics.jsonl, the summary, the checkpoint paths), so the
report can be regenerated from a run directory at any time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kfoundry.fileio import atomic_write_json, atomic_write_text


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(metrics: list[dict[str, Any]], out_png: Path) -> Path | None:
    import matplotlib

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


def write_report(run_dir: str | Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json (exactly `report`, plus the plot path) and a readable report.md."""
    run_dir = Path(run_dir)
    png = plot_loss(read_metrics(run_dir), run_dir / "loss.png")
    report = {**report, "paths": {**report.get("paths", {}), "loss_plot": str(png) if png else None}}
    atomic_write_json(run_dir / "report.json", report)

    lines = [f"# kfoundry run report: {run_dir.name}", ""]
    lines += ["## Result", "", "| metric | value |", "|---|---|"]
    for key in ("val_bpb", "val_bpb_ko", "val_bpb_en", "val_loss", "first_loss", "final_loss", "steps",
                "tokens_seen", "params", "tokens_per_sec", "mfu"):
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
    if report.get("samples"):
        lines += ["", "## Samples", ""]
        for s in report["samples"]:
            lines += [f"**{s['lang']}** prompt: `{s['prompt']}`", "", "```text", s["prompt"] + s["completion"], "```", ""]
    lines += ["", "## Where everything is", "", "| artefact | path |", "|---|---|"]
    for name, path in report.get("paths", {}).items():
        if path:
            lines.append(f"| {name} | `{path}` |")
    if report.get("config"):
        lines += ["", "## Config", "", "```json", json.dumps(report["config"], indent=2, ensure_ascii=False), "```"]
    md = run_dir / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return md, run_dir / "report.json"
