"""Optional extras: a command whose extra is missing stops in one line naming the `pip install` to run.

The packages are hidden for real, in a fresh interpreter: a `sitecustomize` on PYTHONPATH puts an import blocker
first on `sys.meta_path`, so `import datatrove` (and `importlib.util.find_spec`) fail there exactly as they would
on a machine without the extra. Nothing of kfoundry is replaced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kfoundry import extras
from kfoundry.errors import DependencyError

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = '''
import os, sys

HIDDEN = set(filter(None, os.environ.get("KFOUNDRY_TEST_HIDE", "").split(",")))


class HideModules:
    """Act as if the packages in KFOUNDRY_TEST_HIDE were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, HideModules())
'''


def run_hidden(tmp_path: Path, hide: str, *argv: str) -> subprocess.CompletedProcess:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER, encoding="utf-8")
    env = {**os.environ, "KFOUNDRY_TEST_HIDE": hide,
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "kfoundry", *argv], capture_output=True, text=True, env=env,
                          timeout=180, cwd=tmp_path)


def test_missing_extra_gives_the_install_line(tmp_path):
    # [serve] hidden: `kfoundry serve` names it, before touching the checkpoint or the network
    res = run_hidden(tmp_path, "fastapi,uvicorn", "serve", "--model", str(tmp_path))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "pip install 'kfoundry[serve]'" in res.stderr and "fastapi, uvicorn not installed" in res.stderr


def test_without_the_data_extra_other_commands_still_work(tmp_path):
    """datatrove and the Korean tools hidden: `data prepare` names [data]; the CLI itself (every other command's
    parser, `--help`, `kfoundry config`) does not need them."""
    hide = "datatrove,kiwipiepy,kiwipiepy_model,ftfy,orjson,lm_eval,gguf,fastapi,uvicorn,httpx,accelerate"
    res = run_hidden(tmp_path, hide, "data", "prepare", "--corpus", "starter", "--out", str(tmp_path / "cur"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "pip install 'kfoundry[data]'" in res.stderr and "datatrove" in res.stderr
    res = run_hidden(tmp_path, hide, "doctor", "--json")
    assert "Traceback" not in res.stderr, res.stderr
    assert '"extra [data]"' in res.stdout and "pip install 'kfoundry[export]'" in res.stdout


def test_require_in_this_environment():
    for extra in extras.EXTRAS:  # `make setup` installs every extra; here all are present
        assert extras.missing(extra) == [], extra
        extras.require(extra)
    with pytest.raises(KeyError):
        extras.missing("nope")


def test_require_reports_a_module_hidden_in_sys_modules(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # Python's own way to make `import gguf` fail
    with pytest.raises(DependencyError, match=r"gguf not installed\): pip install 'kfoundry\[export\]'"):
        extras.require("export")
