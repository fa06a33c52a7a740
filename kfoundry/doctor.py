"""`kfoundry doctor`: check an install, and say what each missing piece turns off.

A fresh setup can be complete for the speedrun and still lack pieces that only some stages use: a CUDA build of
PyTorch, the compiled llama.cpp bindings, Chromium for the web page test, the lm-eval plugin line, the shared data
folder. Instead of failing an hour later inside one stage, `kfoundry doctor` looks for every piece now and prints,
per piece, what it found and — when it is missing — which commands or tests it disables. It only looks: it installs,
downloads and compiles nothing, so it is safe to run anywhere and fast (it never imports the heavy optional modules
it can locate with `importlib.util.find_spec`, except torch, whose build it must ask).

Exit status: 0 when everything the speedrun needs is present (missing optional pieces are reported, not fatal);
1 when a required piece is missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

from kfoundry.corpus.starter import konlpy_corpus_dir  # locates konlpy's files without importing konlpy
from kfoundry.eval.plugin import PTH_NAME  # a constant; the plugin module imports only the standard library
from kfoundry.extras import EXTRAS, PURPOSE, install_hint, installed, missing


@dataclass
class Check:
    """One piece of the install: what it is, whether it is there, and what its absence turns off."""

    name: str
    ok: bool
    detail: str  # what was found (a version, a path) or why it was not
    disables: str  # what does not work without it
    required: bool = False  # required for `kfoundry speedrun`


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_torch() -> list[Check]:
    try:
        import torch  # the one import doctor must make: only torch itself knows its build
    except ImportError as e:
        return [Check("torch", False, f"not importable ({e})", "everything (model, training, inference)", True)]
    cuda_build = torch.version.cuda  # None on a CPU wheel
    build = f"CUDA {cuda_build}" if cuda_build else "CPU-only build"
    checks = [Check("torch", True, f"{torch.__version__} ({build})", "everything (model, training, inference)", True)]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        checks.append(Check("cuda", True, f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}",
                            "GPU training (bf16, torch.compile, NCCL); runs fall back to the CPU"))
    else:
        why = "no GPU visible to this CUDA build" if cuda_build else "this torch wheel has no CUDA support"
        checks.append(Check("cuda", False, why,
                            "GPU training (bf16, torch.compile, NCCL); runs fall back to the CPU "
                            "(install a CUDA wheel: docs/install.md)"))
    return checks


def check_module(name: str, dist: str, disables: str, required: bool = False) -> Check:
    """A Python package located without importing it (several pull in heavy native code at import)."""
    if not installed(name):
        return Check(dist, False, "not installed", disables, required)
    return Check(dist, True, _version(dist) or "installed (version unknown)", disables, required)


def check_konlpy_data() -> Check:
    """The `starter` corpus reads text files shipped inside konlpy; no Java is needed, only the files."""
    disables = "the `starter` corpus (the speedrun's default data)"
    try:
        path = konlpy_corpus_dir()
    except Exception as e:  # noqa: BLE001  (CorpusError, or anything konlpy's layout throws: report, don't crash)
        return Check("konlpy data", False, str(e), disables, True)
    return Check("konlpy data", True, str(path), disables, True)


def check_llama_cpp() -> Check:
    disables = ("the llama.cpp proof of GGUF exports (speedrun's llama.cpp sample, tests/test_gguf*); "
                "`export gguf` itself still writes the file")
    if not installed("llama_cpp"):
        return Check("llama.cpp", False, "llama-cpp-python not installed (it compiles llama.cpp: cmake and a C++ "
                     "compiler, several minutes; see docs/install.md)", disables)
    return Check("llama.cpp", True, f"llama-cpp-python {_version('llama_cpp_python') or '?'}", disables)


def check_chromium() -> Check:
    disables = "the web chat page test in a real browser (tests/test_serve_browser.py); serving itself works"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return Check("chromium", True, f"{browser}, {driver}", disables)
    missing = [n for n, p in (("chromium", browser), ("chromedriver", driver)) if not p]
    return Check("chromium", False, f"{' and '.join(missing)} not on PATH (apt-get install chromium "
                 "chromium-driver)", disables)


def check_lm_eval_plugin() -> Check:
    disables = "`lm_eval --model kfoundry` from lm-eval's own CLI (`kfoundry eval` works without it)"
    pth = Path(sysconfig.get_paths()["purelib"]) / PTH_NAME
    if pth.is_file():
        return Check("lm-eval plugin", True, str(pth), disables)
    return Check("lm-eval plugin", False, f"{pth} missing (run: kfoundry eval --install-lm-eval-plugin)", disables)


def check_shared_data() -> Check:
    root = Path(os.environ.get("KFOUNDRY_SHARED_DATA", "../shared/data"))
    disables = "the course chapters and tests that read ../shared/data (FLORES, NSMC, KoBEST, chat data)"
    if (root / "README.md").is_file():
        return Check("shared data", True, str(root.resolve()), disables)
    return Check("shared data", False, f"{root} not found (set KFOUNDRY_SHARED_DATA)", disables)


def check_extras() -> list[Check]:
    """One line per optional extra (pyproject's [data], [eval], [serve], [export]): complete, or what is missing
    and the install line."""
    checks = []
    for extra in EXTRAS:
        absent = missing(extra)
        detail = "installed" if not absent else f"missing {', '.join(absent)} ({install_hint(extra)})"
        checks.append(Check(f"extra [{extra}]", not absent, detail, PURPOSE[extra]))
    return checks


def run_checks() -> list[Check]:
    checks = check_torch()
    checks += [
        check_module("tokenizers", "tokenizers", "tokenizer training and every stage after it", required=True),
        check_module("safetensors", "safetensors", "reading and writing checkpoints", required=True),
        check_konlpy_data(),
        check_module("datatrove", "datatrove", "`kfoundry data prepare` (curation) and the speedrun's first stage",
                     required=True),
        check_module("kiwipiepy", "kiwipiepy", "Korean word counts in curation (datatrove's Korean tokenizer)"),
        check_module("lm_eval", "lm_eval", "`kfoundry eval` benchmarks (KoBEST); bits per byte still works"),
        check_lm_eval_plugin(),
        check_module("transformers", "transformers", "`export hf` parity checks and `eval --backend hf`"),
        check_module("gguf", "gguf", "`kfoundry export gguf`"),
        check_llama_cpp(),
        check_module("fastapi", "fastapi", "`kfoundry serve`"),
        check_module("uvicorn", "uvicorn", "`kfoundry serve`"),
        check_chromium(),
        check_module("ray", "ray", "`data prepare --executor ray`"),
        check_shared_data(),
    ]
    return checks + check_extras()


def format_checks(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        mark = "ok  " if c.ok else ("MISS" if c.required else "--  ")
        lines.append(f"{mark} {c.name:<{width}}  {c.detail}")
        if not c.ok:
            lines.append(f"     {'':<{width}}  disables: {c.disables}")
    missing_required = [c.name for c in checks if c.required and not c.ok]
    if missing_required:
        lines.append(f"\nkfoundry cannot run the speedrun: missing {', '.join(missing_required)}")
    else:
        optional = sum(1 for c in checks if not c.ok)
        lines.append(f"\nready for the speedrun; {optional} optional piece(s) missing" if optional
                     else "\nready: every piece is present")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check the install and say what each missing piece disables")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_doctor)


def _doctor(args) -> int:
    checks = run_checks()
    if args.json:
        print(json.dumps([asdict(c) for c in checks], ensure_ascii=False, indent=2))
    else:
        print(f"python {sys.version.split()[0]} at {sys.executable}")
        print(format_checks(checks))
    return 1 if any(c.required and not c.ok for c in checks) else 0
