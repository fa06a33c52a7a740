"""Stage 6, evaluation: bits per byte on held-out text and the offline KoBEST pack at a small limit.

The full report (per task, standard errors, frontier gap, contamination) goes to RUN/eval/eval.md through
`kfoundry.eval.runner.run_eval`, the same function `kfoundry eval` calls; the run report shows the headline fields.
KoBEST is skipped, with a note, when its files are not there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kfoundry.eval import kobest
from kfoundry.eval.lm import KFoundryLM
from kfoundry.eval.runner import EvalSpec, run_eval
from kfoundry.speedrun.stage import Section

LIMIT = 20  # KoBEST documents per task: a quick check (`kfoundry eval` runs the whole dev set)


def run(ckpt: str | Path, run_dir: str | Path, *, limit: int = LIMIT, bpb_limit: int = 100, model=None,
        tokenizer=None, log=lambda m: print(m, file=sys.stderr)) -> Section:
    """Evaluate CKPT (or the MODEL/TOKENIZER already in memory) into RUN/eval. Fields: eval_bpb_<lang>,
    eval_kobest_acc, eval_kobest_f1, eval_report (and eval_note when KoBEST is missing)."""
    task_dir = kobest.default_dir()
    have_kobest = all((task_dir / s / "dev.tsv").is_file() for s in kobest.SUBSETS)
    spec = EvalSpec(model=str(ckpt), tasks=["kobest"] if have_kobest else [], out=str(Path(run_dir) / "eval" / "eval"),
                    limit=limit, task_dir=str(task_dir) if have_kobest else None, bpb_limit=bpb_limit)
    lm = KFoundryLM(model=model, tokenizer=tokenizer) if model is not None and tokenizer is not None else None
    payload = run_eval(spec, lm=lm, log=log)
    fields: dict[str, Any] = {f"eval_bpb_{lang}": b.get("bpb") for lang, b in payload["bpb"].items()}
    for row in payload["tasks"]:
        if row["task"] == "kobest":
            fields["eval_kobest_acc"] = row["score"]
            fields["eval_kobest_f1"] = row["other_metrics"].get("f1")
    if not have_kobest:
        fields["eval_note"] = f"KoBEST files not found under {task_dir}; only bits per byte was measured"
    fields["eval_report"] = payload["files"]["md"]
    return Section(fields, markdown(fields))


def markdown(fields: dict[str, Any]) -> str:
    """The "Evaluation" section: one row per eval_* number, then where the full report is."""
    lines = ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
    for key in sorted(k for k in fields if k.startswith("eval_") and k not in ("eval_report", "eval_note")):
        value = fields[key]
        shown = "n/a" if value is None else (f"{100 * value:.1f}%" if "kobest" in key else f"{value:.4f}")
        lines.append(f"| {key} | {shown} |")
    if fields.get("eval_note"):
        lines += ["", fields["eval_note"]]
    if fields.get("eval_report"):
        lines += ["", f"Full evaluation report (per task, standard errors, frontier gap, contamination): "
                      f"`{fields['eval_report']}`. KoBEST here is a quick check on {LIMIT} dev documents per task; "
                      f"run `kfoundry eval` for the whole dev set."]
    return "\n".join(lines) + "\n"
