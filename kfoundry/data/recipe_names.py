"""Where the built-in curation recipes live and what they are called.

Standard library only, so `kfoundry data prepare --help` can list them without the [data] extra (datatrove),
which `kfoundry.data.curate` needs as soon as it is imported.
"""

from __future__ import annotations

from pathlib import Path

RECIPE_DIR = Path(__file__).parent / "curate" / "recipes"


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
