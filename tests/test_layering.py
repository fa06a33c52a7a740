"""The package's layering, read from its imports (ast), as docs and DESIGN.md describe it.

- No import cycle between files (a module-level or a function-level import counts alike).
- `model/` is pure PyTorch: it imports torch, the standard library, `kfoundry.config` and `kfoundry.errors`
  (the ground floor), nothing else.
- The checkpoint format does not import provenance or training (they sit above it).
- The speedrun sits on top: no library module imports `kfoundry.speedrun`, and its stages live in that package
  (no `speedrun_*` function or `append_*_section` report writer elsewhere).
- `serve/`, `eval/` and `export/` consume a checkpoint and do not import each other.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
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


@functools.cache  # read once per session; callers do not change it
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


def raw_imports(path: Path) -> set[str]:
    """Every module name a file imports, kfoundry or not (relative imports resolved to absolute names)."""
    me = module_name(path)
    package_parts = (me if path.name == "__init__.py" else me.rsplit(".", 1)[0]).split(".")
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
    return found


def impure_model_imports(imports: set[str]) -> list[str]:
    """What a model/ file may not import: anything but torch, the standard library, kfoundry.config,
    kfoundry.errors (user errors are raised as KFoundryErrors everywhere) and model/."""
    def allowed(name: str) -> bool:
        top = name.split(".")[0]
        return (top == "torch" or top in sys.stdlib_module_names or name == "kfoundry.config"
                or name == "kfoundry.errors" or name == "kfoundry.model" or name.startswith("kfoundry.model."))

    return sorted(n for n in imports if not allowed(n))


def test_model_is_pure_pytorch():
    bad = {module_name(p): impure_model_imports(raw_imports(p)) for p in (PKG / "model").rglob("*.py")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_the_model_purity_check_names_what_it_forbids():
    assert impure_model_imports({"torch.nn.functional", "math", "__future__", "kfoundry.config", "kfoundry.errors",
                                 "kfoundry.model.llama"}) == []
    assert impure_model_imports({"numpy", "kfoundry.checkpoint", "safetensors.torch", "kfoundry.fileio",
                                 "kfoundry.configx"}) == ["kfoundry.checkpoint", "kfoundry.configx", "kfoundry.fileio",
                                                          "numpy", "safetensors.torch"]


def test_checkpoint_format_sits_below_provenance_and_training():
    g = graph()
    bad = {m: sorted(d for d in deps if package(d) in ("provenance", "train", "post", "serve", "eval"))
           for m, deps in g.items() if m.startswith("kfoundry.checkpoint")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}) == ["a.x", "a.y", "a.z", "a.x"]
    assert find_cycle({"a.x": {"a.y"}, "a.y": set()}) is None


# ------------------------------------------------------------------------------------------------ the speedrun

SPEEDRUN = "kfoundry.speedrun"
ENTRY_POINTS = {"kfoundry.cli", "kfoundry.__main__"}  # they wire the `speedrun` subcommand in
SPEEDRUN_ONLY_NAME = re.compile(r"^(speedrun\w*|append_\w*section)$")


def in_speedrun(module: str) -> bool:
    return module == SPEEDRUN or module.startswith(SPEEDRUN + ".")


def speedrun_importers(g: dict[str, set[str]]) -> dict[str, list[str]]:
    """Library modules (everything but the speedrun package and the entry points) that import the speedrun."""
    bad = {m: sorted(d for d in deps if in_speedrun(d)) for m, deps in g.items()
           if not in_speedrun(m) and m not in ENTRY_POINTS}
    return {m: d for m, d in bad.items() if d}


def test_no_library_module_imports_the_speedrun():
    assert speedrun_importers(graph()) == {}


def test_the_speedrun_import_check_catches_an_importer():
    g = {"kfoundry.eval.runner": {"kfoundry.speedrun.eval"}, "kfoundry.speedrun.run": {"kfoundry.eval.runner"},
         "kfoundry.cli": {"kfoundry.speedrun"}, "kfoundry.post.sft": {"kfoundry.speedrun"}}
    assert speedrun_importers(g) == {"kfoundry.eval.runner": ["kfoundry.speedrun.eval"],
                                     "kfoundry.post.sft": ["kfoundry.speedrun"]}


def test_speedrun_stages_live_in_the_speedrun_package():
    """A speedrun stage (`speedrun_sft`, ...) or a report.md section writer (`append_eval_section`, ...) defined in
    a library package makes that package carry the demo's code; they belong in kfoundry/speedrun/."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        m = module_name(path)
        if (in_speedrun(m) and path.parent.name == "speedrun") or m in ENTRY_POINTS:
            continue  # the package itself (kfoundry/speedrun/*.py), and the entry points
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and SPEEDRUN_ONLY_NAME.match(node.name):
                found.append(f"{m}.{node.name}")
    assert found == []


# ------------------------------------------------------------------------------- consumers of a checkpoint

CONSUMERS = ("serve", "eval", "export")


def consumer_crossings(g: dict[str, set[str]]) -> dict[str, list[str]]:
    """serve/eval/export modules that import one of the other two packages."""
    bad = {m: sorted(d for d in deps if package(d) in CONSUMERS and package(d) != package(m))
           for m, deps in g.items() if package(m) in CONSUMERS}
    return {m: d for m, d in bad.items() if d}


def test_serve_eval_and_export_do_not_import_each_other():
    assert consumer_crossings(graph()) == {}


def test_the_consumer_check_catches_a_crossing():
    g = {"kfoundry.serve.cli": {"kfoundry.export.gguf", "kfoundry.serve.app"}, "kfoundry.eval.lm": {"kfoundry.model"},
         "kfoundry.serve_cli": {"kfoundry.export.gguf", "kfoundry.serve.app"}}
    assert consumer_crossings(g) == {"kfoundry.serve.cli": ["kfoundry.export.gguf"]}
