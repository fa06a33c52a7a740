"""`kfoundry doctor` reports what is installed and what each missing piece disables (the real environment)."""

from __future__ import annotations

import argparse
import importlib.util
import json

import torch

from kfoundry import doctor
from kfoundry.cli import main


def _by_name(checks):
    return {c.name: c for c in checks}


def test_doctor_reports_the_real_torch_build_and_cuda(capsys):
    assert main(["doctor", "--json"]) == 0  # this environment runs the speedrun
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert checks["torch"]["ok"] and torch.__version__ in checks["torch"]["detail"]
    assert ("CUDA" in checks["torch"]["detail"]) == (torch.version.cuda is not None)
    assert checks["cuda"]["ok"] == torch.cuda.is_available()
    # every piece present or not matches what Python itself can find
    assert checks["llama.cpp"]["ok"] == (importlib.util.find_spec("llama_cpp") is not None)
    assert checks["datatrove"]["ok"] == (importlib.util.find_spec("datatrove") is not None)
    assert checks["konlpy data"]["ok"] and checks["konlpy data"]["detail"].endswith("corpus")
    assert all(c["disables"] for c in checks.values())


def test_missing_optional_pieces_say_what_they_disable(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium, no chromedriver
    monkeypatch.setenv("KFOUNDRY_SHARED_DATA", str(tmp_path / "nowhere"))
    checks = _by_name(doctor.run_checks())
    assert not checks["chromium"].ok and "chromedriver" in checks["chromium"].detail
    assert "browser" in checks["chromium"].disables
    assert not checks["shared data"].ok and "KFOUNDRY_SHARED_DATA" in checks["shared data"].detail
    text = doctor.format_checks(list(checks.values()))
    assert "disables: the web chat page test" in text
    assert "ready for the speedrun" in text  # optional pieces only: still ready


def test_a_missing_required_piece_fails_with_exit_1(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datatrove" else real(name, *a))
    assert doctor._doctor(argparse.Namespace(json=False)) == 1
    out = capsys.readouterr().out
    assert "MISS datatrove" in out and "cannot run the speedrun: missing datatrove" in out
