"""What a speedrun stage hands back: the fields it adds to report.json and the markdown it adds to report.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """A stage's share of the report. `fields` are merged into report.json in stage order; `markdown` is the
    stage's section of report.md, exactly as it appears there (empty when the stage shows nothing)."""

    fields: dict[str, Any] = field(default_factory=dict)
    markdown: str = ""
