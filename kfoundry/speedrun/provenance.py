"""Stage 9, provenance: export the final model with its card, verify the whole run's ledger, show the lineage.

A model Hugging Face Llama cannot represent (QK-norm) gets its card at RUN/model_card/README.md instead of an export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kfoundry.export.hf import export_hf
from kfoundry.provenance.card import write_model_card
from kfoundry.provenance.verify import format_lineage, verify
from kfoundry.speedrun.stage import Section


def run(ckpt: str | Path, run_dir: str | Path) -> Section:
    """Export CKPT to RUN/export/hf (the model card is written into it), verify RUN. Fields: {"provenance": ...}."""
    run_dir = Path(run_dir)
    export_dir: Path | None = run_dir / "export" / "hf"
    try:
        export_hf(ckpt, export_dir, overwrite=True)
        card = export_dir / "README.md"
        if not card.is_file():  # an export that does not write cards itself
            card = write_model_card(ckpt, export_dir)
    except ValueError:
        export_dir = None
        card = write_model_card(ckpt, run_dir / "model_card")
    # The whole run, not only this checkpoint: the SFT run in RUN/sft, the GGUF file and the export just written
    # are checked too (its lineage is the newest checkpoint of RUN's own ledger, i.e. CKPT).
    report = verify(run_dir)
    fields = {"provenance": {"checkpoint": str(ckpt), "ok": report.ok, "origin": report.origin,
                             "problems": report.problems, "lineage": format_lineage(report.lineage),
                             "model_card": str(card), "export_hf": str(export_dir) if export_dir else None,
                             "ledger": str(run_dir / "ledger.jsonl")}}
    return Section(fields, markdown(fields, run_dir))


def markdown(fields: dict[str, Any], run_dir: str | Path) -> str:
    """The "Provenance" section: ledger state, origin, a link to the model card (relative to RUN), the lineage."""
    p = fields.get("provenance")
    if not p:
        return ""
    try:
        card = Path(p["model_card"]).resolve().relative_to(Path(run_dir).resolve()).as_posix()
    except ValueError:
        card = p["model_card"]
    origin = {"init": "random initialisation (trained from scratch)", "external": "external weights",
              }.get(p.get("origin"), "not recorded")
    lines = ["", "## Provenance", "",
             f"Ledger: {'intact, every recorded file matches' if p['ok'] else 'BROKEN'}; origin: {origin}. "
             f"Model card: [{card}]({card}). Check it: `kfoundry provenance verify {p['checkpoint']}`.", ""]
    if not p["ok"]:
        lines += [f"- {x}" for x in p["problems"]] + [""]
    lines += ["Lineage (origin first):", "", "```text", *p["lineage"], "```", ""]
    return "\n".join(lines)
