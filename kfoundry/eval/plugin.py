"""How `lm_eval --model kfoundry` finds our adapter.

lm-eval resolves `--model NAME` in its model registry. There are two ways to be in it:

1. **Entry point (lm-eval's supported plugin mechanism).** kfoundry declares, in pyproject.toml,

       [project.entry-points."lm_eval.models"]
       kfoundry = "kfoundry.eval.lm:KFoundryLM"

   lm-eval releases with plugin discovery (the `lm_eval.models` entry-point group, documented in lm-eval's
   plugin guide) find it with no further setup.

2. **Registration when lm-eval's registry is imported**, for lm-eval releases without plugin discovery
   (0.4.13, the newest on PyPI when this was written, has none). `install_startup_hook()` writes a one-line
   `kfoundry-lm-eval.pth` into site-packages; Python runs it at start-up, and it adds a small import watcher:
   the moment `lm_eval.api.registry` is imported, `kfoundry` is registered there as a lazy name
   ("kfoundry.eval.lm:KFoundryLM"), exactly what entry-point discovery would do. Nothing of kfoundry or torch is
   imported until lm-eval actually asks for the model, and a Python without lm-eval never notices.

       kfoundry eval --install-lm-eval-plugin     # once per environment (the Makefile's setup does it)

`kfoundry eval` itself never needs either: it imports the adapter and hands lm-eval the model object.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

from kfoundry.errors import MissingPathError

MODEL_NAME = "kfoundry"
TARGET = "kfoundry.eval.lm:KFoundryLM"
REGISTRY_MODULE = "lm_eval.api.registry"
PTH_NAME = "kfoundry-lm-eval.pth"
# A .pth line that starts with "import" is executed at start-up. It must never break Python: any failure
# (kfoundry uninstalled, a broken checkout) is swallowed.
PTH_LINE = ("import sys; exec('try:\\n from kfoundry.eval.plugin import install_import_hook as _h; _h()\\n"
            "except Exception:\\n pass')\n")


def register(registry_module: ModuleType | None = None) -> bool:
    """Put `kfoundry` into lm-eval's model registry (lazily; idempotent). True if it was added now."""
    if registry_module is None:
        registry_module = importlib.import_module(REGISTRY_MODULE)
    model_registry = registry_module.model_registry
    if MODEL_NAME in model_registry:
        return False
    # lm-eval fills its built-in names (hf, vllm, ...) lazily, only while the registry is still empty; once we add
    # ours it would never do so, and `--model hf` would break. So let it fill them first.
    import lm_eval.models  # noqa: F401

    model_registry.register(MODEL_NAME, target=TARGET)
    return True


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of lm_eval.api.registry, then registers our model into the fresh module."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        try:
            register(module)
        except Exception as e:  # never break lm-eval's own import
            print(f"kfoundry: could not register the lm-eval model: {e}", file=sys.stderr)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    """Finds nothing itself; when lm_eval.api.registry is looked up, wraps the loader the other finders return."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install_import_hook() -> None:
    """Register now if lm-eval's registry is already imported, else when it is (idempotent)."""
    if REGISTRY_MODULE in sys.modules:
        register(sys.modules[REGISTRY_MODULE])
        return
    if not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegistryWatcher())


def install_startup_hook(site_dir: str | Path | None = None) -> Path:
    """Write the .pth file into `site_dir` (default: this environment's site-packages). Returns its path."""
    site = Path(site_dir) if site_dir else Path(sysconfig.get_paths()["purelib"])
    if not site.is_dir():
        raise MissingPathError(f"site-packages directory not found: {site}")
    path = site / PTH_NAME
    path.write_text(PTH_LINE, encoding="utf-8")
    return path
