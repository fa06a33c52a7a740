"""Optional extras: which packages each group of commands needs, and the one check that names the install line.

`pip install kfoundry` installs what training needs (torch, tokenizers, safetensors, the corpus readers). The
rest comes in extras, so a machine that only trains does not build datatrove's or lm-eval's dependency trees:

    [data]    kfoundry data prepare (curation): datatrove, kiwipiepy, ftfy, orjson
    [eval]    kfoundry eval benchmarks: lm-eval, accelerate
    [serve]   kfoundry serve: fastapi, uvicorn, httpx, aiohttp
    [export]  kfoundry export gguf: gguf
    [all]     all of the above (the Makefile installs it)

A command calls `require("serve")` before it imports anything from its extra; when a package is missing it stops
with one line (a `DependencyError`) that names the `pip install 'kfoundry[serve]'` to run. Packages are located
with `importlib.util.find_spec`, without importing them (several load heavy native code at import).
"""

from __future__ import annotations

import importlib.util

from kfoundry.errors import DependencyError

# extra -> (import name, distribution name) of each package it adds. pyproject.toml lists the same groups.
EXTRAS: dict[str, tuple[tuple[str, str], ...]] = {
    "data": (("datatrove", "datatrove"), ("kiwipiepy", "kiwipiepy"), ("kiwipiepy_model", "kiwipiepy_model"),
             ("ftfy", "ftfy"), ("orjson", "orjson")),
    "eval": (("lm_eval", "lm-eval"), ("accelerate", "accelerate")),
    "serve": (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("httpx", "httpx"), ("aiohttp", "aiohttp")),
    "export": (("gguf", "gguf"),),
}

# What each extra turns on, for `kfoundry doctor` and the install guide.
PURPOSE: dict[str, str] = {
    "data": "`kfoundry data prepare` (curation) and the speedrun's first stage",
    "eval": "`kfoundry eval` benchmarks (lm-eval tasks); bits per byte works without it",
    "serve": "`kfoundry serve` (the OpenAI-compatible API and the chat page)",
    "export": "`kfoundry export gguf` (llama.cpp files)",
}


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module hidden by sys.modules[name] = None
        return False


def missing(extra: str) -> list[str]:
    """The distributions of `extra` that are not installed (empty when the extra is complete)."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; known: {', '.join(EXTRAS)}")
    return [dist for module, dist in EXTRAS[extra] if not installed(module)]


def install_hint(extra: str) -> str:
    return f"pip install 'kfoundry[{extra}]'"


def require(extra: str, what: str | None = None) -> None:
    """Raise a one-line `DependencyError` naming the install command when a package of `extra` is missing."""
    absent = missing(extra)
    if absent:
        raise DependencyError(f"{what or PURPOSE[extra].split(' (')[0]} needs the [{extra}] extra "
                              f"({', '.join(absent)} not installed): {install_hint(extra)}")
