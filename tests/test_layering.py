"""The package's layering, read from its imports (ast), as docs and DESIGN.md describe it.

- No import cycle between files (a module-level or a function-level import counts alike).
- `model/` is pure PyTorch: it imports neither checkpoints, nor provenance, nor training.
- The checkpoint format does not import provenance or training (they sit above it).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "kfoundry"


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """kfoundry modules a file imports (`from kfoundry.x import y` counts kfoundry.x.y when that is a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n in modules:
                found.add(n)
    found.discard(me)
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    return {m: imports_of(p, modules) for m, p in files.items()}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if m.startswith(n + ".") or n.startswith(m + "."):
                continue  # a package and its own modules (__init__ re-exports) are one unit
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if state.get(m) is None:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if state.get(n) is None:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle_between_files():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def package(module: str) -> str:
    """kfoundry.train.loop -> train; kfoundry -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_model_is_pure_pytorch():
    g = graph()
    bad = {m: sorted(d for d in deps if package(d) in ("checkpoint", "provenance", "train"))
           for m, deps in g.items() if m.startswith("kfoundry.model")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_checkpoint_format_sits_below_provenance_and_training():
    g = graph()
    bad = {m: sorted(d for d in deps if package(d) in ("provenance", "train", "post", "serve", "eval"))
           for m, deps in g.items() if m.startswith("kfoundry.checkpoint")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None
